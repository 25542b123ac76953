"""Merge adapters into the base weights (zero added latency), unmerge them, unload, and combine adapters."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .adapters import active_adapters
from .config import LoraConfig
from .inject import configs, inject, lora_layers, remove_wrappers, require_adapter, wrappers
from .methods.bottleneck import merge_check


def merged_adapters(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.merged if n not in names)
    return names


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
    merge_check(model, names)  # bottleneck adapters cannot merge: refuse before anything changes
    active = active_adapters(model)
    # Active adapters merge in their active order: a DoRA adapter scales what the ones before it produced,
    # so the merged weight equals the forward only in that order (for plain LoRA the order is moot).
    names = sorted(names, key=lambda n: active.index(n) if n in active else len(active))
    layers = list(lora_layers(model))
    if safe:
        bad = []
        for path, layer in layers:
            for name in names:
                pending = name in layer.lora_A and name not in layer.merged
                if pending and not torch.isfinite(layer.merged_weight(name)).all():
                    bad.append(f"{path} (adapter {name!r})")
        if bad:
            raise ValueError(f"safe merge refused: NaN or inf in the merged weights of {', '.join(bad)}; "
                             "no weight was changed. Check the adapter for diverged training.")
    _untie_merged_weights(model, [(p, l) for p, l in layers if any(n in l.lora_A for n in names)])
    for _, layer in layers:
        for name in names:
            if name in layer.lora_A:
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
    for _, layer in lora_layers(model):
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
    merge_check(model, names)  # bottleneck adapters cannot merge: refuse before anything changes
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


# --- combining adapters -------------------------------------------------------------------------------
def combine(model: nn.Module, weights: dict[str, float], name: str, how: str = "cat",
            rank: int | None = None) -> nn.Module:
    """Add adapter `name` combining existing adapters with the given weights; it becomes active.

    how="cat":    exact, delta = sum(w_i * delta_i); rank = sum of the source ranks.
    how="svd":    the exact sum truncated to `rank` (default: the largest source rank) by SVD.
    how="linear": A = sum(sqrt(w_i s_i) A_i), B = sum(sqrt(w_i s_i) B_i), as HF PEFT's "linear": not the
                  sum of deltas (cross terms), needs equal ranks and weights >= 0.
    The new adapter has scaling 1 (lora_alpha = r) and targets the union of the sources' modules.
    """
    if how not in ("cat", "svd", "linear"):
        raise ValueError(f"how must be 'cat', 'svd' or 'linear', got {how!r}")
    if not weights:
        raise ValueError("combine needs at least one adapter in weights={name: weight}")
    for source in weights:
        require_adapter(model, source)
        if not isinstance(configs(model)[source], LoraConfig):
            raise ValueError(f"combine works on LoRA adapters; {source!r} is {configs(model)[source].peft_type}")
        if configs(model)[source].modules_to_save:
            raise ValueError(f"adapter {source!r} has modules_to_save; combine works on LoRA weights only")
        if configs(model)[source].use_dora:
            raise ValueError(f"adapter {source!r} is a DoRA adapter: its update is not a sum of B @ A terms, so "
                             "combine cannot fold it into a LoRA adapter; merge it into the base instead")
    if merged_adapters(model):
        raise RuntimeError("combine needs unmerged adapters; call peftkit.unmerge(model) first")
    layers = [(p, l) for p, l in lora_layers(model) if any(s in l.lora_A for s in weights)]
    max_rank = {s: max(l.lora_A[s].shape[0] for _, l in layers if s in l.lora_A) for s in weights}
    if how == "cat":
        new_rank = sum(max_rank.values())
    elif how == "svd":
        new_rank = rank or max(max_rank.values())
    else:
        ranks = {l.lora_A[s].shape[0] for _, l in layers for s in weights if s in l.lora_A}
        if len(ranks) != 1 or any(w < 0 for w in weights.values()):
            raise ValueError(f"how='linear' needs one rank across adapters (got {sorted(ranks)}) and weights >= 0; "
                             "use how='cat' (exact) or how='svd'")
        new_rank = ranks.pop()
    config = LoraConfig(r=new_rank, lora_alpha=new_rank, target_modules=[p for p, _ in layers])
    inject(model, config, name)
    with torch.no_grad():
        for _, layer in layers:
            A, B = _combined_factors(layer, weights, how, new_rank, max_rank)
            layer.lora_A[name].copy_(A)
            layer.lora_B[name].copy_(B)
    return model


def _combined_factors(layer, weights: dict[str, float], how: str, rank: int,
                      max_rank: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    (a_shape, b_shape) = layer.factor_shapes(rank)
    dtype, device = layer.lora_A[next(iter(layer.lora_A))].dtype, layer.lora_A[next(iter(layer.lora_A))].device
    present = [s for s in weights if s in layer.lora_A]
    if how == "linear":
        A = sum(math.sqrt(weights[s] * layer.scaling[s]) * layer.lora_A[s] for s in present)
        B = sum(math.sqrt(weights[s] * layer.scaling[s]) * layer.lora_B[s] for s in present)
        return A, B
    if how == "cat":
        A = torch.zeros(a_shape, dtype=dtype, device=device)
        B = torch.zeros(b_shape, dtype=dtype, device=device)
        offset = 0
        for s in weights:
            if s in layer.lora_A:
                r = layer.lora_A[s].shape[0]
                A[offset:offset + r] = weights[s] * layer.scaling[s] * layer.lora_A[s]
                B[:, offset:offset + r] = layer.lora_B[s]
            offset += max_rank[s]
        return A, B
    delta = sum(weights[s] * layer.scaling[s] * (layer.lora_B[s] @ layer.lora_A[s]) for s in present)  # (out, in)
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, S.shape[0])
    A = torch.zeros(a_shape, dtype=dtype, device=device)
    B = torch.zeros(b_shape, dtype=dtype, device=device)
    A[:k] = Vh[:k].to(dtype)
    B[:, :k] = (U[:, :k] * S[:k]).to(dtype)
    return A, B
