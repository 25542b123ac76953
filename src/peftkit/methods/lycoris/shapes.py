"""The geometry LoHa and LoKr read from a base layer, and the shapes of their factors (HF PEFT's, so that files
carry over). One place for these shapes: the layer creates its factors from them, the loader checks a file's
tensors against them and the planner counts them.

    Geometry(kind, out, inp, kernel)    inp is in_features, or in_channels // groups for a convolution;
                                        kernel is () for a linear layer, (k,) for nn.Conv1d, (kh, kw) for nn.Conv2d

"effective" below is PEFT's use_effective_conv2d (the FedPara CP decomposition of a k x k kernel, the `hada_t*` /
`lokr_t2` cores): it applies to convolutions whose kernel is larger than 1 only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ...targeting import adaptable_kind
from ...weights import get_dense_weight

KINDS = ("linear", "conv1d", "conv2d")  # linear-like layers (nn.Linear, an NF4 linear), torch's nn.Conv1d and nn.Conv2d


@dataclass(frozen=True)
class Geometry:
    """What the factor shapes depend on; `weight_shape` is the base weight's (out, in[, k...])."""

    kind: str
    out: int
    inp: int
    kernel: tuple[int, ...] = ()

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out, self.inp, *self.kernel)

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (torch's nn.Conv1d) or 'conv2d' for a layer LoHa/LoKr can wrap, else None. transformers'
    Conv1D (GPT-2's linear layers, stored transposed) is None: HF PEFT's LoHa and LoKr refuse it too."""
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if adaptable_kind(module) == "linear":
        return "linear"
    return None


def geometry(base: nn.Module, kind: str) -> Geometry:
    """The base layer's geometry (a 4-bit base is not dequantized when it says its features)."""
    if kind == "linear":
        if hasattr(base, "in_features"):
            return Geometry(kind, base.out_features, base.in_features)
        out, inp = get_dense_weight(base).shape
        return Geometry(kind, out, inp)
    return Geometry(kind, base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size))


def effective(geo: Geometry, use_effective_conv2d: bool) -> bool:
    """Whether the CP decomposition applies: asked for, and a convolution whose kernel is not 1 (PEFT's rule)."""
    return use_effective_conv2d and geo.kind != "linear" and geo.kernel_size != 1


def loha_shapes(geo: Geometry, r: int, use_effective_conv2d: bool) -> dict[str, tuple[int, ...]]:
    """LoHa's factors: delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r over the weight flattened to (out, in*k);
    with the CP cores, each product is t contracted with its (r, out) and (r, in) factors instead."""
    if effective(geo, use_effective_conv2d):
        core = (r, r, *geo.kernel) if geo.kind == "conv2d" else (r, r, geo.kernel[0], 1)
        return {"hada_w1_a": (r, geo.out), "hada_w1_b": (r, geo.inp), "hada_t1": core,
                "hada_w2_a": (r, geo.out), "hada_w2_b": (r, geo.inp), "hada_t2": core}
    cols = geo.inp * geo.kernel_size
    return {"hada_w1_a": (geo.out, r), "hada_w1_b": (r, cols), "hada_w2_a": (geo.out, r), "hada_w2_b": (r, cols)}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: `factor` and dimension / factor when `factor` divides it; otherwise the
    divisor pair closest to the square root whose smaller side does not exceed `factor` (any, for -1). PEFT's
    (and LyCORIS') rule: e.g. 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127), 128 with factor 4 -> (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = m + 1
        while dimension % nxt:
            nxt += 1
        if nxt + dimension // nxt > m + n or nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return (n, m) if m > n else (m, n)


def lokr_split(geo: Geometry, r: int, decompose_both: bool, decompose_factor: int) -> tuple[int, int, int, int, bool, bool]:
    """(a, b, c, d, w1 full, w2 full): out = a * b and in = c * d; delta = kron(w1 (a, c), w2 (b, d[, k...])).
    w1 is one full matrix unless decompose_both and r < max(a, c) / 2; w2 is full when r >= max(b, d) / 2."""
    a, b = factorization(geo.out, decompose_factor)
    c, d = factorization(geo.inp, decompose_factor)
    return a, b, c, d, not (decompose_both and r < max(a, c) / 2), r >= max(b, d) / 2


def lokr_shapes(geo: Geometry, r: int, use_effective_conv2d: bool, decompose_both: bool,
                decompose_factor: int) -> dict[str, tuple[int, ...]]:
    """LoKr's factors, by PEFT's rules (lokr_split); a decomposed w2 of a convolution is CP (`lokr_t2`) when
    effective, else (b, r) @ (r, d * k)."""
    a, b, c, d, full_w1, full_w2 = lokr_split(geo, r, decompose_both, decompose_factor)
    shapes = {"lokr_w1": (a, c)} if full_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if full_w2:
        shapes["lokr_w2"] = (b, d, *geo.kernel)
    elif effective(geo, use_effective_conv2d):
        core = (r, r, *geo.kernel) if geo.kind == "conv2d" else (r, r, geo.kernel[0], 1)
        shapes.update({"lokr_w2_a": (r, b), "lokr_w2_b": (r, d), "lokr_t2": core})
    else:
        shapes.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * geo.kernel_size)})
    return shapes
