"""What differs between LoHa and LoKr, as data the shared layer, loader and planner use: the tensor names, their
shapes, their initialisation, and how they make the weight update (`delta`, in the base weight's layout up to a
reshape: (out, in * k) or (out, in, kh, kw)).

    LoHa  delta = (w1_a @ w1_b) * (w2_a @ w2_b) * scale              Hadamard product of two rank-r products
          (CP) delta = (t1 x w1_a x w1_b) * (t2 x w2_a x w2_b) * scale   each a Tucker/CP rebuild of a k x k kernel
    LoKr  delta = kron(w1, w2) * scale                                 w1 (a, c) and w2 (b, d[, k...]), each full
          or a rank-r product (w2 also CP with lokr_t2)

The maths follows HF PEFT's tuners (loha/layer.py, lokr/layer.py) so that the same tensors give the same update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .shapes import Geometry, loha_shapes, lokr_shapes


class HadamardProduct(torch.autograd.Function):
    """((w1_a @ w1_b) * (w2_a @ w2_b)) * scale, saving only the four factors for backward: the two (out, in)
    products are rebuilt there instead of being kept alive between forward and backward (2 dense matrices per
    adapted layer less; FedPara's and PEFT's choice)."""

    @staticmethod
    def forward(ctx: Any, w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale  # (out, in)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)  # d loss / d (w1_a @ w1_b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def cp_rebuild(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """A kernel from its CP core t (r, r, kh, kw) and mode factors wa (r, out), wb (r, in): (out, in, kh, kw)."""
    return torch.einsum("i j k l, i p, j q -> p q k l", t, wa, wb)


def loha_delta(p: Mapping[str, Tensor], scale: float) -> Tensor:
    if "hada_t1" in p:
        return cp_rebuild(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * \
            cp_rebuild(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]) * scale
    return HadamardProduct.apply(p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], scale)


def lokr_delta(p: Mapping[str, Tensor], scale: float) -> Tensor:
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]  # (a, c)
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]  # (b, d[, k...])
    elif "lokr_t2" in p:
        w2 = cp_rebuild(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])  # (b, d, kh, kw)
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]  # (b, d * k)
    if w2.dim() == 4:  # as PEFT: only a 4-d w2 gets w1 as (a, c, 1, 1); kron pads a shorter operand in front
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # plain row-major strides: torch.kron fails on einsum's odd stride for a trailing size-1 dimension (a CP w2 of
    # an nn.Conv1d, (b, d, k, 1)), which .contiguous() leaves as it is; HF PEFT 0.21 raises there
    return torch.kron(_row_major(w1), _row_major(w2)) * scale  # (a * b, c * d[, ...])


def _row_major(t: Tensor) -> Tensor:
    return t.reshape(-1).view(t.shape)


def _kaiming(p: Tensor) -> None:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))


@torch.no_grad()
def loha_init(params: Mapping[str, nn.Parameter], mode: bool | str) -> None:
    """True: w2_b at zero, the rest He-uniform (the update starts at exactly zero); False: all He-uniform."""
    for name, p in params.items():
        if mode is True and name == "hada_w2_b":
            nn.init.zeros_(p)
        else:
            _kaiming(p)


@torch.no_grad()
def lokr_init(params: Mapping[str, nn.Parameter], mode: bool | str) -> None:
    """True: w1 (or w1_a) at zero; "lycoris": w2 (or w2_b) at zero; False: nothing at zero. Others He-uniform."""
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(mode, ())
    for name, p in params.items():
        if name in zero:
            nn.init.zeros_(p)
        else:
            _kaiming(p)


@dataclass(frozen=True)
class Family:
    """One LyCORIS method as the shared code sees it."""

    peft_type: str
    label: str
    tensor_names: tuple[str, ...]  # every tensor it may hold: its file-key suffixes and ParameterDict names
    shapes: Callable[[Geometry, int, Any], dict[str, tuple[int, ...]]]  # (geometry, r, config)
    delta: Callable[[Mapping[str, Tensor], float], Tensor]
    init: Callable[[Mapping[str, nn.Parameter], bool | str], None]
    rescales_rank_dropout: Callable[[Any], bool]  # whether kept rows are divided by the kept share


LOHA = Family(
    peft_type="LOHA", label="LoHa",
    tensor_names=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    shapes=lambda geo, r, c: loha_shapes(geo, r, c.use_effective_conv2d),
    delta=loha_delta, init=loha_init, rescales_rank_dropout=lambda c: True,
)

LOKR = Family(
    peft_type="LOKR", label="LoKr",
    tensor_names=("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    shapes=lambda geo, r, c: lokr_shapes(geo, r, c.use_effective_conv2d, c.decompose_both, c.decompose_factor),
    delta=lokr_delta, init=lokr_init, rescales_rank_dropout=lambda c: c.rank_dropout_scale,
)

FAMILIES = {f.peft_type: f for f in (LOHA, LOKR)}
