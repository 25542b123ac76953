"""Merge adapters into the base weights (zero added latency), unmerge them, and unload, for every method
whose registry entry merges. Mergeable wrappers offer `merged` (the names merged, in order), `merge(name)`,
`unmerge(name)` and `merged_weight(name)`; methods that cannot merge say why (`Method.merge_refusal`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .record import active_adapters, configs, remove_wrappers, require_adapter, wrappers
from .registry import for_config


def mergeable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every wrapper that merges into its base's weights, with its module path."""
    for path, w in wrappers(model):
        if isinstance(getattr(w, "merged", None), list):
            yield path, w


def merged_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in mergeable_layers(model):
        names.extend(n for n in layer.merged if n not in names)
    return names


def merge_check(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Raise, before anything changes, if any of `names` (default: every adapter in the model) belongs to a
    method that cannot merge (the method's reason, with the names)."""
    names = list(configs(model)) if names is None else [names] if isinstance(names, str) else list(names)
    refused: dict[str, list[str]] = {}
    for name in names:
        reason = for_config(configs(model)[name]).merge_refusal if name in configs(model) else None
        if reason:
            refused.setdefault(reason, []).append(name)
    if refused:
        raise ValueError(" ".join(reason.format(names=found) for reason, found in refused.items()))


def _names(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    names = active_adapters(model) if names is None else ([names] if isinstance(names, str) else list(names))
    for name in names:
        require_adapter(model, name)
    return names


@torch.no_grad()
def merge(model: nn.Module, names: str | Sequence[str] | None = None, safe: bool = False) -> nn.Module:
    """Add the adapters' deltas (default: the active ones) into the base weights, in place.

    Afterwards the model computes the same outputs with no adapter work in the forward pass. Merging an
    adapter that is already merged changes nothing. With `safe=True` every merged weight is checked for
    NaN/inf first, and on any the merge is refused with the offending modules named and no weight changed.
    """
    names = _names(model, names)
    merge_check(model, names)  # methods that cannot merge refuse before anything changes
    active = active_adapters(model)
    # Active adapters merge in their active order: a DoRA adapter scales what the ones before it produced,
    # so the merged weight equals the forward only in that order (for plain LoRA the order is moot).
    names = sorted(names, key=lambda n: active.index(n) if n in active else len(active))
    layers = list(mergeable_layers(model))
    cannot = [f"{path} (adapter {name!r}): {why}" for path, layer in layers for name in names
              if name in layer.adapter_names() and (why := getattr(layer, "merge_problem", lambda _: None)(name))]
    if cannot:  # a layer that cannot take the merge (a grouped convolution) refuses before any weight changes
        raise ValueError("merge refused, no weight was changed: " + "; ".join(cannot))
    if safe:
        bad = []
        for path, layer in layers:
            for name in names:
                pending = name in layer.adapter_names() and name not in layer.merged
                if pending and not torch.isfinite(layer.merged_weight(name)).all():
                    bad.append(f"{path} (adapter {name!r})")
        if bad:
            raise ValueError(f"safe merge refused: NaN or inf in the merged weights of {', '.join(bad)}; "
                             "no weight was changed. Check the adapter for diverged training.")
    _untie_merged_weights(model, [(p, l) for p, l in layers if any(n in l.adapter_names() for n in names)])
    for _, layer in layers:
        for name in names:
            if name in layer.adapter_names():
                layer.merge(name)
    return model


def _untie_merged_weights(model: nn.Module, layers) -> None:
    """A base weight shared with another module (GPT-2's and SmolLM2's tied embedding and output head)
    gets its own copy before a merge, or the merge would silently change the other module too."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}")
    for path, layer in layers:
        weight = getattr(layer.base, "weight", None)
        if isinstance(weight, nn.Parameter) and len(set(owners.get(id(weight), []))) > 1:
            others = sorted(set(owners[id(weight)]) - {f"{path}.base.weight"})
            warnings.warn(f"merging into {path}, whose weight is tied to {others}: untying it (a copy) so the "
                          "tied modules keep their weights", stacklevel=3)
            layer.base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged delta again (latest first), restoring the base weights up to rounding."""
    for _, layer in mergeable_layers(model):
        for name in reversed(list(layer.merged)):
            layer.unmerge(name)
    return model


def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None, safe: bool = False,
                     dtype: torch.dtype | None = None, requantize: bool = False) -> nn.Module:
    """Merge (default: the active adapters), then put the plain modules back: no trace of peftkit remains.
    A module in modules_to_save becomes the merged adapter's trained copy.

    A 4-bit (NF4) base is dequantized first, so the merge is exact and the result is a dense model in
    `dtype` (default: the dtype the weights had before quantization). `requantize=True` quantizes the
    merged model to NF4 again, which adds a second rounding error (a warning says so)."""
    from .quant.linear import NF4Linear, dequantize_model, quantize

    names = _names(model, names)
    merge_check(model, names)  # methods that cannot merge refuse before anything changes
    quantized = {n.removesuffix(".base"): m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if quantized:
        first = next(iter(quantized.values()))
        settings = (first.blocksize, first.double_quant, first.compute_dtype)
        dequantize_model(model, dtype)
    merge(model, names, safe=safe)
    with_copy = [n for n in names if any(n in getattr(w, "copies", {}) for _, w in wrappers(model))]
    if len(with_copy) > 1:
        raise ValueError(f"adapters {with_copy} each carry their own copy of a saved module; unload one at a time")
    remove_wrappers(model, keep_copy_of=with_copy[0] if with_copy else None)
    if requantize:
        if not quantized:
            raise ValueError("requantize=True applies to a model whose base was NF4-quantized")
        warnings.warn("requantizing the merged model to NF4: the merged weights are rounded to 4 bits again, so "
                      "its outputs differ slightly from the merged dense model", stacklevel=2)
        quantize(model, "nf4", blocksize=settings[0], double_quant=settings[1], compute_dtype=settings[2],
                 modules=list(quantized))  # the layers that were 4-bit before, no others
    return model
