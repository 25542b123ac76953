"""How an adapter layer reads and writes its base's weight, whatever the base stores: a plain tensor, or (through
`WeightAccess`) a quantized form such as NF4, and the dtypes adapters and merges use over it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class WeightAccess(Protocol):
    """A base layer whose weight is not a plain tensor (e.g. NF4) implements these two methods."""

    def get_dense_weight(self) -> Tensor: ...

    def set_dense_weight(self, weight: Tensor) -> None: ...


def get_dense_weight(base: nn.Module) -> Tensor:
    return base.get_dense_weight() if isinstance(base, WeightAccess) else base.weight.data


def set_dense_weight(base: nn.Module, weight: Tensor) -> None:
    if isinstance(base, WeightAccess):
        base.set_dense_weight(weight)
    else:
        base.weight.data.copy_(weight)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """Adapters train in fp32 over a half-precision or quantized base (as PEFT's autocast_adapter_dtype)."""
    dtype = torch.float32 if isinstance(base, WeightAccess) else base.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def base_device(base: nn.Module) -> torch.device:
    for t in (*base.parameters(), *base.buffers()):
        return t.device
    return torch.device("cpu")


def compute_dtype(w: Tensor) -> torch.dtype:
    """float32, or float64 for a float64 weight: what DoRA's norms run in."""
    return torch.promote_types(w.dtype, torch.float32)


def merge_dtype(w: Tensor) -> torch.dtype:
    """DoRA merges scale the weight (f * (W + delta)) and unmerges divide it again: float64 keeps that round
    trip as exact as a plain LoRA merge (one rounding, when the result is stored). MPS has no float64."""
    return torch.float32 if w.device.type == "mps" else torch.float64


def linear_features(kind: str, base: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear-like base of `kind` ('linear' or 'conv1d', transformers' Conv1D storing
    its weight (in, out)), read from its attributes, so a 4-bit base is not dequantized for it."""
    if kind == "conv1d":
        n_in, n_out = base.weight.shape
    elif hasattr(base, "in_features"):
        n_in, n_out = base.in_features, base.out_features
    else:
        n_out, n_in = get_dense_weight(base).shape
    return n_in, n_out

