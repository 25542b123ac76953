"""The shapes of LoRA's factors for a base module (read from its attributes, never dequantizing it)."""

from __future__ import annotations

import math

from torch import nn

from ...weights import get_dense_weight
from . import conv


def factor_shapes(kind: str, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B at rank r, as stored in PEFT files. For an embedding, in = num_embeddings; for a torch
    convolution A is (r, in, *kernel) and B (out, r / groups, 1, ...); for nn.MultiheadAttention these are the
    in_proj factors, (r, embed_dim) and (3 * embed_dim, r) (its out_proj has a linear adapter of its own).
    Read from the module's attributes, so a quantized base is never dequantized for it."""
    if kind == "conv":
        return conv.factor_shapes(base, r)
    if kind == "mha":
        return (r, base.embed_dim), (3 * base.embed_dim, r)
    if kind == "embedding":
        n_in, n_out = base.num_embeddings, base.embedding_dim
    elif kind == "conv1d":
        n_in, n_out = base.weight.shape
    elif hasattr(base, "in_features"):
        n_in, n_out = base.in_features, base.out_features
    else:
        n_out, n_in = get_dense_weight(base).shape
    return (r, n_in), (n_out, r)


def parameter_count(kind: str, base: nn.Module, r: int) -> int:
    """How many numbers one LoRA adapter of rank r adds to a module of `kind` (A and B; with nn.MultiheadAttention
    its out_proj's A and B too)."""
    a_shape, b_shape = factor_shapes(kind, base, r)
    count = math.prod(a_shape) + math.prod(b_shape)
    if kind == "mha":
        count += r * 2 * base.embed_dim
    return count
