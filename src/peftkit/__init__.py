"""peftkit: parameter-efficient fine-tuning, format-compatible with HF PEFT.

    import peftkit
    peftkit.inject(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    ...train...
    peftkit.save_adapter(model, "out/adapter")
"""

import sys as _sys

from .cpu import passive_waits_for_command

passive_waits_for_command(_sys.argv[0])  # the `peftkit` command only, and before torch loads (cpu.py says why)

from . import methods  # noqa: E402  registers the built-in methods (LoRA/DoRA, bottleneck, prefix, IA3)
from .adapters import (
    active_adapters,
    delete_adapter,
    disable_adapters,
    per_row,
    set_active,
    set_trainable,
    summary,
    trainable_parameters,
)
from .checkpoint import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .inject import inject
from .merge import merge, merge_and_unload, merged_adapters, unmerge
from .methods.adalora import AdaLoraConfig
from .methods.bottleneck import (BottleneckConfig, BottleneckLayer, bottleneck_state_dict, inject_bottleneck,
                                 load_bottleneck, save_bottleneck, unload_bottleneck)
from .methods.ia3 import IA3Config, IA3Layer
from .methods.lora import LoraConfig, LoraLayer, WeightAccess, combine
from .methods.lycoris import LoHaConfig, LoKrConfig, LycorisLayer
from .methods.oft import OFTConfig
from .methods.vera import VeraConfig
from .methods.prompt import PromptEncoderConfig, PromptTuningConfig
from .methods.prefix import (
    PrefixConfig,
    fold_prefix,
    inject_prefix,
    load_prefix,
    remove_prefix,
    save_prefix,
    set_prefix_enabled,
)
from .quant import nf4
from .quant.linear import NF4Linear, dequantize_model, quantize
from .quant.loading import load_quantized, save_quantized

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLayer", "WeightAccess", "inject", "save_adapter", "load_adapter", "read_adapter",
    "adapter_state_dict", "merge", "unmerge", "merge_and_unload", "merged_adapters", "combine", "set_active",
    "active_adapters", "set_trainable", "delete_adapter", "disable_adapters", "per_row",
    "trainable_parameters", "summary", "nf4", "NF4Linear", "quantize", "dequantize_model",
    "save_quantized", "load_quantized", "BottleneckConfig", "BottleneckLayer", "inject_bottleneck",
    "unload_bottleneck", "save_bottleneck", "load_bottleneck", "bottleneck_state_dict", "PrefixConfig",
    "inject_prefix", "save_prefix", "load_prefix", "remove_prefix", "set_prefix_enabled", "fold_prefix",
    "IA3Config", "IA3Layer", "__version__",
    "AdaLoraConfig",
    "LoHaConfig", "LoKrConfig", "LycorisLayer",
    "VeraConfig",
    "OFTConfig",
    "PromptTuningConfig", "PromptEncoderConfig",
]
