"""One autograd node for a SwiGLU MLP whose three linear layers each carry one LoRA adapter, for training.

    e = gate(x),  g = up(x),  y = down(silu(e) * g)          each of gate/up/down: W x + s * B(A x)

Autograd through the module keeps, per layer, gate's output, silu's output, up's output and their product:
four (N, intermediate) tensors, the largest activations of a Llama block. This node keeps e and g only and
recomputes silu(e) * g in backward (as Unsloth's fused LoRA MLP does), plus x and the three thin (N, r)
adapter activations. Inside `fused.real_rows` it works on the kept positions only, like the fused
linear node. Equal to the module's own computation within float rounding. Over a 16-bit base with fp32
adapters it makes the module path's casts (see fused.py): the base matmuls, SiLU and the product in the base's
dtype, the adapters' A products in fp32, and A's and B's gradients returned in fp32.

`fused_mlps(model)` swaps the forward of every eligible MLP for the block's duration (the training loss
uses it); a module is eligible when `hf.mlp_kind` says 'swiglu' (a verified gated-MLP class with SiLU) and
nothing hooks it, and at call time its three projections must be LoRA layers over plain bias-free nn.Linear
bases with exactly one active, fusable adapter. The swap is an instance attribute `forward` (removed again
after the block): hooks cannot skip a module's own computation, and replacing the module in its parent would
change the model's tree under the user (and under FSDP's hooks) for the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import hf
from . import fused
from .layer import LoraLayer
from .mlp_nf4 import nf4_swiglu


class LoraSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows, wg: Tensor, ag: Tensor, bg: Tensor, wu: Tensor, au: Tensor, bu: Tensor,
                wd: Tensor, ad: Tensor, bd: Tensor, scales: tuple[float, float, float]) -> Tensor:
        sg, su, sd = scales
        n, od, adt = x.shape[:-1].numel(), x.dtype, ag.dtype
        x2 = rows.gather(x) if rows is not None else x.reshape(-1, x.shape[-1])  # (M, in)
        xa = x2.to(adt)  # (M, in) in the adapters' dtype: x2 itself when they match, else a copy dropped below
        hg, hu = xa @ ag.T, xa @ au.T  # (M, r) each
        del xa
        e = F.linear(x2, wg).addmm_(hg.to(od), bg.to(od).T, alpha=sg)  # (M, I)
        g = F.linear(x2, wu).addmm_(hu.to(od), bu.to(od).T, alpha=su)  # (M, I)
        h = F.silu(e).mul_(g)  # (M, I); freed after this forward, recomputed in backward
        hd = h.to(adt) @ ad.T  # (M, r)
        y = F.linear(h, wd).addmm_(hd.to(od), bd.to(od).T, alpha=sd)  # (M, out)
        idx = rows.idx if rows is not None else None
        ctx.save_for_backward(x2, e, g, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd, idx)
        ctx.scales, ctx.in_shape, ctx.n = scales, x.shape, n
        return fused.scatter_rows(y, idx, n).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, e, g, hg, hu, hd, wg, ag, bg, wu, au, bu, wd, ad, bd, idx = ctx.saved_tensors
        sg, su, sd = ctx.scales
        need = ctx.needs_input_grad
        dy = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if idx is not None:
            dy = dy.index_select(0, idx)  # (M, out)
        od, adt = dy.dtype, ag.dtype
        silu = F.silu(e)  # (M, I), as the forward computed it
        dhd = torch.mm(dy, bd.to(od)).mul_(sd)  # (M, r)
        grad_ad = dhd.to(adt).T @ (silu * g).to(adt) if need[9] else None  # (r, I)
        grad_bd = torch.mm(dy.T, hd.to(od)).mul_(sd).to(bd.dtype) if need[10] else None  # (out, r)
        dh = torch.mm(dy, wd).addmm_(dhd, ad.to(od))  # (M, I)
        dg = dh * silu  # (M, I)
        del silu
        de = torch.ops.aten.silu_backward(dh.mul_(g), e)  # (M, I): dh * g * silu'(e), as autograd computes it
        del dh
        dhg = torch.mm(de, bg.to(od)).mul_(sg)  # (M, r)
        dhu = torch.mm(dg, bu.to(od)).mul_(su)  # (M, r)
        grad_x = None
        if need[0]:
            gx = torch.mm(de, wg).addmm_(dhg, ag.to(od)).addmm_(dg, wu).addmm_(dhu, au.to(od))  # (M, in)
            grad_x = fused.scatter_rows(gx, idx, ctx.n).view(ctx.in_shape)
        xa = x2.to(adt) if need[3] or need[6] else None  # (M, in)
        grad_ag = dhg.to(adt).T @ xa if need[3] else None
        grad_bg = torch.mm(de.T, hg.to(od)).mul_(sg).to(bg.dtype) if need[4] else None
        grad_au = dhu.to(adt).T @ xa if need[6] else None
        grad_bu = torch.mm(dg.T, hu.to(od)).mul_(su).to(bu.dtype) if need[7] else None
        return (grad_x, None, None, grad_ag, grad_bg, None, grad_au, grad_bu, None, grad_ad, grad_bd, None)


def _parts(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, float] | None:
    """(W, A, B, scaling) of a LoRA layer that the fused node can run exactly, else None."""
    if not isinstance(layer, LoraLayer) or layer.peftkit_kind != "linear" or layer.disabled:
        return None
    if layer.row_adapters is not None or len(layer.pending) != 1 or layer.lora_magnitude_vector:
        return None
    name = layer.pending[0]
    base, A = layer.base, layer.lora_A[name]
    if base.bias is not None or not fused.fusable(base, x, A, layer.dropout[name], layer.training):
        return None
    if base.weight.requires_grad:  # a trainable base (full fine-tuning of it) takes the module's own path
        return None
    return base.weight, A, layer.lora_B[name], layer.scaling[name]


def _eligible(mlp: nn.Module) -> bool:
    return hf.mlp_kind(mlp) == "swiglu" and not mlp._forward_hooks and not mlp._forward_pre_hooks


def _fused_forward(mlp: nn.Module, original):
    def forward(x: Tensor) -> Tensor:
        parts = [_parts(layer, x) for layer in hf.swiglu_projections(mlp)]
        if any(p is None for p in parts) or parts[2][0].shape[1] != parts[0][0].shape[0]:
            out = nf4_swiglu(hf.swiglu_projections(mlp), x)  # QLoRA: NF4 bases
            return original(x) if out is None else out
        (wg, ag, bg, sg), (wu, au, bu, su), (wd, ad, bd, sd) = parts
        return LoraSwiGLUFunction.apply(x, fused.rows_for(x), wg, ag, bg, wu, au, bu, wd, ad, bd, (sg, su, sd))

    return forward


@contextmanager
def fused_mlps(model: nn.Module) -> Iterator[int]:
    """Within the block every eligible SwiGLU MLP of `model` runs as one LoraSwiGLUFunction node (when its
    layers allow it at call time; otherwise its own forward). Yields how many MLPs were switched."""
    switched = []
    for module in model.modules():
        if _eligible(module) and "forward" not in module.__dict__:
            module.forward = _fused_forward(module, module.forward)
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
