"""The IA3 layer ((IA)^3, Liu et al. 2022): a frozen linear (or Conv1D, or NF4) base and, per named adapter,
one learned vector that rescales it.

    y = base(x) * l        l: (out,)   attention-type targets; PEFT stores it as `ia3_l` of shape (out, 1)
    y = base(x * l)        l: (in,)    feedforward_modules;    PEFT stores it as (1, in)

The shapes are the same for transformers' Conv1D (GPT-2), whose weight is stored (in, out): only merging
looks at the layout. Vectors start at ones (an exact no-op). Several active adapters multiply (their input
vectors and their output vectors), as in PEFT. Merging scales the base weight, W' = W * l per output row (and
the bias by l) or per input column for a feedforward target; unmerging divides by the same l again, and the
rows or columns a zero in l wiped out come back from a copy taken at merge time, so a zero never divides.

The layer WRAPS the module (kept as `.base`). It deliberately has no `peftkit_kind`: that attribute tells
LoRA's targeting a wrapper it may wrap again, and LoRA over an IA3 layer could not merge correctly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ...record import RoutedHolder, wrappers
from ...weights import adapter_dtype, base_device, get_dense_weight, linear_features, merge_dtype, set_dense_weight


class IA3Layer(RoutedHolder, nn.Module):
    """Wraps one linear-like module (kind 'linear' or 'conv1d'); holds any number of named IA3 vectors."""

    peftkit_wrapper = True
    peftkit_peft_type = "IA3"  # the method whose wrapper this is (targeting judges its own by their base)
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str, path: str = "") -> None:
        super().__init__()
        if kind not in ("linear", "conv1d"):
            raise ValueError(f"IA3Layer wraps linear layers (nn.Linear, Conv1D), not a module of kind {kind!r}")
        self.base = base
        self.training = base.training
        self.kind = kind
        self.path = path  # for error messages
        self.in_features, self.out_features = linear_features(kind, base)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}  # adapter -> scales the input (True) or the output
        self.merge_state: dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None]] = {}  # what undoes a merge
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged: what forward applies
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "ia3_l" in self._modules:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, feedforward: bool, init: bool = True) -> None:
        """Add vector `name`: (1, in) when it scales the input, (out, 1) when it scales the output."""
        if name in self.ia3_l:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        vector = torch.empty(shape, device=base_device(self.base), dtype=adapter_dtype(self.base))
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward
        self.reset_adapter(name, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool) -> None:
        """PEFT's init_ia3_weights: True sets ones (no-op); False leaves random values (around one, for tests)."""
        if init:
            nn.init.ones_(self.ia3_l[name])
        else:
            nn.init.normal_(self.ia3_l[name], mean=1.0, std=0.5)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]]

    def adapter_names(self) -> list[str]:
        return list(self.ia3_l.keys())

    def _drop(self, name: str) -> None:
        del self.ia3_l[name]
        self.feedforward.pop(name)

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- merging ----------------------------------------------------------------------------------
    def _along_rows(self, name: str) -> bool:
        """Whether l runs along the base weight's first dimension: outputs of a Linear's (out, in) weight,
        inputs of a Conv1D's (in, out) weight."""
        return (self.kind == "linear") != self.feedforward[name]

    def _scaled_bias(self, name: str) -> Tensor | None:
        """The bias an output vector scales too ((W x + b) * l); None for an input vector or no bias."""
        bias = getattr(self.base, "bias", None)
        return None if self.feedforward[name] or bias is None else bias.data

    @torch.no_grad()
    def merged_weight(self, name: str, vector: Tensor | None = None) -> Tensor:
        """The base weight, in its own layout and dtype, after merging adapter `name` (what merge writes):
        computed in float64, where the product of two float32 numbers is exact, then rounded once."""
        W = get_dense_weight(self.base)
        wide = merge_dtype(W)
        l = (self.ia3_l[name] if vector is None else vector).detach().flatten().to(W.device, wide)
        return (W.to(wide) * (l[:, None] if self._along_rows(name) else l[None, :])).to(W.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W *= l (and b *= l for an output vector), in place. Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        W = get_dense_weight(self.base)
        l = self.ia3_l[name].detach().flatten().clone()  # unmerge divides by exactly this
        zeros = (l == 0).nonzero().flatten().to(W.device)
        bias = self._scaled_bias(name)
        kept = W.index_select(0 if self._along_rows(name) else 1, zeros)  # a copy: what l = 0 wipes out
        self.merge_state[name] = (l, zeros, kept, None if bias is None else bias[zeros])
        set_dense_weight(self.base, self.merged_weight(name, l))
        if bias is not None:
            bias.copy_((bias.to(merge_dtype(bias)) * l.to(bias.device, merge_dtype(bias))).to(bias.dtype))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W /= l (and b /= l) with the l merged; entries where l was 0 are restored from their copy."""
        if name not in self.merged:
            return
        l, zeros, kept, kept_bias = self.merge_state.pop(name)
        W = get_dense_weight(self.base)
        wide = merge_dtype(W)
        divisor = torch.where(l == 0, torch.ones_like(l), l).to(W.device, wide)
        dim = 0 if self._along_rows(name) else 1
        prev = W.to(wide) / (divisor[:, None] if dim == 0 else divisor[None, :])
        prev.index_copy_(dim, zeros, kept.to(wide))
        set_dense_weight(self.base, prev.to(W.dtype))
        bias = self._scaled_bias(name)
        if bias is not None:
            restored = bias.to(wide) / divisor.to(bias.device)
            restored[zeros.to(bias.device)] = kept_bias.to(wide)
            bias.copy_(restored.to(bias.dtype))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def _scales(self, names: tuple[str, ...]) -> tuple[Tensor | None, Tensor | None]:
        """(input scale (in,), output scale (out,)): the product of the named adapters' vectors of each kind."""
        scale_in = scale_out = None
        for name in names:
            l = self.ia3_l[name].flatten()
            if self.feedforward[name]:
                scale_in = l if scale_in is None else scale_in * l
            else:
                scale_out = l if scale_out is None else scale_out * l
        return scale_in, scale_out

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_rows(x, *args, **kwargs)
        scale_in, scale_out = self._scales(self.pending)
        if scale_in is not None:  # cast as PEFT does: scale in the vector's dtype, run the base in x's
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)  # (B, T, in)
        out = self.base(x, *args, **kwargs)
        if scale_out is not None:
            out = (out * scale_out).to(out.dtype)  # (B, T, out)
        return out

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        here = [n for n in dict.fromkeys(rows) if n is not None and n in self.ia3_l]
        inputs = [n for n in here if self.feedforward[n]]
        if inputs:
            scale = self._row_scale(inputs, self.in_features, x)  # (B, 1, in)
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        out = self.base(x, *args, **kwargs)
        outputs = [n for n in here if not self.feedforward[n]]
        if outputs:
            out = (out * self._row_scale(outputs, self.out_features, out)).to(out.dtype)  # (B, T, out)
        return out

    def _row_scale(self, names: list[str], size: int, like: Tensor) -> Tensor:
        """(B, 1, ..., size): row i holds the vector of adapter row_adapters[i] when it is in `names`, else ones."""
        rows = self.row_adapters
        scale = torch.ones(len(rows), size, device=like.device, dtype=self.ia3_l[names[0]].dtype)
        for name in names:
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=like.device)
            scale = scale.index_copy(0, idx, self.ia3_l[name].reshape(1, size).expand(len(idx), size).to(scale.dtype))
        return scale.reshape(len(rows), *([1] * (like.dim() - 2)), size)

    def extra_repr(self) -> str:
        kinds = {n: "input" if ff else "output" for n, ff in self.feedforward.items()}
        return (f"kind={self.kind}, in={self.in_features}, out={self.out_features}, scales={kinds}, "
                f"active={list(self.active)}, merged={self.merged}")


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Layer]]:
    """Every IA3Layer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, IA3Layer):
            yield path, w
