"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021): a small residual MLP on a module's output.

    h' = h + up(act(down(h)))        down: hidden -> hidden // reduction_factor, up: back; up starts at zero

The layer WRAPS a targeted module (kept as `.base`, like LoraLayer) and adapts its output (element 0 of a
tuple output, as attention blocks return). Houlsby: an adapter after the attention block and one after the
feed-forward block of every layer; Pfeiffer: the second only. The default targets (peftkit.hf) are the blocks' last projections:
in transformers' Llama family `o_proj` / `down_proj` are the last operations of `self_attn` / `mlp`, so their
outputs ARE the blocks' outputs, bit for bit; wrapping the linears (not the blocks) leaves every other module's
path where it was (LoRA on q/v, base checkpoint names) and gives the size from `out_features`. In GPT-2 the
block's residual dropout follows `c_proj`, so the adapter runs before it (identical at inference). Any module
can be targeted (a list or a regex, LoRA's rules) if its output's last dimension is the model's hidden size.

Active adapters run one after another in the given order (AdapterHub's "Stack"); `per_row` gives each row its
own. The non-linearity means an adapter cannot be merged into the base weights: `merge` refuses. Parameters are
`<module path>.bottleneck.<adapter>.{down,up}.{weight,bias}`; files drop the adapter name (bottleneck_io).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...record import RoutedHolder
from .config import NON_LINEARITIES

MERGE_REFUSAL = ("bottleneck adapters {names} cannot be merged into the base weights: the non-linearity between "
                 "their down- and up-projection means no change of the wrapped module's weights computes the same. "
                 "Keep them unmerged (they cost one small MLP per wrapped module), or train LoRA when a merged, "
                 "zero-latency model is needed")


def bottleneck_dim(size: int, reduction_factor: float) -> int:
    return int(size // reduction_factor)


class Bottleneck(nn.Module):
    """One adapter's weights: down (dim x size), up (size x dim), both with biases. forward gives the delta."""

    def __init__(self, size: int, dim: int, non_linearity: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(size, dim, device=device, dtype=dtype)
        self.up = nn.Linear(dim, size, device=device, dtype=dtype)
        self.non_linearity = non_linearity

    @torch.no_grad()
    def reset(self) -> None:
        """down: nn.Linear's kaiming-uniform, zero bias; up: all zero, so the delta starts exactly 0."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, h: Tensor) -> Tensor:
        return self.up(NON_LINEARITIES[self.non_linearity](self.down(h)))  # (B, T, dim) -> (B, T, size)


def _param_like(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the base; adapters train in fp32 over a half-precision or quantized base (as LoRA's)."""
    for t in (*base.parameters(), *base.buffers()):
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        return t.device, dtype
    return torch.device("cpu"), torch.float32


class BottleneckLayer(RoutedHolder, nn.Module):
    """Wraps one module; holds any number of named bottleneck adapters applied to its output."""

    peftkit_wrapper = True
    peftkit_peft_type = "BOTTLENECK"  # the method whose wrapper this is
    peftkit_holder = True

    def __init__(self, base: nn.Module, size: int, path: str = "") -> None:
        super().__init__()
        self.base = base
        self.size = size  # last dimension of the base's output, the hidden size
        self.path = path  # for error messages
        self.bottleneck = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.pending: tuple[str, ...] = ()  # active and present here: what forward applies, in order
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "bottleneck" in self._modules:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, reduction_factor: float, non_linearity: str, init: bool = True) -> None:
        if name in self.bottleneck:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        device, dtype = _param_like(self.base)
        adapter = Bottleneck(self.size, bottleneck_dim(self.size, reduction_factor), non_linearity, device, dtype)
        if init:
            adapter.reset()
        self.bottleneck[name] = adapter

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.bottleneck[name].parameters())

    def _drop(self, name: str) -> None:
        del self.bottleneck[name]

    def adapter_names(self) -> list[str]:
        return list(self.bottleneck.keys())

    def merge(self, name: str) -> None:
        raise ValueError(MERGE_REFUSAL.format(names=[name]))

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes."""
        return self.base

    # --- forward ----------------------------------------------------------------------------------
    def _split(self, out) -> tuple[Tensor, tuple | None]:
        """(hidden states, the rest of a tuple output or None), checking they fit the adapter."""
        rest = None
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            out, rest = out[0], out[1:]
        if not isinstance(out, Tensor):
            raise TypeError(f"bottleneck adapter on {self.path!r}: the module returned {type(out).__name__}, not a "
                            "tensor (or a tuple starting with one); target a module whose output is the hidden states")
        if out.shape[-1] != self.size:
            raise ValueError(f"bottleneck adapter on {self.path!r}: the module's output has shape {tuple(out.shape)}, "
                             f"but the adapter needs the hidden size {self.size} last; target hidden-state outputs")
        return out, rest

    def _apply(self, h: Tensor, name: str) -> Tensor:
        adapter = self.bottleneck[name]
        return h + adapter(h.to(adapter.up.weight.dtype)).to(h.dtype)  # (B, T, size)

    def forward(self, *args, **kwargs):  # blocks are often called with keywords only (hidden_states=...)
        out = self.base(*args, **kwargs)
        if self.disabled:
            return out
        h, rest = self._split(out)
        if self.row_adapters is not None:
            h = self._forward_rows(h)
        else:
            for name in self.pending:
                h = self._apply(h, name)
        return h if rest is None else (h, *rest)

    def _forward_rows(self, h: Tensor) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: unchanged)."""
        rows = self.row_adapters
        if len(rows) != h.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {h.shape[0]} rows")
        for name in dict.fromkeys(n for n in rows if n is not None and n in self.bottleneck):
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=h.device)
            part = h.index_select(0, idx)  # (b, T, size)
            h = h.index_copy(0, idx, self._apply(part, name))
        return h

    def extra_repr(self) -> str:
        dims = {n: a.down.out_features for n, a in self.bottleneck.items()}
        return f"size={self.size}, bottleneck_dims={dims}, active={list(self.active)}"
