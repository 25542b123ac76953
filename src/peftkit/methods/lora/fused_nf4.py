"""One autograd node for a frozen NF4 linear (QLoRA's base) plus one LoRA adapter, for training.

The module path runs the base through NF4Linear (dequantize, matmul, dequantize again in backward) and the
adapter through separate operations; with a bf16 model and fp32 adapters each layer also keeps its own fp32
copy of its input (x.to(A.dtype)) until backward. This node:
  - dequantizes the weight in the compute dtype inside forward, uses it for one matmul and drops it;
    backward dequantizes it again: between the two only the 4-bit buffers exist (QLoRA's memory is the point);
  - keeps x in its own dtype (one tensor, shared by q/k/v when they read the same input) and A's output (N, r);
  - writes the input gradient once (base part, then the adapter's part added in place);
  - inside `fused.real_rows`, works on the real (non-padding) positions only, as the dense node does.
It is the module's computation in a different order, with the same casts: equal within the dtypes' rounding.

Dtypes follow the module path: the base runs in the layer's compute_dtype, the adapter's A in its own dtype
(x cast to it), the output and the sum in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quant.linear import NF4Linear
from . import fused

FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def autocast_on(x: Tensor) -> bool:
    """Whether autocast is active for x's device (it would change the dtypes inside the node)."""
    return torch.is_autocast_enabled(x.device.type)


def dense_weight(base: NF4Linear, dtype: torch.dtype) -> Tensor:
    """The dequantized (out, in) weight in `dtype`, for immediate use in one matmul (on a CPU in fp32 it lives
    in a per-thread buffer that the next dequantization overwrites)."""
    return base.dense(dtype, scratch=True)


def nf4_fusable(base: nn.Module, x: Tensor, A: Tensor, dropout: float, training: bool) -> bool:
    """Whether LoraNF4Function computes exactly what the module would: an NF4Linear base without hooks, no
    active dropout, gradients wanted, floating-point input on the base's device, and no autocast."""
    return (type(base) is NF4Linear and not base._forward_hooks and not base._forward_pre_hooks
            and (dropout == 0.0 or not training) and torch.is_grad_enabled() and A.requires_grad
            and x.dtype in FLOATS and x.device == A.device == base.packed.device and not autocast_on(x))


class LoraNF4Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, base: NF4Linear, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                rows=None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        n, idx = x2.shape[0], None
        if rows is not None:
            x2, idx = rows.gather(x), rows.idx  # (M, in): the kept positions only
        cd, od = base.compute_dtype, x.dtype
        h = x2.to(A.dtype) @ A.T  # (M, r), in the adapter's dtype as the module computes it
        b = None if bias is None else bias.to(cd)
        out = F.linear(x2.to(cd), dense_weight(base, cd), b).to(od)  # (M, out); the dense weight is not kept
        out.addmm_(h.to(od), B.to(od).T, alpha=scaling)
        ctx.save_for_backward(x2, h, A, B, idx)
        ctx.base, ctx.scaling, ctx.in_shape, ctx.n = base, scaling, x.shape, n
        ctx.bias_dtype = None if bias is None else bias.dtype
        return fused.scatter_rows(out, idx, n).view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, h, A, B, idx = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, out), x's dtype
        if idx is not None:
            g = g.index_select(0, idx)  # (M, out): padding rows' gradients are zero
        od = g.dtype
        gh = torch.mm(g, B.to(od)).mul_(ctx.scaling)  # (M, r): the gradient at A's output
        grad_x = grad_bias = grad_a = grad_b = None
        if need_x:
            cd = ctx.base.compute_dtype
            gx = torch.mm(g.to(cd), dense_weight(ctx.base, cd)).to(x2.dtype)  # (M, in): the weight again
            gx.addmm_(gh.to(gx.dtype), A.to(gx.dtype))
            grad_x = fused.scatter_rows(gx, idx, ctx.n).view(ctx.in_shape)
        if need_bias and ctx.bias_dtype is not None:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if need_a:
            grad_a = gh.to(A.dtype).T @ x2.to(A.dtype)  # (r, in)
        if need_b:
            grad_b = torch.mm(g.T, h.to(od)).mul_(ctx.scaling).to(B.dtype)  # (out, r)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def lora_nf4(base: NF4Linear, x: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """base(x) + scaling * B(A(x)) through the fused node (the caller checked `nf4_fusable`)."""
    return LoraNF4Function.apply(x, base, base.bias, A, B, scaling, fused.rows_for(x))
