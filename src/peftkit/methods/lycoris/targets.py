"""Where LoHa / LoKr layers go: HF PEFT's target rules (peftkit.targeting's), over linear layers AND torch's
convolutions, checked before anything changes.

The core's `targeting.select_targets` judges every match by `adaptable_kind`, which knows the kinds LoRA wraps
(linear, transformers' Conv1D, embedding) and refuses an nn.Conv2d; so this module walks the model itself with
the core's public pieces (the same matching, exclusion, output-head and own-wrapper rules) and judges matches by
`shapes.base_kind`. Patterns from a config go through its bounded matcher, as everywhere.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ...patterns import Matcher, matcher_for
from ...targeting import (adaptable_kind, default_targets, is_linear_like, matches, named_modules_outside_wrappers,
                          output_head_names, own_base)
from .shapes import base_kind

DEFAULT_LAYER = r".*?\.[^.]*\.(\d+)\."  # PEFT's layer index without layers_pattern: the number after "<name>."


def layer_index(path: str, layers_pattern: tuple[str, ...] | None, matcher: Matcher) -> int | None:
    """The decoder-layer index in a module path, by PEFT's rule for layers_to_transform."""
    if not layers_pattern:
        found = re.match(DEFAULT_LAYER, path)  # our own pattern: no budget needed
        return int(found.group(1)) if found else None
    for pattern in layers_pattern:
        groups = matcher.groups(pattern, path, "layers_pattern", rf"(?:^|.*?\.){pattern}\.(\d+)\.")
        if groups is not None:
            return int(groups[0])
    return None


def _why_not(module: nn.Module, judged: nn.Module, config: Any) -> str | None:
    """Why a matched module cannot take this adapter (None: it can)."""
    if getattr(module, "peftkit_wrapper", False) and getattr(module, "peftkit_peft_type", None) != config.peft_type:
        return "it is already wrapped by another peftkit adapter; one module cannot carry both"
    kind = base_kind(judged)
    if kind is None and adaptable_kind(judged) == "conv1d":
        return (f"it is transformers' Conv1D (GPT-2's layout), which HF PEFT's {config.peft_type} refuses too, so a "
                "file could not be loaded there; target nn.Linear / nn.Conv2d / nn.Conv1d layers")
    if kind is None:
        return f"{config.peft_type} adapts nn.Linear, nn.Conv2d and nn.Conv1d layers only"
    if kind != "linear" and getattr(judged, "padding_mode", "zeros") != "zeros":
        return (f"padding_mode={judged.padding_mode!r}: only zero padding is supported (HF PEFT's update ignores "
                "the padding mode, so its merged and unmerged outputs would differ)")
    return None


def _selected(path: str, module: nn.Module, targets: Any, heads: set[str], config: Any, matcher: Matcher) -> bool:
    judged = own_base(module, config)
    hit = (is_linear_like(judged) and path not in heads) if targets == "all-linear" else matches(targets, path, matcher)
    if not hit or matches(config.exclude_modules, path, matcher, "exclude_modules"):
        return False
    # PEFT's check_target_module_exists applies layers_to_transform to list entries that END a path only (and
    # "all-linear", which it expands to such a list); a regex, or an entry equal to the whole path, ignores it
    by_layer = config.layers_to_transform is not None and (targets == "all-linear" or (
        isinstance(targets, tuple) and path not in targets))
    return not by_layer or layer_index(path, config.layers_pattern, matcher) in config.layers_to_transform


def select_lycoris_targets(model: nn.Module, config: Any) -> list[tuple[str, nn.Module, str]]:
    """(path, module or its own-family wrapper, kind of the base) for every module the config adapts. Raises,
    naming every offending module, when a match cannot be adapted or nothing matches."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    heads = output_head_names(model) if targets == "all-linear" else set()
    matcher = matcher_for(config)
    selected, problems = [], []
    for path, module in named_modules_outside_wrappers(model):
        if not _selected(path, module, targets, heads, config, matcher):
            continue
        judged = own_base(module, config)
        reason = _why_not(module, judged, config)
        if reason:
            problems.append(f"{path} ({type(module).__name__}): {reason}")
        else:
            selected.append((path, module, base_kind(judged)))
    if problems:
        raise ValueError(f"target_modules {targets!r} selects modules {config.peft_type} cannot adapt:\n  "
                         + "\n  ".join(problems))
    if not selected:
        names = list(dict.fromkeys(p.split(".")[-1] for p, _ in named_modules_outside_wrappers(model)))[:8]
        raise ValueError(
            f"target_modules {targets!r} matched no module"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (layers_to_transform={list(config.layers_to_transform)})" if config.layers_to_transform else "")
            + f". Module names in this model include: {', '.join(names)}")
    return selected
