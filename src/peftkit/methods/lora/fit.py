"""Whether a LoRA config fits the modules it selects, checked for every target before anything changes, so an
error names every offending module at once (HF PEFT's refusals, and the cases where its file would not describe
what the layer computes)."""

from __future__ import annotations

from torch import nn

from ...targeting import adaptable_kind, own_base
from . import conv
from .config import LoraConfig
from .mha import mha_problem


def _problem(model: nn.Module, path: str, module: nn.Module, config: LoraConfig) -> str | None:
    base = own_base(module, config)
    kind = adaptable_kind(base)
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else None
    if isinstance(parent, nn.MultiheadAttention) and base is parent.out_proj:
        return (f"it is the out_proj of nn.MultiheadAttention {parent_path!r}, whose forward never calls it, so an "
                f"adapter there would do nothing; target {parent_path!r} itself (that adapts in_proj and out_proj), "
                "or leave it out with exclude_modules")
    if config.init_lora_weights == "pissa" and kind not in ("linear", "conv1d"):
        return "init_lora_weights='pissa' applies to linear layers only; exclude it"
    if kind == "conv":
        return conv.conv_problem(base, config.rank_for(path), config.use_dora)
    if kind == "mha":
        return mha_problem(base, config.use_dora, config.bias)
    return None


def target_problems(model: nn.Module, targets: list[tuple[str, nn.Module]], config: LoraConfig) -> list[str]:
    """'<path> (<type>): <why>' for every selected module LoRA cannot adapt with this config."""
    found = []
    for path, module in targets:
        problem = _problem(model, path, module, config)
        if problem:
            found.append(f"{path} ({type(own_base(module, config)).__name__}): {problem}")
    return found
