"""LoRA (and DoRA) as a registered method: how a config becomes layers, files, and training options."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

from torch import Tensor, nn

from ... import hf
from ...files import PREFIX
from ...record import replace_module, wrappers
from ...registry import Expected
from ...targeting import adaptable_kind, select_targets, target_spec
from . import io, plan
from .config import LoraConfig
from .convert import to_plain_lora
from .fused import real_rows
from .fit import target_problems
from .layer import LoraLayer
from .mha import LoraMhaLayer
from .mlp import fused_mlps
from .saved_copy import SavedCopy


class LoraMethod:
    """peft_type LORA: low-rank factors beside frozen linear, Conv1D, embedding, torch convolution and
    nn.MultiheadAttention layers (DoRA with use_dora=True; QLoRA is LoRA over an NF4 base, chosen at model load)."""

    peft_type = "LORA"
    config_class = LoraConfig
    train_names = ("lora", "qlora", "dora")
    train_help = {"lora": "low-rank adapters (LoRA)", "qlora": "LoRA on a 4-bit NF4 base with double quantization",
                  "dora": "weight-decomposed LoRA"}
    merge_refusal = None
    file_key_prefix = PREFIX
    ranked = True  # has a rank and target layers (the planner's and sweep's rank candidates)
    nf4_train_names = ("qlora",)  # train names whose frozen base is quantized to NF4
    plan = plan

    def read_config(self, data: dict[str, Any]) -> LoraConfig:
        return LoraConfig.from_peft_dict(data)

    def inject(self, model: nn.Module, config: LoraConfig, name: str, init: bool) -> None:
        targets = select_targets(model, config)  # raises before anything changes
        copies = io.saved_copy_targets(model, config)
        problems = target_problems(model, targets, config)
        if problems:
            raise ValueError("LoRA cannot adapt these modules with this config:\n  " + "\n  ".join(problems))
        for path, module in targets:
            layer = module if isinstance(module, (LoraLayer, LoraMhaLayer)) else (
                LoraMhaLayer(module) if adaptable_kind(module) == "mha" else LoraLayer(module, adaptable_kind(module)))
            layer.add_adapter(
                name, r=config.rank_for(path), scaling=config.scaling_for(path), dropout=config.lora_dropout,
                init=config.init_lora_weights if init or rebuilds_base(config) else True, dora=config.use_dora,
            )
            if layer is not module:
                replace_module(model, path, layer)
        for path, module in copies:
            wrapper = module if isinstance(module, SavedCopy) else SavedCopy(module)
            wrapper.add_adapter(name)
            if wrapper is not module:
                replace_module(model, path, wrapper)

    def extra_trainable(self, model: nn.Module, name: str, config: LoraConfig) -> list[nn.Parameter]:
        """bias="lora_only": the biases of the layers this adapter wraps; "all": every bias of the model."""
        found: list[nn.Parameter] = []
        if config.bias == "lora_only":
            found += [w.base.bias for _, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.lora_A
                      and getattr(w.base, "bias", None) is not None]
        if config.bias == "all":
            found += [p for pname, p in model.named_parameters()
                      if pname.split(".")[-1] == "bias" and ".copies." not in pname]
        return found

    def state_dict(self, model: nn.Module, name: str, config: LoraConfig) -> dict[str, Tensor]:
        return io.state_dict(model, name, config)

    def expected(self, model: nn.Module, config: LoraConfig) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors, expected)

    def file_config(self, model: nn.Module, name: str, config: LoraConfig) -> dict[str, Any]:
        kinds = {w.peftkit_kind for _, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.lora_A}
        extra: dict[str, Any] = {"fan_in_fan_out": "conv1d" in kinds}
        if config.base_model_name_or_path is None:
            extra["base_model_name_or_path"] = hf.name_or_path(model)
        return config.replace(**extra).to_peft_dict()

    def convert_from_initial(self, state: dict[str, Tensor], file_config: dict[str, Any], initial: LoraConfig,
                             initial_tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """PiSSA to a plain rank-2r LoRA file for the untouched base (convert.py)."""
        return to_plain_lora(state, file_config, initial, initial_tensors)

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        """Padding-free fused LoRA linears and fused LoRA SwiGLU MLPs (fused.py, mlp.py)."""
        stack = ExitStack()
        stack.enter_context(real_rows(keep))
        stack.enter_context(fused_mlps(model))
        return stack

    def config_from_options(self, o: Any) -> LoraConfig:
        return LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                          target_modules=target_spec(o.target_modules), use_rslora=o.use_rslora,
                          use_dora=o.method == "dora")

    def describe_options(self, o: Any) -> str:
        return f"{o.method} r={o.r} on {o.target_modules}"

    def describe(self, config: LoraConfig) -> str:
        return f"r={config.r} alpha={config.lora_alpha} rslora={config.use_rslora}"


METHOD = LoraMethod()


def rebuilds_base(config: LoraConfig) -> bool:
    """Whether loading a file of this config rebuilds the base it was trained on, as PEFT does: a PiSSA
    adapter saved without conversion trained on W minus its top-r part, which the init recomputes (a full,
    deterministic SVD) before the file's A and B are copied in."""
    return config.init_lora_weights == "pissa"

