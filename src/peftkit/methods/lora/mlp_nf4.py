"""One autograd node for a SwiGLU MLP whose three NF4 linear layers each carry one LoRA adapter (QLoRA).

    e = gate(x),  g = up(x),  y = down(silu(e) * g)          each of gate/up/down: W x + s * B(A x), W in NF4

The same node as mlp.LoraSwiGLUFunction (keeps x, e, g and the three (N, r) adapter activations; recomputes
silu(e) * g in backward) with the weights of fused_nf4.LoraNF4Function: each is dequantized in the compute
dtype for the one matmul that needs it, and again in backward; no dense weight lives between the two.
mlp.fused_mlps dispatches here (`nf4_swiglu`) when the projections are LoRA layers over bias-free NF4Linear
bases. Dtypes follow the module path: x in the bases' compute dtype, adapters in their own dtype.
Equal to the module's own computation within the dtypes' rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quant.linear import NF4Linear
from . import fused
from .fused_nf4 import dense_weight, nf4_fusable
from .layer import LoraLayer


def _adapted(x2: Tensor, base: NF4Linear, A: Tensor, B: Tensor, s: float) -> tuple[Tensor, Tensor]:
    """(W x + s B(A x), A x) for rows x2 (M, in): (M, out) in x's dtype, (M, r) in A's dtype."""
    h = x2.to(A.dtype) @ A.T  # (M, r)
    return F.linear(x2, dense_weight(base, x2.dtype)).addmm_(h.to(x2.dtype), B.to(x2.dtype).T, alpha=s), h


class LoraNF4SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows, bases: tuple[NF4Linear, NF4Linear, NF4Linear], ag: Tensor, bg: Tensor,
                au: Tensor, bu: Tensor, ad: Tensor, bd: Tensor, scales: tuple[float, float, float]) -> Tensor:
        gate, up, down = bases
        sg, su, sd = scales
        n = x.shape[:-1].numel()
        x2 = rows.gather(x) if rows is not None else x.reshape(-1, x.shape[-1])  # (M, in)
        e, hg = _adapted(x2, gate, ag, bg, sg)  # (M, I), (M, r)
        g, hu = _adapted(x2, up, au, bu, su)  # (M, I), (M, r)
        y, hd = _adapted(F.silu(e).mul_(g), down, ad, bd, sd)  # (M, out), (M, r); silu(e) * g is freed here
        idx = rows.idx if rows is not None else None
        ctx.save_for_backward(x2, e, g, hg, hu, hd, ag, bg, au, bu, ad, bd, idx)
        ctx.bases, ctx.scales, ctx.in_shape, ctx.n = bases, scales, x.shape, n
        return fused.scatter_rows(y, idx, n).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, e, g, hg, hu, hd, ag, bg, au, bu, ad, bd, idx = ctx.saved_tensors
        gate, up, down = ctx.bases
        sg, su, sd = ctx.scales
        need = ctx.needs_input_grad
        dt, at = x2.dtype, ag.dtype
        dy = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if idx is not None:
            dy = dy.index_select(0, idx)  # (M, out)
        silu = F.silu(e)  # (M, I), as the forward computed it
        dhd = torch.mm(dy, bd.to(dt)).mul_(sd)  # (M, r)
        grad_ad = dhd.to(at).T @ (silu * g).to(at) if need[7] else None  # (r, I)
        grad_bd = torch.mm(dy.T, hd.to(dt)).mul_(sd).to(at) if need[8] else None  # (out, r)
        dh = torch.mm(dy, dense_weight(down, dt)).addmm_(dhd, ad.to(dt))  # (M, I)
        dg = dh * silu  # (M, I)
        del silu
        de = torch.ops.aten.silu_backward(dh.mul_(g), e)  # (M, I): dh * g * silu'(e), as autograd computes it
        del dh
        dhg = torch.mm(de, bg.to(dt)).mul_(sg)  # (M, r)
        dhu = torch.mm(dg, bu.to(dt)).mul_(su)  # (M, r)
        grad_x = None
        if need[0]:
            gx = torch.mm(de, dense_weight(gate, dt)).addmm_(dhg, ag.to(dt))  # (M, in)
            gx.addmm_(dg, dense_weight(up, dt)).addmm_(dhu, au.to(dt))
            grad_x = fused.scatter_rows(gx, idx, ctx.n).view(ctx.in_shape)
        xa = x2.to(at) if need[3] or need[5] else None  # (M, in) in the adapters' dtype
        grad_ag = dhg.to(at).T @ xa if need[3] else None
        grad_bg = torch.mm(de.T, hg.to(dt)).mul_(sg).to(at) if need[4] else None
        grad_au = dhu.to(at).T @ xa if need[5] else None
        grad_bu = torch.mm(dg.T, hu.to(dt)).mul_(su).to(at) if need[6] else None
        return grad_x, None, None, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd, None


def _parts(layer: nn.Module, x: Tensor) -> tuple[NF4Linear, Tensor, Tensor, float] | None:
    """(NF4 base, A, B, scaling) of a LoRA layer that the node can run exactly, else None."""
    if not isinstance(layer, LoraLayer) or layer.peftkit_kind != "linear" or layer.disabled:
        return None
    if layer.row_adapters is not None or len(layer.pending) != 1 or layer.lora_magnitude_vector:
        return None
    name = layer.pending[0]
    base, A = layer.base, layer.lora_A[name]
    if not nf4_fusable(base, x, A, layer.dropout[name], layer.training) or base.bias is not None:
        return None
    return base, A, layer.lora_B[name], layer.scaling[name]


def nf4_swiglu(layers: tuple[nn.Module, nn.Module, nn.Module], x: Tensor) -> Tensor | None:
    """down(silu(gate(x)) * up(x)) through LoraNF4SwiGLUFunction, or None when the (gate, up, down) LoRA layers
    are not all over bias-free NF4 bases that the node runs exactly (x in their compute dtype, adapters in one
    dtype, matching shapes); the caller then runs the module's own forward."""
    parts = [_parts(layer, x) for layer in layers]
    if any(p is None for p in parts):
        return None
    (gate, ag, bg, sg), (up, au, bu, su), (down, ad, bd, sd) = parts
    if any(b.compute_dtype != x.dtype for b in (gate, up, down)) or len({ag.dtype, au.dtype, ad.dtype}) != 1:
        return None
    if down.in_features != gate.out_features or up.out_features != gate.out_features:
        return None
    return LoraNF4SwiGLUFunction.apply(x, fused.rows_for(x), (gate, up, down), ag, bg, au, bu, ad, bd, (sg, su, sd))
