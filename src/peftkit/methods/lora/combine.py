"""Combine LoRA adapters into a new one: an exact weighted sum ("cat"), its SVD truncation, or PEFT's "linear"."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...inject import inject
from ...merge import merged_adapters
from ...record import configs, require_adapter
from .config import LoraConfig
from .layer import lora_layers


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
    # an attention's out_proj layer (not a holder of its own) or a grouped convolution: not a plain sum of B @ A
    odd = [p for p, l in layers if not l.peftkit_holder or (l.peftkit_kind == "conv" and l.base.groups > 1)]
    if odd:
        raise ValueError(f"combine works on linear, embedding and ungrouped convolution layers; the adapters sit on "
                         f"{odd} (nn.MultiheadAttention, grouped convolutions): combine adapters without them")
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
    delta = sum(weights[s] * layer.scaling[s] * (layer.lora_B[s].flatten(1) @ layer.lora_A[s].flatten(1))
                for s in present)  # (out, in); a convolution's (out, in * prod(kernel))
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, S.shape[0])
    A = torch.zeros(a_shape, dtype=dtype, device=device)
    B = torch.zeros(b_shape, dtype=dtype, device=device)
    A[:k] = Vh[:k].reshape(k, *a_shape[1:]).to(dtype)
    B[:, :k] = (U[:, :k] * S[:k]).reshape(b_shape[0], k, *b_shape[2:]).to(dtype)
    return A, B
