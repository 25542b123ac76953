"""Where OFT layers go: HF PEFT's target rules (peftkit.targeting's pieces) over linear layers, 1x1 convolutions and
embeddings, checked before anything changes.

The core's `targeting.select_targets` judges matches by the kinds LoRA wraps (it refuses an nn.Conv2d and takes
transformers' Conv1D, the opposite of what PEFT's OFT does), so this module walks the model with the core's public
pieces (matching, exclusion, output head, own-wrapper rule) and judges matches itself. With target_modules None
the targets are PEFT's OFT defaults, which are its LoRA table (`targeting.default_targets`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...patterns import Matcher, matcher_for
from ...targeting import (adaptable_kind, default_targets, is_linear_like, matches, named_modules_outside_wrappers,
                          output_head_names, own_base)
from ..lycoris.targets import layer_index
from .config import OFTConfig


def layer_kind(module: nn.Module) -> tuple[str | None, str]:
    """(kind, "") for a layer OFT can wrap: 'linear', 'conv2d' or 'embedding'; (None, why not) otherwise."""
    if isinstance(module, nn.Conv2d):
        if tuple(module.kernel_size) != (1, 1):
            return None, (f"kernel_size={tuple(module.kernel_size)}: only 1x1 convolutions are supported (HF PEFT "
                          "0.21's OFT changes a larger kernel's output even at its identity initialisation)")
        if module.groups != 1:
            return None, f"groups={module.groups}: only ungrouped convolutions are supported (as in HF PEFT)"
        return "conv2d", ""
    if isinstance(module, nn.Embedding):
        return "embedding", ""
    kind = adaptable_kind(module)
    if kind == "conv1d":
        return None, ("it is transformers' Conv1D (GPT-2's layout), which HF PEFT's OFT refuses too, so a file "
                      "could not be loaded there; target nn.Linear / nn.Conv2d / nn.Embedding layers")
    if kind == "linear":
        return "linear", ""
    return None, "OFT adapts nn.Linear, 1x1 nn.Conv2d and nn.Embedding layers only"


def _selected(path: str, module: nn.Module, targets: Any, heads: set[str], config: OFTConfig,
              matcher: Matcher) -> bool:
    judged = own_base(module, config)
    hit = (is_linear_like(judged) and path not in heads) if targets == "all-linear" else matches(targets, path, matcher)
    if not hit or matches(config.exclude_modules, path, matcher, "exclude_modules"):
        return False
    # PEFT applies layers_to_transform to list entries that END a path (and "all-linear", which it expands to such
    # a list); an entry equal to the whole path is taken as it is. A regex with it is refused by the config.
    by_layer = bool(config.layers_to_transform) and (targets == "all-linear" or (
        isinstance(targets, tuple) and path not in targets))
    return not by_layer or layer_index(path, config.layers_pattern, matcher) in config.layers_to_transform


def select_oft_targets(model: nn.Module, config: OFTConfig) -> list[tuple[str, nn.Module, str]]:
    """(path, module or its OFTLayer, kind of the base) for every module the config adapts. Raises, naming every
    offending module, when a match cannot be adapted or nothing matches."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    heads = output_head_names(model) if targets == "all-linear" else set()
    matcher = matcher_for(config)
    selected, problems = [], []
    for path, module in named_modules_outside_wrappers(model):
        if not _selected(path, module, targets, heads, config, matcher):
            continue
        judged = own_base(module, config)
        kind, why = layer_kind(judged)
        if getattr(module, "peftkit_wrapper", False) and getattr(module, "peftkit_peft_type", None) != config.peft_type:
            kind, why = None, "it is already wrapped by another peftkit adapter; one module cannot carry both"
        if kind is None:
            problems.append(f"{path} ({type(module).__name__}): {why}")
        else:
            selected.append((path, module, kind))
    if problems:
        raise ValueError(f"target_modules {targets!r} selects modules OFT cannot adapt:\n  " + "\n  ".join(problems))
    if not selected:
        names = list(dict.fromkeys(p.split(".")[-1] for p, _ in named_modules_outside_wrappers(model)))[:8]
        raise ValueError(
            f"target_modules {targets!r} matched no module"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (layers_to_transform={list(config.layers_to_transform)})" if config.layers_to_transform else "")
            + f". Module names in this model include: {', '.join(names)}")
    return selected
