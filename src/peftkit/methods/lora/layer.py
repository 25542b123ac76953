"""The LoRA layer: a frozen base module plus, per named adapter, low-rank factors A (r x in), B (out x r).

    y = base(x) + scaling * B(A(dropout(x)))          linear / Conv1D; nn.Conv1d/2d/3d with A, B convolutions (conv.py)
    y = base(ids) + scaling * B(A[:, ids])            embedding (A is r x num_embeddings)
    y = f * (base(x) - b + scaling * B(A(x))) + b     DoRA, f = m / ||W + scaling * B A|| (see dora.py)

The layer WRAPS the original module (kept as `.base`); it never copies or subclasses it. Base weights are
read and written through `get_dense_weight` / `set_dense_weight`, so a quantized base only has to offer
those two methods (see `WeightAccess`) to get merge and unmerge.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...record import RoutedHolder
from ...weights import (WeightAccess, adapter_dtype, base_device, compute_dtype, get_dense_weight, merge_dtype,
                        set_dense_weight)
from . import conv
from .fused import LoraLinearFunction, fusable, rows_for
from .fused_nf4 import lora_nf4, nf4_fusable
from .dora import merged_weight as dora_merged_weight
from .dora import output_delta, unmerged_weight, weight_norm
from .weights import factor_shapes


class LoraLayer(RoutedHolder, nn.Module):
    """Wraps one linear, Conv1D, embedding or torch convolution ("conv") module; holds any number of named
    adapters."""

    peftkit_wrapper = True
    peftkit_peft_type = "LORA"  # the method whose wrapper this is (targeting judges its own by their base)
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("linear", "conv1d", "embedding", "conv"):
            raise ValueError(f"LoraLayer cannot wrap a module of kind {kind!r}")
        self.base = base
        self.training = base.training  # wrapping a module of a model in eval() must not switch dropout on
        self.peftkit_kind = kind
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: m, (out,)
        self.dora_merge_state: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # what undoes a DoRA merge
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged: what forward adds
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    @property
    def weight(self) -> Tensor:
        """The wrapped module's weight (as PEFT's wrapper passes it through): model code that reads
        `self.wo.weight.dtype` (T5) or ties weights keeps working. The base's, unmerged adapters not added."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The wrapped module's bias (None when it has none)."""
        return getattr(self.base, "bias", None)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "lora_A" in self._modules:  # a replaced base (e.g. dequantized) must be the one called
            self._refresh()

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return factor_shapes(self.peftkit_kind, self.base, r)

    # --- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str,
                    dora: bool = False) -> None:
        """Add adapter `name`; with `dora=True` it also gets a magnitude vector (DoRA)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        device = base_device(self.base)
        dtype = adapter_dtype(self.base)
        (a_shape, b_shape) = self.factor_shapes(r)
        A = torch.empty(a_shape, device=device, dtype=dtype)
        B = torch.empty(b_shape, device=device, dtype=dtype)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        if dora:
            self.lora_magnitude_vector[name] = nn.Parameter(torch.empty(b_shape[0], device=device, dtype=dtype))
        self.scaling[name] = scaling
        self.dropout[name] = float(dropout)
        self.reset_adapter(name, init)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` in this layer: A, B and, for DoRA, the magnitude."""
        params = [self.lora_A[name], self.lora_B[name]]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str) -> None:
        """PEFT's initialisations. True: A kaiming-uniform, B zero (embedding: A zero, B normal), so the
        adapter starts as a no-op. "gaussian": A ~ N(0, 1/r). False: both random (for tests).
        "pissa": A, B from the top-r singular triplets of W, which keeps W - scaling*BA as the base.
        A DoRA magnitude starts at ||W + scaling*BA|| (per output row), so the layer's output is W x + scaling*BA x."""
        A, B, r = self.lora_A[name], self.lora_B[name], self.lora_A[name].shape[0]
        if init == "pissa":
            self._pissa_init(name)
        elif self.peftkit_kind == "embedding":
            nn.init.normal_(B)
            nn.init.zeros_(A) if init is not False else nn.init.normal_(A)
        else:
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            else:
                nn.init.zeros_(B)
        if name in self.lora_magnitude_vector:
            norm = weight_norm(self._unmerged_out_in(), self._delta_out_in(name))
            self.lora_magnitude_vector[name].copy_(norm)

    def _pissa_init(self, name: str) -> None:
        if self.peftkit_kind in ("embedding", "conv"):
            raise ValueError(f"init_lora_weights='pissa' applies to linear layers, not to {self.peftkit_kind} layers; "
                             "exclude them")
        r, s = self.lora_A[name].shape[0], self.scaling[name]
        W = self._as_out_in(get_dense_weight(self.base)).float()  # (out, in)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A = root[:, None] * Vh[:r]  # (r, in)
        B = U[:, :r] * root[None, :]  # (out, r)
        self.lora_A[name].copy_(A)
        self.lora_B[name].copy_(B)
        residual = W - s * (B @ A)
        set_dense_weight(self.base, self._from_out_in(residual).to(get_dense_weight(self.base).dtype))

    def _drop(self, name: str) -> None:
        for store in (self.lora_A, self.lora_B):
            del store[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.scaling.pop(name)
        self.dropout.pop(name)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- weights ----------------------------------------------------------------------------------
    def _as_out_in(self, w: Tensor) -> Tensor:
        if self.peftkit_kind == "conv":
            return w.reshape(w.shape[0], -1)  # (out, in / groups * prod(kernel))
        return w if self.peftkit_kind == "linear" else w.T

    def _from_out_in(self, w: Tensor) -> Tensor:
        if self.peftkit_kind == "conv":
            return w.reshape(self.base.weight.shape)
        return w if self.peftkit_kind == "linear" else w.T

    def _delta_out_in(self, name: str) -> Tensor:
        problem = conv.merge_problem(self.base) if self.peftkit_kind == "conv" else None
        if problem:
            raise ValueError(problem)
        return (self.lora_B[name].flatten(1) @ self.lora_A[name].flatten(1)) * self.scaling[name]  # (out, in)

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A in the base weight's own layout ((out, in); (in, out) for Conv1D;
        (num_embeddings, dim) for an embedding). For DoRA this is only the low-rank part of the update;
        `merged_weight` gives the whole merged weight."""
        return self._from_out_in(self._delta_out_in(name))

    def _unmerged_out_in(self) -> Tensor:
        """The base weight, (out, in), with every adapter merged into it taken out again (latest first).
        DoRA's norms are defined on this weight, so merged and unmerged layers compute the same outputs."""
        W = self._as_out_in(get_dense_weight(self.base))
        if self.merged:
            W = W.to(compute_dtype(W))
        for name in reversed(self.merged):
            W = self._unmerge_step(W, name)
        return W

    def _unmerge_step(self, W: Tensor, name: str) -> Tensor:
        """The (out, in) weight before merged adapter `name` was merged into W (a new tensor)."""
        delta = self._delta_out_in(name).to(W.dtype)
        if name not in self.dora_merge_state:
            return W - delta
        factor, zero_rows, saved_rows = (t.to(W.device) for t in self.dora_merge_state[name])
        prev = unmerged_weight(W, delta, factor.to(W.dtype))
        prev[zero_rows] = saved_rows.to(W.dtype)  # rows a zero magnitude wiped out come back from the copy
        return prev

    def _dora_factor(self, name: str) -> Tensor:
        """f = m / ||W + scaling * B A||, (out,), on the unmerged base weight. The norm is a detached constant
        (DoRA paper, section 4.3); the magnitude's gradient flows through f."""
        with torch.no_grad():
            norm = weight_norm(self._unmerged_out_in(), self._delta_out_in(name))  # (out,)
        return self.lora_magnitude_vector[name] / norm

    def _dora_merged(self, name: str) -> tuple[Tensor, Tensor]:
        """(f * (W + delta) in the base weight's layout and dtype, f), W being the current weight."""
        W = get_dense_weight(self.base)
        factor = self._dora_factor(name)  # (out,)
        W64 = self._as_out_in(W).to(merge_dtype(W))
        merged = dora_merged_weight(W64, self._delta_out_in(name).to(W64.dtype), factor.to(W64.dtype))
        return self._from_out_in(merged).to(W.dtype), factor

    def merge_problem(self, name: str) -> str | None:
        """Why adapter `name` cannot be merged into this layer's weight (a grouped convolution), or None."""
        return conv.merge_problem(self.base) if self.peftkit_kind == "conv" else None

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight, in its own layout, after merging adapter `name` into it (what merge writes)."""
        if name in self.lora_magnitude_vector:
            return self._dora_merged(name)[0]
        W = get_dense_weight(self.base)
        return W + self.delta_weight(name).to(W.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += delta, in place (DoRA: W = f * (W + delta)). Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        W = get_dense_weight(self.base)
        if name in self.lora_magnitude_vector:
            merged, factor = self._dora_merged(name)
            zero_rows = (factor == 0).nonzero().flatten()  # a zero magnitude cannot be divided out again
            self.dora_merge_state[name] = (factor, zero_rows, self._as_out_in(W)[zero_rows].clone())
            set_dense_weight(self.base, merged)
        elif isinstance(self.base, WeightAccess):
            set_dense_weight(self.base, W + self.delta_weight(name).to(W.dtype))
        else:
            W.add_(self.delta_weight(name).to(W.dtype))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        W = get_dense_weight(self.base)
        if name in self.dora_merge_state:
            prev = self._unmerge_step(self._as_out_in(W).to(merge_dtype(W)), name)
            set_dense_weight(self.base, self._from_out_in(prev).to(W.dtype))
            del self.dora_merge_state[name]
        elif isinstance(self.base, WeightAccess):
            set_dense_weight(self.base, W - self.delta_weight(name).to(W.dtype))
        else:
            W.sub_(self.delta_weight(name).to(W.dtype))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def _hidden(self, x: Tensor, name: str, drop: bool = True) -> Tensor:
        """A's output for input x: (..., r). `drop=False`: the caller applied the dropout already."""
        A = self.lora_A[name]
        if self.peftkit_kind == "embedding":
            base = self.base
            return F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)  # (B, T, r)
        p = self.dropout[name]
        if drop and p > 0.0 and self.training:
            x = F.dropout(x, p=p, training=True)
        if self.peftkit_kind == "conv":
            return conv.down(self.base, A, x)  # (N, r, *spatial)
        return x.to(A.dtype) @ A.T  # (B, T, r)

    def _lora_out(self, x: Tensor, name: str, drop: bool = True) -> Tensor:
        """B(A(x)) for input x, unscaled: (B, T, out), or (N, out, *spatial) for a convolution."""
        h = self._hidden(x, name, drop)
        if self.peftkit_kind == "conv":
            return conv.up(self.base, self.lora_B[name], h)  # (N, out, *spatial)
        return h @ self.lora_B[name].T  # (B, T, out)

    def _per_channel(self, v: Tensor) -> Tensor:
        """A per-output-feature vector (out,) shaped to broadcast over this layer's output."""
        return conv.per_channel(self.base, v) if self.peftkit_kind == "conv" else v

    def _add_lora(self, out: Tensor, x: Tensor, name: str) -> Tensor:
        """out + scaling * B(A(x)), with the scale fused into one addmm; in place when nothing needs grad."""
        if self.peftkit_kind == "conv":
            return out + self._lora_out(x, name).to(out.dtype) * self.scaling[name]  # (N, out, *spatial)
        h = self._hidden(x, name)  # (B, T, r)
        B = self.lora_B[name].to(out.dtype)
        out2d = out.reshape(-1, out.shape[-1])  # (B*T, out)
        h2d = h.reshape(-1, h.shape[-1]).to(out.dtype)  # (B*T, r)
        if not (out.requires_grad or h2d.requires_grad or B.requires_grad) and out2d.data_ptr() == out.data_ptr():
            return out2d.addmm_(h2d, B.T, alpha=self.scaling[name]).view(out.shape)
        return torch.addmm(out2d, h2d, B.T, alpha=self.scaling[name]).view(out.shape)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if (len(self.pending) == 1 and not self.disabled and self.row_adapters is None and not args and not kwargs
                and self.pending[0] not in self.lora_magnitude_vector and self.peftkit_kind == "linear"):
            name = self.pending[0]
            A = self.lora_A[name]
            if fusable(self.base, x, A, self.dropout[name], self.training):
                return LoraLinearFunction.apply(x, self.base.weight, self.base.bias, A, self.lora_B[name],
                                                           self.scaling[name], rows_for(x))
            if nf4_fusable(self.base, x, A, self.dropout[name], self.training):  # QLoRA: an NF4 base
                return lora_nf4(self.base, x, A, self.lora_B[name], self.scaling[name])
        out = self.base(x, *args, **kwargs)
        if self.disabled:
            return out
        if self.row_adapters is not None:
            return self._forward_rows(x, out)
        for name in self.pending:
            if name in self.lora_magnitude_vector:
                out = out + self._dora_delta(out, x, name)
            else:
                out = self._add_lora(out, x, name)
        return out

    def _dora_delta(self, out: Tensor, x: Tensor, name: str) -> Tensor:
        """What DoRA adapter `name` adds to `out` (the output so far, bias included), as HF PEFT computes it:
        (f - 1) * (out - bias) + f * scaling * B(A(x)). Several active adapters compose: each one scales the
        output of those before it, as merging them in that order does. With dropout while training, the
        base part is recomputed from the dropped-out input (PEFT's choice), without earlier adapters."""
        p = self.dropout[name]
        if self.peftkit_kind != "embedding" and p > 0.0 and self.training:
            x = F.dropout(x, p=p, training=True)
            W = get_dense_weight(self.base).to(out.dtype)
            base_out = (conv.apply_weight(self.base, x.to(out.dtype), W) if self.peftkit_kind == "conv"
                        else F.linear(x.to(out.dtype), self._as_out_in(W)))  # (B, T, out), no bias
        else:
            bias = getattr(self.base, "bias", None)
            base_out = out if bias is None else out - self._per_channel(bias).to(out.dtype)  # (B, T, out)
        lora_out = self._lora_out(x, name, drop=False)  # (B, T, out)
        return output_delta(base_out, lora_out, self._per_channel(self._dora_factor(name)), self.scaling[name])

    def _forward_rows(self, x: Tensor, out: Tensor) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        for name in dict.fromkeys(n for n in rows if n is not None):
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=out.device)
            if name in self.lora_magnitude_vector:
                delta = self._dora_delta(out.index_select(0, idx), x.index_select(0, idx), name)
            else:
                delta = self._lora_out(x.index_select(0, idx), name) * self.scaling[name]
            out = out.index_add(0, idx, delta.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.lora_A}
        doras = f", dora={list(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return f"kind={self.peftkit_kind}, adapters={ranks}{doras}, active={list(self.active)}, merged={self.merged}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoraLayer in the model, with its module path."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module
