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
        h = x2 @ A.T  # (M, r)
        out = F.linear(x2, weight, bias).addmm_(h, B.T, alpha=scaling)  # (M, out)
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
        gh = torch.mm(g, B).mul_(ctx.scaling)  # (M, r): the gradient at A's output
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = scatter_rows(torch.mm(g, weight).addmm_(gh, A), idx, ctx.n).view(ctx.in_shape)  # (N, in)
        if need_w:
            grad_w = g.T @ x2
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = gh.T @ x2  # (r, in)
        if need_bb:
            grad_b = torch.mm(g.T, h).mul_(ctx.scaling)  # (out, r)
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


def fusable(base: nn.Module, x: Tensor, A: Tensor, dropout: float, training: bool) -> bool:
    """Whether the fused node computes exactly what the module would: a plain nn.Linear (no hooks, so no
    FSDP or user hook is bypassed), no active dropout, one dtype throughout (and no autocast, which would
    change the dtypes inside the node), and gradients wanted."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and (dropout == 0.0 or not training) and torch.is_grad_enabled() and A.requires_grad
            and x.dtype == A.dtype == base.weight.dtype and x.device == A.device and not _autocast_on(x))
