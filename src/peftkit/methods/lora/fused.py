"""One autograd node for a frozen nn.Linear plus one LoRA adapter, for training.

Autograd on `base(x) + scaling * B(A(x))` builds a node per operation and, in backward, two input
gradients (base and adapter) that it then adds: an extra (N, in) buffer and a pass over it per layer.
Here the forward is one matmul for the base and two thin ones for the adapter, with the scale folded
into the last (addmm's alpha); the backward writes the input gradient once (grad @ W, then the adapter's
part added in place by addmm_) and keeps only x and A's output (N, r), as the plain version does.
The result is the same computation in a different order: equal to the plain path within float rounding.

Padding-free rows (`real_rows`): in a padded training batch the padding positions' outputs reach the
loss through nothing (attention masks them out as keys, and they carry no label), so their gradients are
exactly zero. Inside `with real_rows(attention_mask):` the node runs its matmuls only on the real
positions (M of the N rows), writes zeros at the padding positions (finite, so masked attention stays
exact) and keeps only the M real rows for backward: the same loss and gradients for less work.

A 16-bit base (bf16 or fp16) with fp32 adapters (PEFT's `autocast_adapter_dtype`) runs here too, with the casts
the module path makes: the base matmul in the base's dtype, A's product in fp32 (x cast to it; the saved x stays
in its own dtype, so no fp32 copy of the input is kept for backward), B's product and the sum in the output's
dtype, and gradients of A and B returned in fp32 for the fp32 master weights. With one dtype throughout every
cast is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

class _Rows:
    """The kept positions (idx, (M,)) of an n-position batch, and the last input gathered at them: q/k/v (and
    gate/up) read the same input, and one gathered copy saved for all of them costs a third of three."""

    def __init__(self, idx: Tensor, n: int) -> None:
        self.idx, self.n = idx, n
        self.last: tuple[Tensor, int, Tensor] | None = None  # (input, its version, its kept rows)

    def gather(self, x: Tensor) -> Tensor:
        """x (..., in) at the kept positions, (M, in); the same tensor again for the same, unchanged x."""
        last = self.last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        picked = x.reshape(-1, x.shape[-1]).index_select(0, self.idx)  # (M, in)
        self.last = (x, x._version, picked)
        return picked


_ROWS: ContextVar[_Rows | None] = ContextVar("peftkit_real_rows", default=None)


@contextmanager
def real_rows(keep: Tensor | None, min_saving: float = 0.02) -> Iterator[None]:
    """Within the block, fused LoRA nodes whose input has keep.numel() positions compute only the positions
    where `keep` (an attention mask, or a boolean (B, T) mask) is non-zero; see the module docstring. Nothing
    changes when (almost) nothing is skipped: below `min_saving` of the positions, gathering costs more than
    it saves."""
    rows = None
    if keep is not None and keep.dim() == 2:
        flat = keep.reshape(-1) != 0
        n, m = flat.numel(), int(flat.sum())
        if 0 < m <= n * (1.0 - min_saving):
            rows = _Rows(flat.nonzero().flatten(), n)  # (M,) indices of the kept positions in the flattened batch
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def scatter_rows(values: Tensor, idx: Tensor | None, n: int) -> Tensor:
    """values (M, d) placed at rows idx of an (n, d) zero tensor; values itself when idx is None."""
    if idx is None:
        return values
    return values.new_zeros((n, values.shape[1])).index_copy_(0, idx, values)


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                rows: _Rows | None = None) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        n, idx = x2.shape[0], None
        if rows is not None:
            x2, idx = rows.gather(x), rows.idx  # (M, in): the kept positions only
        od = x.dtype
        h = x2.to(A.dtype) @ A.T  # (M, r), in the adapter's dtype
        out = F.linear(x2, weight, bias).addmm_(h.to(od), B.to(od).T, alpha=scaling)  # (M, out), x's dtype
        ctx.save_for_backward(x2, h, weight, A, B, idx)
        ctx.scaling, ctx.in_shape, ctx.has_bias, ctx.n = scaling, x.shape, bias is not None, n
        return scatter_rows(out, idx, n).view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, h, weight, A, B, idx = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if idx is not None:
            g = g.index_select(0, idx)  # (M, out): padding rows' gradients are zero
        od, ad = g.dtype, A.dtype
        gh = torch.mm(g, B.to(od)).mul_(ctx.scaling)  # (M, r): the gradient at A's output, in g's dtype
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            gx = torch.mm(g, weight).addmm_(gh, A.to(od))  # (M, in)
            grad_x = scatter_rows(gx, idx, ctx.n).view(ctx.in_shape)  # (N, in)
        if need_w:
            grad_w = g.T @ x2
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = gh.to(ad).T @ x2.to(ad)  # (r, in), in the adapter's dtype
        if need_bb:
            grad_b = torch.mm(g.T, h.to(od)).mul_(ctx.scaling).to(B.dtype)  # (out, r)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def rows_for(x: Tensor) -> _Rows | None:
    """The kept positions set by `real_rows`, if they apply to an input of x's shape."""
    rows = _ROWS.get()
    if rows is None or x.dim() < 2 or x.shape[:-1].numel() != rows.n or rows.idx.device != x.device:
        return None
    return rows


def _autocast_on(x: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # older torch: one flag
        return torch.is_autocast_enabled()


HALF = (torch.bfloat16, torch.float16)


def dtypes_fusable(x_dtype: torch.dtype, base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Whether the fused nodes run this mix of dtypes: the input in the base's dtype, and the adapter in that
    dtype too, or in fp32 over a 16-bit base (PEFT's default for bf16 / fp16 models)."""
    return x_dtype == base_dtype and (adapter_dtype == base_dtype
                                      or (base_dtype in HALF and adapter_dtype == torch.float32))


def fusable(base: nn.Module, x: Tensor, A: Tensor, dropout: float, training: bool) -> bool:
    """Whether the fused node computes exactly what the module would: a plain nn.Linear (no hooks, so no
    FSDP or user hook is bypassed), no active dropout, dtypes it runs (`dtypes_fusable`; and no autocast,
    which would change the dtypes inside the node), and gradients wanted."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and (dropout == 0.0 or not training) and torch.is_grad_enabled() and A.requires_grad
            and dtypes_fusable(x.dtype, base.weight.dtype, A.dtype) and x.device == A.device
            and not _autocast_on(x))
