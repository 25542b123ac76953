"""Which modules a config selects, by HF PEFT's rules, so a PEFT config picks the same layers here.

- a string target is a regex that must fullmatch the module name;
- a list entry matches a name that equals it or ends with "." + entry;
- "all-linear" is every linear layer (nn.Linear, transformers' Conv1D) except the output head;
- exclude_modules uses the same rules; modules_to_save are never adapted;
- layers_to_transform keeps only modules inside the listed layer indices.

Every regex a config brings (target_modules, exclude_modules, layers_pattern) is untrusted and is matched
through the config's bounded Matcher (peftkit.patterns): a pattern that backtracks without end is refused,
named, after about a second of CPU time instead of freezing the process.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .hf import is_conv1d, lora_default_targets, model_type, output_head
from .patterns import Matcher, matcher_for


def as_tuple(value: Any) -> tuple | None:
    """None, or a config's module list as a tuple (a set sorted, a scalar as a 1-tuple): hashable, frozen."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    return (value,)


def adaptable_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (transformers' Conv1D), 'embedding', 'conv' (torch's nn.Conv1d/2d/3d) or 'mha'
    (nn.MultiheadAttention) for the module types an adapter may wrap (or a wrapper's own kind), else None; each
    method takes the kinds it supports from these. A base layer of another kind (a quantized linear) says so with
    a `peftkit_linear_like` attribute."""
    if getattr(module, "peftkit_kind", None):
        return module.peftkit_kind
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear) or getattr(module, "peftkit_linear_like", False):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    return None


def is_linear_like(module: nn.Module) -> bool:
    return adaptable_kind(module) in ("linear", "conv1d")


def named_modules_outside_wrappers(module: nn.Module, prefix: str = ""):
    """Like named_modules(), but a peftkit wrapper is yielded without its insides (its .base and
    adapter weights are not targets of their own)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not getattr(child, "peftkit_wrapper", False) and not getattr(child, "peftkit_container", False):
            yield from named_modules_outside_wrappers(child, name)


def matches(spec: tuple[str, ...] | str | None, name: str, matcher: Matcher | None = None,
            what: str = "target_modules") -> bool:
    """Whether `spec` selects module `name`: a regex string must fullmatch it (through `matcher`, whose budget
    bounds the time; a fresh one when None), a list entry must equal it or end it after a "."."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return (matcher or Matcher()).fullmatch(spec, name, what)
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _layer_index(name: str, layers_pattern: tuple[str, ...] | None, matcher: Matcher) -> int | None:
    """The layer number in `name` (PEFT's rule): after one of the patterns (each preceded by "." or at the
    start), else the first number after a dotted segment when there is no pattern ("" and [] count as none)."""
    if not layers_pattern or all(p == "" for p in layers_pattern):
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(m.group(1)) if m else None
    for pattern in layers_pattern:
        groups = matcher.groups(pattern, name, "layers_pattern", rf"(?:^|.*?\.){pattern}\.(\d+)\.")
        if groups is not None:
            return int(groups[0])
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head, excluded from "all-linear" (as PEFT does)."""
    names = set()
    head = output_head(model)
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def default_targets(model: nn.Module) -> tuple[str, ...] | str:
    """LoRA's targets when target_modules is None, by `model.config.model_type` (PEFT's table, in peftkit.hf)."""
    targets = lora_default_targets(model)
    if targets is not None:
        return targets
    raise ValueError(
        f"target_modules is None and there is no default for model type {model_type(model)!r}; "
        f"pass target_modules=[...] (module names), a regex, or 'all-linear'. "
        f"Linear layers in this model include: {', '.join(_sample_names(model, linear_only=True))}"
    )


def _sample_names(model: nn.Module, linear_only: bool = False, limit: int = 8) -> list[str]:
    seen: list[str] = []
    for name, module in named_modules_outside_wrappers(model):
        if (linear_only and not is_linear_like(module)):
            continue
        short = name.split(".")[-1]
        if short not in seen:
            seen.append(short)
        if len(seen) >= limit:
            break
    return seen


def own_base(module: nn.Module, config) -> nn.Module:
    """The module a wrapper of the config's own method wraps (`peftkit_peft_type` names the wrapper's method);
    any other module as it is."""
    if getattr(module, "peftkit_peft_type", None) == getattr(config, "peft_type", None):
        return module.base
    return module


def select_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the config adapts. Raises, naming the patterns and existing module
    names, when nothing matches or when a matched module is of a type the method cannot wrap. A wrapper of the
    config's own method (a second adapter on the same layer) is judged by the module it wraps."""
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    heads = output_head_names(model) if targets == "all-linear" else set()
    save = config.modules_to_save or ()
    selected, unsupported = [], []
    matcher = matcher_for(config)
    for name, module in named_modules_outside_wrappers(model):
        judged = own_base(module, config)
        if targets == "all-linear":
            hit = is_linear_like(judged) and name not in heads
        else:
            hit = matches(targets, name, matcher)
        if not hit or matches(config.exclude_modules, name, matcher, "exclude_modules"):
            continue
        if save and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in save):
            continue
        named_outright = isinstance(targets, tuple) and name in targets  # PEFT skips the layer check for these
        if config.layers_to_transform is not None and not named_outright:
            if _layer_index(name, config.layers_pattern, matcher) not in config.layers_to_transform:
                continue
        if adaptable_kind(judged) is None:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        selected.append((name, module))
    if unsupported:
        raise ValueError(
            f"target_modules {targets!r} matched modules {config.peft_type} cannot wrap: {', '.join(unsupported)}. "
            "Supported at most: nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention "
            "(each method names the ones it takes); narrow the patterns to those."
        )
    if not selected:
        raise ValueError(
            f"target_modules {targets!r} matched no module"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (layers_to_transform={list(config.layers_to_transform)})" if config.layers_to_transform else "")
            + f". Module names in this model include: {', '.join(_sample_names(model))}"
        )
    return selected


def target_spec(spec: str) -> str | list[str]:
    """Command-line `--target-modules` text as a config value: 'all-linear' or a regex stays a string, a comma
    list becomes module names."""
    if spec == "all-linear" or any(c in spec for c in "*[]()\\|^$+?"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]
