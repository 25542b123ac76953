"""The VeRA layer (Kopiczko et al. 2024): a frozen linear (or Conv1D, or NF4) base and, per named adapter, two
trained vectors that scale slices of the model's shared frozen random projections.

    y = base(x) + lambda_b * (B_l @ (lambda_d * (A_l @ x)))     A_l = vera_A[:, :in]   (r, in)
                                                                B_l = vera_B[:out, :]  (out, r)
    lambda_d (r,) starts at d_initial, lambda_b (out,) at zero (HF PEFT's keys vera_lambda_d, vera_lambda_b)

The same holds for transformers' Conv1D (GPT-2), whose weight is stored (in, out): only merging looks at the
layout. Several active adapters add their terms, as in PEFT. Merging adds the dense delta
(lambda_b * B_l) @ (lambda_d * A_l) to the base weight, computed in float64 and rounded once; unmerging
subtracts the same delta again.

The layer WRAPS the module (kept as `.base`) and holds the model's one `VeraProjections` as `.projections`
(the same module in every VeRA layer). Like IA3's layer it has no `peftkit_kind`, so LoRA never wraps it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...record import RoutedHolder, wrappers
from ...weights import adapter_dtype, base_device, get_dense_weight, linear_features, merge_dtype, set_dense_weight
from .projection import VeraProjections


class VeraLayer(RoutedHolder, nn.Module):
    """Wraps one linear-like module (kind 'linear' or 'conv1d'); holds any number of named VeRA adapters."""

    peftkit_wrapper = True
    peftkit_peft_type = "VERA"  # the method whose wrapper this is (targeting judges its own by their base)
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str, projections: VeraProjections, path: str = "") -> None:
        super().__init__()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"VeraLayer wraps linear layers (nn.Linear, Conv1D), not a module of kind {kind!r}")
        self.base = base
        self.training = base.training
        self.kind = kind
        self.path = path  # for error messages
        self.in_features, self.out_features = linear_features(kind, base)
        self.projections = projections
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged: what forward applies
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "vera_lambda_b" in self._modules:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, r: int, dropout: float, d_initial: float, init: bool = True) -> None:
        """Add adapter `name` (its projections must already be in `self.projections`, at least this big)."""
        if name in self.vera_lambda_b:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        vera_a, vera_b = self.projections.pair(name)
        if vera_a.shape[0] != r or vera_a.shape[1] < self.in_features or vera_b.shape[0] < self.out_features:
            raise ValueError(f"{self.path}: VeRA projections of adapter {name!r} are {tuple(vera_a.shape)} and "
                             f"{tuple(vera_b.shape)}; this layer needs at least ({r}, {self.in_features}) and "
                             f"({self.out_features}, {r})")
        device, dtype = base_device(self.base), adapter_dtype(self.base)
        self.vera_lambda_b[name] = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        self.vera_lambda_d[name] = nn.Parameter(torch.empty(r, device=device, dtype=dtype))
        self.vera_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(name, d_initial, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, d_initial: float, init: bool) -> None:
        """PEFT's init_weights: True sets lambda_b = 0 (an exact no-op) and lambda_d = d_initial; False leaves
        lambda_b at ones and lambda_d at random (so the adapter changes outputs; tests)."""
        if init:
            nn.init.zeros_(self.vera_lambda_b[name])
            nn.init.constant_(self.vera_lambda_d[name], d_initial)
        else:
            nn.init.ones_(self.vera_lambda_b[name])
            nn.init.normal_(self.vera_lambda_d[name])

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.vera_lambda_b[name], self.vera_lambda_d[name]]

    def adapter_names(self) -> list[str]:
        return list(self.vera_lambda_b.keys())

    def _drop(self, name: str) -> None:
        del self.vera_lambda_b[name]
        del self.vera_lambda_d[name]
        del self.vera_dropout[name]
        self.projections.drop(name)  # shared: the first layer to let go of the adapter drops its pair

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, name: str) -> Tensor:
        """(lambda_b * B_l) @ (lambda_d * A_l) in the base weight's layout ((out, in); (in, out) for Conv1D), in
        float64 (float32 on MPS)."""
        W = get_dense_weight(self.base)
        wide = merge_dtype(W)
        vera_a, vera_b = self.projections.slices(name, self.in_features, self.out_features)
        lambda_b = self.vera_lambda_b[name].detach().to(W.device, wide)
        lambda_d = self.vera_lambda_d[name].detach().to(W.device, wide)
        delta = (lambda_b[:, None] * vera_b.to(W.device, wide)) @ (lambda_d[:, None] * vera_a.to(W.device, wide))
        return delta.T if self.kind == "conv1d" else delta  # (out, in) or (in, out)

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight, in its own layout and dtype, after merging adapter `name` (what merge writes)."""
        W = get_dense_weight(self.base)
        return (W.to(merge_dtype(W)) + self.delta_weight(name)).to(W.dtype)

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
        """W -= delta (the same delta, from the same vectors)."""
        if name not in self.merged:
            return
        W = get_dense_weight(self.base)
        set_dense_weight(self.base, (W.to(merge_dtype(W)) - self.delta_weight(name)).to(W.dtype))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def _term(self, name: str, x: Tensor) -> Tensor:
        """lambda_b * B_l(lambda_d * A_l(dropout(x))), in the vectors' dtype."""
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        vera_a, vera_b = self.projections.slices(name, self.in_features, self.out_features)
        h = self.vera_dropout[name](x.to(lambda_d.dtype))  # (B, T, in)
        h = F.linear(h, vera_a.to(h.device, h.dtype)) * lambda_d  # (B, T, r)
        return lambda_b * F.linear(h, vera_b.to(h.device, h.dtype))  # (B, T, out)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_rows(x, *args, **kwargs)
        out = self.base(x, *args, **kwargs)
        result = out
        for name in self.pending:
            result = result + self._term(name, x)
        return result.to(out.dtype)  # (B, T, out)

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        out = self.base(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name is None or name not in self.vera_lambda_b:
                continue
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            term = self._term(name, x.index_select(0, idx))  # (b, T, out)
            out = out.index_copy(0, idx, (out.index_select(0, idx) + term).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        ranks = {n: d.shape[0] for n, d in self.vera_lambda_d.items()}
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, r={ranks}, "
                f"active={list(self.active)}, merged={self.merged}")


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeraLayer]]:
    """Every VeraLayer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, VeraLayer):
            yield path, w
