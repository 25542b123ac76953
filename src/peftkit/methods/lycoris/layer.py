"""The LoHa / LoKr layer: a frozen base (nn.Linear, an NF4 linear, nn.Conv1d or nn.Conv2d), kept as `.base`, and
per named adapter a few factors that make a weight update delta of the base weight's shape (family.py):

    y = base(x) + linear(x, delta)                 for a linear base     (B, T, in) -> (B, T, out)
                                                   (a plain nn.Linear: linear(x, W + delta, b), one matmul)
    y = base(x) + conv(x, delta, base's stride, padding, dilation, groups)   for a convolution

as HF PEFT computes it (the input cast to the factors' dtype, the sum cast back). Several active adapters add
their updates. Without autograd (inference, generation) each update is kept between calls and rebuilt only when
a factor changes. Merging adds delta to the base weight (W + delta, in float64, rounded once) and unmerging
subtracts it again. In training, module_dropout skips an adapter for a step and rank_dropout zeroes whole output
rows of its delta (PEFT's meaning of both).

One class serves both methods: the `family` (LOHA or LOKR) says which factors it holds and how they combine; a
layer holds adapters of one family only. Like the IA3 layer it has no `peftkit_kind`, so LoRA never wraps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...record import RoutedHolder, wrappers
from ...weights import adapter_dtype, base_device, get_dense_weight, merge_dtype, set_dense_weight
from .family import FAMILIES, Family
from .shapes import geometry


@dataclass(frozen=True)
class AdapterSettings:
    r: int
    alpha: float
    rank_dropout: float
    module_dropout: float
    rescale_rank_dropout: bool

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LycorisLayer(RoutedHolder, nn.Module):
    """Wraps one layer of kind 'linear', 'conv1d' or 'conv2d'; holds any number of named adapters of `family`."""

    peftkit_wrapper = True
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str, family: Family, path: str = "") -> None:
        super().__init__()
        self.base = base
        self.training = base.training
        self.kind = kind
        self.peftkit_peft_type = family.peft_type  # targeting judges a wrapper of its own method by its base
        self.path = path  # for error messages
        self.geometry = geometry(base, kind)
        for tname in family.tensor_names:  # PEFT's module layout: <path>.hada_w1_a.<adapter>, ...
            setattr(self, tname, nn.ParameterDict())
        self.settings: dict[str, AdapterSettings] = {}
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged: what forward adds
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self.delta_cache: dict[str, tuple[tuple, Tensor]] = {}  # adapter -> (factor versions, update) for inference
        self._refresh()

    @property
    def family(self) -> Family:
        """LOHA or LOKR, looked up by name (the layer stores a string, so it pickles and deep-copies as usual)."""
        return FAMILIES[self.peftkit_peft_type]

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (PEFT's wrappers pass it through too): model code that reads
        `layer.weight.dtype` (T5) or ties weights keeps working. The base's, unmerged updates not added."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "base" and "settings" in self.__dict__:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, config: Any, init: bool | str = True) -> None:
        """Create adapter `name`'s factors (shapes by the family's rules for this layer, rank r) and initialise
        them: `init` is the config's init_weights (True: the update starts at zero)."""
        if name in self.settings:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        dtype, device = adapter_dtype(self.base), base_device(self.base)
        for tname, shape in self.family.shapes(self.geometry, r, config).items():
            getattr(self, tname)[name] = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.settings[name] = AdapterSettings(r, alpha, config.rank_dropout, config.module_dropout,
                                              self.family.rescales_rank_dropout(config))
        self.family.init(self.factors(name), init)

    def factors(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s tensors by their PEFT names (hada_w1_a, lokr_w1, ...)."""
        return {t: getattr(self, t)[name] for t in self.family.tensor_names if name in getattr(self, t)}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.factors(name).values())

    def adapter_names(self) -> list[str]:
        return list(self.settings)

    def _drop(self, name: str) -> None:
        for tname in self.factors(name):
            del getattr(self, tname)[name]
        del self.settings[name]
        self.delta_cache.pop(name, None)

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- the update and merging --------------------------------------------------------------------
    def delta_weight(self, name: str, rank_dropout: bool = False) -> Tensor:
        """Adapter `name`'s update in the base weight's shape (out, in[, k...]), in the factors' dtype. With
        `rank_dropout`, whole output rows are zeroed with the adapter's rank_dropout probability."""
        s = self.settings[name]
        if not torch.is_grad_enabled() and not rank_dropout:
            return self._cached_delta(name)
        self.delta_cache.clear()  # a forward with autograd: an optimizer step may follow (a fused one leaves no trace)
        delta = self.family.delta(self.factors(name), s.scale).reshape(self.geometry.weight_shape)
        if rank_dropout:
            keep = (torch.rand(delta.shape[0], device=delta.device) > s.rank_dropout).to(delta.dtype)
            if s.rescale_rank_dropout and bool(keep.any()):
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    def _cached_delta(self, name: str) -> Tensor:
        """Without autograd (inference, generation), the update rebuilt only when a factor changed: rebuilding
        LoHa's (out, in) product for every generated token costs more than the base layer itself. The key is each
        factor's storage and in-place version counter (a load or a plain optimizer step bumps it); torch's fused
        AdamW does not bump it, so every forward with autograd (training) empties the cache as well."""
        factors = self.factors(name)
        key = tuple((p.data_ptr(), p._version) for p in factors.values())
        found = self.delta_cache.get(name)
        if found is None or found[0] != key:
            delta = self.family.delta(factors, self.settings[name].scale).reshape(self.geometry.weight_shape)
            found = self.delta_cache[name] = (key, delta)
        return found[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "delta_cache": {}}  # a cache: not pickled

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight, in its own dtype, after merging adapter `name` (what merge writes)."""
        return self._shifted(name, +1)

    def _shifted(self, name: str, sign: int) -> Tensor:
        W = get_dense_weight(self.base)
        wide = merge_dtype(W)
        delta = self.delta_weight(name).detach().to(W.device, wide).reshape(W.shape)
        return (W.to(wide) + sign * delta).to(W.dtype)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W += delta, in place. Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        set_dense_weight(self.base, self._shifted(name, +1))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W -= delta with the adapter's current factors."""
        if name not in self.merged:
            return
        set_dense_weight(self.base, self._shifted(name, -1))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def _update(self, name: str, x: Tensor) -> Tensor:
        """What adapter `name` adds to the base's output for input x."""
        delta = self.delta_weight(name, rank_dropout=self._drops_rows(name))
        x = x.to(delta.dtype)  # as PEFT: the input in the factors' dtype (fp32 over a 16-bit or 4-bit base)
        if self.kind == "linear":
            return F.linear(x, delta)  # (B, T, out)
        conv = F.conv2d if self.kind == "conv2d" else F.conv1d
        b = self.base
        return conv(x, delta, stride=b.stride, padding=b.padding, dilation=b.dilation, groups=b.groups)  # (B, out, ...)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_rows(x, *args, **kwargs)
        names = [n for n in self.pending if not self._sits_out(n)]
        if names and self._fusable(x, args, kwargs):
            # one matmul instead of two: W x + delta x = (W + delta) x, and backward likewise (~40% less work
            # than PEFT's two products; equal up to rounding, see the parity test)
            weight = self.base.weight
            for name in names:
                weight = weight + self.delta_weight(name, rank_dropout=self._drops_rows(name))
            return F.linear(x, weight, self.base.bias)  # (B, T, out)
        out = self.base(x, *args, **kwargs)
        dtype = out.dtype
        for name in names:
            out = out + self._update(name, x)
        return out.to(dtype)

    def _sits_out(self, name: str) -> bool:
        """module_dropout: in training, the adapter skips a step with that probability (PEFT's draw)."""
        p = self.settings[name].module_dropout
        return self.training and p > 0 and float(torch.rand(1)) <= p

    def _drops_rows(self, name: str) -> bool:
        return self.training and self.settings[name].rank_dropout > 0

    def _fusable(self, x: Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the base's own forward may be folded into one F.linear: a plain nn.Linear whose weight has the
        factors' dtype and the input's, called with x alone, and with no hooks of its own (they would not fire)."""
        b = self.base
        return (type(b) is nn.Linear and type(b.weight) is nn.Parameter and not args and not kwargs
                and b.weight.dtype == x.dtype == adapter_dtype(b) and not b._forward_hooks
                and not b._forward_pre_hooks)

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        out = self.base(x, *args, **kwargs)
        for name in dict.fromkeys(rows):
            if name is None or name not in self.settings:
                continue
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            out = out.index_add(0, idx, self._update(name, x.index_select(0, idx)).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        ranks = {n: s.r for n, s in self.settings.items()}
        return (f"{self.family.label}, kind={self.kind}, geometry={self.geometry.weight_shape}, ranks={ranks}, "
                f"active={list(self.active)}, merged={self.merged}")


def lycoris_layers(model: nn.Module, family: Family | None = None) -> Iterator[tuple[str, LycorisLayer]]:
    """Every LycorisLayer in the model (of `family` only, when given), with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, LycorisLayer) and (family is None or w.peftkit_peft_type == family.peft_type):
            yield path, w
