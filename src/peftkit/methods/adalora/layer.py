"""The AdaLoRA layer: a frozen linear (or Conv1D, or NF4) base and, per named adapter, LoRA in SVD form.

    y = base(x) + (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)

    A (r, in): right singular vectors    E (r, 1): singular values    B (out, r): left singular vectors

as HF PEFT's SVDLinear computes it: scaling is lora_alpha (the rank it was made with when alpha <= 0) and
ranknum the initial rank init_r, kept when a file's rank_pattern makes the layer smaller, so pruning a triplet
never rescales the others. The shapes are the same over transformers' Conv1D (GPT-2); only merging looks at
its (in, out) layout. E starts at zero: a fresh adapter is an exact no-op.

The layer WRAPS the module (kept as `.base`). It has no `peftkit_kind`: LoRA over an AdaLoRA layer could not
merge correctly. The allocator's running scores of each adapter live here too (`scores`), so the model
carries its whole training state (allocator.py reads and writes them).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...record import RoutedHolder, wrappers
from ...weights import adapter_dtype, base_device, get_dense_weight, linear_features, set_dense_weight

EPS = 1e-5  # PEFT adds it to ranknum (a layer pruned to rank 0 divides by it)


class AdaLoraLayer(RoutedHolder, nn.Module):
    """Wraps one linear-like module (kind 'linear' or 'conv1d'); holds any number of named SVD adapters."""

    peftkit_wrapper = True
    peftkit_peft_type = "ADALORA"  # the method whose wrapper this is (targeting judges its own by their base)
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str, path: str = "") -> None:
        super().__init__()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"AdaLoraLayer wraps linear layers (nn.Linear, Conv1D), not a module of kind {kind!r}")
        self.base = base
        self.training = base.training
        self.kind = kind
        self.path = path
        self.in_features, self.out_features = linear_features(kind, base)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.scores: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # adapter -> factor -> (EMA ipt, EMA unc)
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged: what forward adds
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "lora_A" in self._modules:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, r: int, ranknum: int, lora_alpha: float, dropout: float, init: bool) -> None:
        """Add adapter `name` with r triplets, scaled by lora_alpha / ranknum (the initial rank)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        device, dtype = base_device(self.base), adapter_dtype(self.base)
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_E[name] = nn.Parameter(torch.empty(r, 1, device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.ranknum[name] = float(ranknum)
        self.scaling[name] = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.dropout[name] = float(dropout)
        self.reset_adapter(name, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool) -> None:
        """PEFT's init: A and B ~ N(0, 0.02), E = 0 (a no-op). init=False also draws E (for tests)."""
        nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        if init:
            nn.init.zeros_(self.lora_E[name])
        else:
            nn.init.normal_(self.lora_E[name], mean=0.0, std=1.0)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_E[name], self.lora_B[name]]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def _drop(self, name: str) -> None:
        for store in (self.lora_A, self.lora_E, self.lora_B):
            del store[name]
        for store in (self.ranknum, self.scaling, self.dropout, self.scores):
            store.pop(name, None)

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- merging ----------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """B (A * E) * scaling / (ranknum + 1e-5), in the base weight's layout ((in, out) for Conv1D)."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        delta = B @ (A * E) * self.scaling[name] / (self.ranknum[name] + EPS)  # (out, in)
        return delta if self.kind == "linear" else delta.T

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight, in its own layout and dtype, after merging adapter `name` (what merge writes)."""
        W = get_dense_weight(self.base)
        return W + self.delta_weight(name).to(W.device, W.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += delta, in place. Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        set_dense_weight(self.base, self.merged_weight(name))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        W = get_dense_weight(self.base)
        set_dense_weight(self.base, W - self.delta_weight(name).to(W.device, W.dtype))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def _delta(self, x: Tensor, name: str) -> Tensor:
        """What adapter `name` adds for input x: (..., out), in the adapter's dtype."""
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = x.to(A.dtype)
        p = self.dropout[name]
        if p > 0.0 and self.training:
            x = F.dropout(x, p=p, training=True)
        return (x @ (A * E).T @ B.T) * self.scaling[name] / (self.ranknum[name] + EPS)  # (B, T, out)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.base(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.pending:
            out = out + self._delta(x, name).to(out.dtype)
        return out

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(n for n in rows if n is not None):
            if name not in self.lora_A:
                continue
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=out.device)
            out = out.index_add(0, idx, self._delta(x.index_select(0, idx), name).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.lora_A}
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, ranks={ranks}, "
                f"active={list(self.active)}, merged={self.merged}")


def adalora_layers(model: nn.Module) -> Iterator[tuple[str, AdaLoraLayer]]:
    """Every AdaLoraLayer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, AdaLoraLayer):
            yield path, w
