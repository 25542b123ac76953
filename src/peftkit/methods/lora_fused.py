"""One autograd node for a frozen nn.Linear plus one LoRA adapter, for training.

Autograd on `base(x) + scaling * B(A(x))` builds a node per operation and, in backward, two input
gradients (base and adapter) that it then adds: an extra (N, in) buffer and a pass over it per layer.
Here the forward is one matmul for the base and two thin ones for the adapter, with the scale folded
into the last (addmm's alpha); the backward writes the input gradient once (grad @ W, then the adapter's
part added in place by addmm_) and keeps only x and A's output (N, r), as the plain version does.
The result is the same computation in a different order: equal to the plain path within float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2 @ A.T  # (N, r)
        out = F.linear(x2, weight, bias).addmm_(h, B.T, alpha=scaling)  # (N, out)
        ctx.save_for_backward(x2, h, weight, A, B)
        ctx.scaling, ctx.in_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, h, weight, A, B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = torch.mm(g, B).mul_(ctx.scaling)  # (N, r): the gradient at A's output
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(g, weight).addmm_(gh, A).view(ctx.in_shape)  # (N, in), one buffer
        if need_w:
            grad_w = g.T @ x2
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = gh.T @ x2  # (r, in)
        if need_bb:
            grad_b = torch.mm(g.T, h).mul_(ctx.scaling)  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def fusable(base: nn.Module, x: Tensor, A: Tensor, dropout: float, training: bool) -> bool:
    """Whether the fused node computes exactly what the module would: a plain nn.Linear (no hooks, so no
    FSDP or user hook is bypassed), no active dropout, one dtype throughout, and gradients wanted."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and (dropout == 0.0 or not training) and torch.is_grad_enabled() and A.requires_grad
            and x.dtype == A.dtype == base.weight.dtype and x.device == A.device)
