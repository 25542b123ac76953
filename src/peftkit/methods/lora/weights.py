"""The shapes of LoRA's factors for a base module (read from its attributes, never dequantizing it)."""

from __future__ import annotations

from torch import nn

from ...weights import get_dense_weight


def factor_shapes(kind: str, base: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of A and B at rank r, as stored in PEFT files. For an embedding, in = num_embeddings.
    Read from the module's attributes, so a quantized base is never dequantized for it."""
    if kind == "embedding":
        n_in, n_out = base.num_embeddings, base.embedding_dim
    elif kind == "conv1d":
        n_in, n_out = base.weight.shape
    elif hasattr(base, "in_features"):
        n_in, n_out = base.in_features, base.out_features
    else:
        n_out, n_in = get_dense_weight(base).shape
    return (r, n_in), (n_out, r)
