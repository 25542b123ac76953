"""Adapters on disk in HF PEFT's format, for every registered method: `adapter_config.json` +
`adapter_model.safetensors` with PEFT's keys (each method's io module names them). Loading validates every
key against the model before anything changes, and never unpickles a `.bin` file unless the caller opts in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import check_fit, find_adapter_dir, read_config_dict, read_tensors, write_adapter
from .inject import inject
from .patterns import PatternError, matcher_for
from .record import configs, mark_trainable, require_adapter, require_new
from .registry import AdapterConfig, by_peft_type, config_from_peft_dict, for_config


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (without the `base_model.model.` prefix)."""
    require_adapter(model, name)
    config = configs(model)[name]
    return for_config(config).state_dict(model, name, config)


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 tensors: dict[str, Tensor] | None = None,
                 initial_adapter: str | os.PathLike | None = None) -> Path:
    """Write adapter `name` to `directory` in HF PEFT's format (loadable by PeftModel.from_pretrained).

    `tensors` (adapter_state_dict's keys) replaces the model's own values: a sharded (FSDP) run gathers
    them on every process first and passes the full tensors to the one process that writes.

    `initial_adapter`: the same adapter as saved right after inject, before training (HF PEFT's
    `path_initial_model_for_weight_conversion`). For an initialisation that moved part of the base into the
    adapter (LoRA's init_lora_weights="pissa"), the file written is then a plain LoRA of twice the rank that
    gives the trained outputs on the original, untouched base."""
    require_adapter(model, name)
    config = configs(model)[name]
    method = for_config(config)
    state = method.state_dict(model, name, config) if tensors is None else tensors
    file_config = method.file_config(model, name, config)
    if initial_adapter is not None:
        convert = getattr(method, "convert_from_initial", None)
        if convert is None:
            raise ValueError(f"initial_adapter= converts an adapter whose initialisation changed the base; "
                             f"{config.peft_type} adapters never do, so save without it")
        initial, initial_tensors = read_adapter(initial_adapter)
        if initial.peft_type != config.peft_type:
            raise ValueError(f"initial_adapter {str(initial_adapter)!r} is a {initial.peft_type} adapter, this one "
                             f"is {config.peft_type}: pass the file saved right after inject")
        state, file_config = convert(state, file_config, initial, initial_tensors)
    return write_adapter(directory, state, file_config, method.file_key_prefix)


def read_adapter(directory: str | os.PathLike, name: str = "default",
                 allow_pickle: bool = False) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Read (config, tensors with the `base_model.model.` prefix stripped) without touching a model."""
    folder = find_adapter_dir(directory, name)
    config = config_from_peft_dict(read_config_dict(folder))
    return config, read_tensors(folder, allow_pickle=allow_pickle)


def unknown_options(data: dict[str, Any], config: AdapterConfig) -> list[str]:
    """The options an adapter_config.json sets (to anything but an empty or false value) that the config
    read from it does not hold: options this peftkit does not know, ignored on load. Named when the file
    then does not fit, since they may be why."""
    kept = config.to_peft_dict()
    return [f"{k}={v!r}"[:120] for k, v in data.items()
            if k not in kept and v not in (None, False, [], {}, "") and k not in _METADATA_KEYS]


_METADATA_KEYS = frozenset({"auto_mapping", "revision", "inference_mode", "peft_version", "runtime_config",
                            "task_type", "megatron_config", "megatron_core"})


def nonfinite(config: AdapterConfig, tensors: dict[str, Tensor]) -> list[str]:
    """Every config value (e.g. `lora_alpha=inf`, `alpha_pattern['q_proj']=nan`) and tensor key holding NaN or
    infinity: an adapter with them makes every output NaN."""
    found: list[str] = []

    def walk(value: Any, where: str) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{where}={value}")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}[{key!r}]")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")

    for key, value in config.to_peft_dict().items():
        walk(value, key)
    found += sorted(k for k, v in tensors.items()
                    if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()))
    return found


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
                 allow_pickle: bool = False, allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT-format adapter (any registered method) into `model` in place as adapter `name`, and make
    it active.

    Every key is checked against the model first (missing modules, wrong shapes, unexpected keys); on any
    problem the error lists every offending key and the model is left exactly as it was. With
    trainable=False every parameter ends frozen (inference); with True the adapter's weights train.
    NaN or infinite tensors or config values (lora_alpha, alpha_pattern) are refused, naming them, unless
    allow_nonfinite=True (e.g. to inspect a run that diverged).
    """
    require_new(model, name)
    config, tensors = read_adapter(directory, name, allow_pickle=allow_pickle)
    bad = [] if allow_nonfinite else nonfinite(config, tensors)
    if bad:
        raise ValueError(f"adapter in {str(directory)!r} has NaN or infinite values in {len(bad)} place(s): "
                         f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; nothing was changed. Its "
                         "outputs would be NaN: retrain or restore it, or pass allow_nonfinite=True to load it anyway")
    method = by_peft_type(config.peft_type)
    want = method.expected(model, config)
    refused = matcher_for(config).refused
    if refused is not None:  # a regex of the file ran out of time: say that, not that every key is unexpected
        raise PatternError(str(refused)) from None
    unknown = unknown_options(read_config_dict(find_adapter_dir(directory, name)), config)
    check_fit(f"adapter in {str(directory)!r}", tensors, want, config.base_model_name_or_path, unknown)
    inject(model, config, name, init=False)
    method.load_tensors(model, name, tensors, want)
    mark_trainable(model, name if trainable else None)
    return model
