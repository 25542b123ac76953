"""Where VeRA adapters go: PEFT's VeRA defaults per architecture, then peftkit.targeting's rules (PEFT's),
checked before anything changes; and the largest target shape, which sizes the shared projections."""

from __future__ import annotations

import copy

from torch import nn

from ...hf.arch import model_type
from ...patterns import matcher_for
from ...targeting import adaptable_kind, own_base, select_targets
from .config import VeraConfig
from ...weights import linear_features
from .layer import VeraLayer

# HF PEFT's VeRA defaults by model_type (peft.utils.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING; a test
# compares the two). It belongs with the other per-architecture tables in peftkit.hf.arch; it lives here until
# that seam takes it.
QV, QKV = ("q_proj", "v_proj"), ("query_key_value",)
VERA_DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"), "mt5": ("q", "v"), "bart": QV, "gpt2": ("c_attn",), "bloom": QKV,
    "blip-2": ("q", "v", "q_proj", "v_proj"), "opt": QV, "gptj": QV, "gpt_neox": QKV, "gpt_neo": QV,
    "bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"), "deberta-v2": ("query_proj", "value_proj"), "deberta": ("in_proj",),
    "layoutlm": ("query", "value"), "llama": QV, "llama4": QV, "chatglm": QKV, "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",), "RefinedWebModel": QKV, "RefinedWeb": QKV, "falcon": QKV, "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",), "mistral": QV, "mixtral": QV, "stablelm": QV, "phi": QV, "gemma": QV, "gemma2": QV,
    "gemma3_text": QV, "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": QV, "qwen3": QV,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"), "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}


def default_targets(kind: str | None) -> tuple[str, ...] | str | None:
    """PEFT's VeRA target_modules for a model type, or None when its table has no entry."""
    return VERA_DEFAULT_TARGETS.get(kind)


def resolved(model: nn.Module, config: VeraConfig) -> VeraConfig:
    """The config with target_modules=None filled in from the architecture's table; raises, naming the model
    type, when the table has no entry. The copy shares the config's pattern budget."""
    if config.target_modules is not None:
        return config
    targets = default_targets(model_type(model))
    if targets is None:
        raise ValueError(f"target_modules is None and there is no VeRA default for model type "
                         f"{model_type(model)!r}; pass target_modules=[...] (module names), a regex, or 'all-linear'")
    matcher_for(config)  # made before the copy, so that both share it
    full = copy.copy(config)  # not replace(): the user's config is checked as given, as PEFT checks it
    object.__setattr__(full, "target_modules", targets)
    return full


def select_vera_targets(model: nn.Module, config: VeraConfig) -> list[tuple[str, nn.Module, str]]:
    """(path, module or its VeraLayer, kind) for every module the config adapts (`config` resolved). Raises,
    naming every offending module, before anything changes."""
    selected, problems = [], []
    for path, module in select_targets(model, config):  # its own VeRA layers are judged by their base
        kind = adaptable_kind(own_base(module, config))
        what = f"{path} ({type(module).__name__})"
        if getattr(module, "peftkit_wrapper", False) and not isinstance(module, VeraLayer):
            problems.append(f"{what} is already wrapped by another peftkit adapter; one module cannot carry both")
        elif kind not in ("linear", "conv1d"):
            problems.append(f"{what}: VeRA adapts linear layers (nn.Linear, Conv1D) only")
        else:
            selected.append((path, module, kind))
    if problems:
        raise ValueError(f"target_modules {config.target_modules!r} selects modules VeRA cannot adapt:\n  "
                         + "\n  ".join(problems))
    return selected


def base_of(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, VeraLayer) else module


def largest_shape(targets: list[tuple[str, nn.Module, str]]) -> tuple[int, int]:
    """(max in_features, max out_features) over the targets: vera_A is (r, max in), vera_B (max out, r)."""
    sizes = [linear_features(kind, base_of(module)) for _, module, kind in targets]
    return max(n_in for n_in, _ in sizes), max(n_out for _, n_out in sizes)
