"""LoRA on nn.MultiheadAttention, in HF PEFT's layout, so files carry over.

torch's attention reads its projections as tensors (`in_proj_weight`, `out_proj.weight`) inside one functional
call; no nn.Linear forward runs that an adapter could hook. So, as HF PEFT does, one adapter adapts both:

    in_proj:  W_in  (3E, E) + scaling * B A,   A (r, E), B (3E, r)      held here, keys `<path>.lora_A.weight`, ...
    out_proj: W_out (E, E)  + scaling * B' A', A' (r, E), B' (E, r)     a linear LoraLayer put in the base's out_proj,
                                                                        keys `<path>.base_layer.out_proj.lora_A.weight`

and the forward runs the base attention with the adapted weights swapped in (`torch.func.functional_call`: the
base's parameters are never written, and gradients reach A and B). Like HF PEFT, the adapter's dropout is not
applied (there is no input to drop out before a weight), and DoRA and mixed-adapter batches are refused.

This layer is the one holder and wrapper for both parts (the out_proj layer is neither): activation, merging,
deleting and saving go through here, and unwrapping puts the plain out_proj back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ...record import route_forward
from .layer import LoraLayer


DORA_REFUSAL = "DoRA on nn.MultiheadAttention is not supported (HF PEFT refuses it too); use plain LoRA on it"


def mha_problem(base: nn.Module, dora: bool, bias: str) -> str | None:
    """Why LoRA cannot adapt this nn.MultiheadAttention with these settings, or None when it can."""
    if not base._qkv_same_embed_dim:
        return ("query, key and value have different sizes (kdim/vdim), so there is no single in_proj_weight to adapt "
                "(HF PEFT refuses this too)")
    out = base.out_proj.base if isinstance(base.out_proj, LoraLayer) else base.out_proj  # a second adapter's case
    if not isinstance(out, nn.Linear):
        return f"its out_proj is a {type(out).__name__}, not an nn.Linear"
    if dora:
        return DORA_REFUSAL
    if bias != "none":
        return (f"bias={bias!r}: HF PEFT does not save the biases of an adapted nn.MultiheadAttention, so the file "
                "would not hold what trained; use bias='none'")
    return None


class LoraMhaLayer(nn.Module):
    """Wraps one nn.MultiheadAttention; holds any number of named adapters on its in_proj and out_proj."""

    peftkit_wrapper = True
    peftkit_peft_type = "LORA"
    peftkit_holder = True
    peftkit_kind = "mha"

    def __init__(self, base: nn.MultiheadAttention) -> None:
        super().__init__()
        self.base = base
        self.training = base.training
        out = LoraLayer(base.out_proj, "linear")
        out.peftkit_holder = False  # this layer speaks for it (see the module docstring)
        out.peftkit_wrapper = False
        base.out_proj = out  # torch reads out_proj.weight / .bias, which the LoraLayer passes through
        self.lora_A = nn.ParameterDict()  # in_proj: (r, E)
        self.lora_B = nn.ParameterDict()  # in_proj: (3E, r)
        self.scaling: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: list[str | None] | None = None
        self._refresh()

    @property
    def out_lora(self) -> LoraLayer:
        """The linear LoRA layer on the base's out_proj."""
        return self.base.out_proj

    # --- what code around an attention module reads (nn.TransformerEncoderLayer among others) ------------------
    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    @property
    def num_heads(self) -> int:
        return self.base.num_heads

    @property
    def in_proj_weight(self) -> Tensor:
        return self.base.in_proj_weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.base.in_proj_bias

    @property
    def out_proj(self) -> nn.Module:
        return self.base.out_proj

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """False while unmerged adapters are active: torch's fused encoder path reads in_proj_weight itself and
        would skip them (it does under HF PEFT), so the check it makes sends it to calling this module."""
        return self.base._qkv_same_embed_dim and self.__dict__.get("forward") is self.base

    def merge_masks(self, *args, **kwargs):
        return self.base.merge_masks(*args, **kwargs)

    # --- adapters ------------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float, init: bool | str,
                    dora: bool = False) -> None:
        """Add adapter `name` (rank r) to the in_proj and the out_proj. `dropout` is kept but not applied."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if dora:
            raise ValueError(DORA_REFUSAL)
        w = self.base.in_proj_weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        E = self.base.embed_dim
        self.lora_A[name] = nn.Parameter(torch.empty(r, E, device=w.device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(torch.empty(3 * E, r, device=w.device, dtype=dtype))
        self.scaling[name] = scaling
        self.reset_adapter(name, init)
        self.out_lora.add_adapter(name, r=r, scaling=scaling, dropout=dropout, init=init)
        self._refresh()

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool | str) -> None:
        """PEFT's linear initialisations for the in_proj factors: A kaiming-uniform (gaussian: N(0, 1/r)), B zero
        (init=False: random, for tests)."""
        if init == "pissa":
            raise ValueError("init_lora_weights='pissa' applies to linear layers, not nn.MultiheadAttention")
        A, B = self.lora_A[name], self.lora_B[name]
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / A.shape[0])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5)) if init is False else nn.init.zeros_(B)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name` here: the in_proj's A and B, then the out_proj's."""
        return [self.lora_A[name], self.lora_B[name], *self.out_lora.adapter_parameters(name)]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(names)
        self.out_lora.set_active(self.active)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self.out_lora.set_disabled(disabled)
        self._refresh()

    def set_rows(self, rows: list[str | None] | None) -> None:
        """Mixed-adapter batches: refused when a row names an adapter of this layer (HF PEFT refuses them too);
        rows of other adapters or of the base alone get the base attention."""
        mine = sorted({n for n in rows or () if n in self.lora_A})
        if mine:
            raise ValueError(f"per_row: adapters {mine} adapt an nn.MultiheadAttention, which cannot run different "
                             "adapters per row (its weights are swapped as a whole); run one adapter per batch")
        self.row_adapters = rows
        self._refresh()

    def _refresh(self) -> None:
        self.pending = tuple(n for n in self.active if n in self.lora_A and n not in self.merged)
        route_forward(self, self.disabled or not self.pending or self.row_adapters is not None)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge it before deleting it")
        del self.lora_A[name]
        del self.lora_B[name]
        self.scaling.pop(name)
        self.out_lora.delete_adapter(name)
        self.set_active(tuple(n for n in self.active if n != name))

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The attention module with its plain out_proj back (merged adapters stay in its weights)."""
        self.base.out_proj = self.out_lora.base
        return self.base

    # --- weights --------------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A for the in_proj, (3E, E); the out_proj's is `out_lora.delta_weight(name)`."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """What merging adapter `name` writes: the in_proj weight's rows (3E, E), then the out_proj's (E, E)."""
        W = self.base.in_proj_weight
        return torch.cat([W + self.delta_weight(name).to(W.dtype), self.out_lora.merged_weight(name)])

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W_in += delta and W_out += delta', in place. Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        W = self.base.in_proj_weight
        W.add_(self.delta_weight(name).to(W.dtype))
        self.out_lora.merge(name)
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        W = self.base.in_proj_weight
        W.sub_(self.delta_weight(name).to(W.dtype))
        self.out_lora.unmerge(name)
        self.merged.remove(name)
        self._refresh()

    # --- forward --------------------------------------------------------------------------------------------------
    def forward(self, query: Tensor, *args, **kwargs):
        """The base attention with every pending adapter's update added to its in_proj and out_proj weights."""
        w_in = self.base.in_proj_weight  # (3E, E)
        w_out = self.out_lora.base.weight  # (E, E)
        for name in self.pending:
            w_in = w_in + self.delta_weight(name).to(w_in.dtype)
            w_out = w_out + self.out_lora.delta_weight(name).to(w_out.dtype)
        weights = {"in_proj_weight": w_in, "out_proj.base.weight": w_out}
        return functional_call(self.base, weights, (query, *args), kwargs)

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].shape[0] for n in self.lora_A}
        return f"kind=mha, adapters={ranks}, active={list(self.active)}, merged={self.merged}"


def file_tensors(path: str, layer: LoraMhaLayer, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s tensors of one attention layer under HF PEFT's keys."""
    out = layer.out_lora
    return {f"{path}.lora_A.weight": layer.lora_A[name], f"{path}.lora_B.weight": layer.lora_B[name],
            f"{path}.base_layer.out_proj.lora_A.weight": out.lora_A[name],
            f"{path}.base_layer.out_proj.lora_B.weight": out.lora_B[name]}


def file_shapes(path: str, base: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a file must hold for a rank-r adapter on attention module `base` at `path`."""
    E = base.embed_dim
    return {f"{path}.lora_A.weight": (r, E), f"{path}.lora_B.weight": (3 * E, r),
            f"{path}.base_layer.out_proj.lora_A.weight": (r, E), f"{path}.base_layer.out_proj.lora_B.weight": (E, r)}
