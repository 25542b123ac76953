"""The OFT layer: a frozen base (nn.Linear or an NF4 linear, a 1x1 nn.Conv2d, nn.Embedding), kept as `.base`,
and per named adapter one parameter that makes a block-diagonal rotation R (rotation.py):

    linear     y = base(x R)                     x (B, T, in)   R acts on the input features
    conv2d     y = base(x rotated per pixel)     x (B, C, H, W) R acts on the channels (1x1 kernels only)
    embedding  y = base(ids) R                   R acts on the embedding dimension

as HF PEFT computes it (the input cast to the parameter's dtype, rotated, cast back). The parameter is PEFT's
`oft_R.weight` (`oft_embedding_R.weight` for an embedding), held here in the ParameterDict `oft_R` by adapter name.

Merging writes W R^T into the weight (E R for an embedding), in float64 and rounded once; unmerging solves for
W again (a Neumann R is only nearly orthogonal, so no transpose). Several active adapters compose the way merging
composes them, so merged == unmerged always: merging a then b gives x R_b R_a W^T, so the forward rotates by the
last active adapter first. (HF PEFT rotates by the first one first and its merged model then differs from its
forward; for an embedding both orders agree.) Like the other non-LoRA layers it has no `peftkit_kind`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...record import RoutedHolder, wrappers
from ...weights import adapter_dtype, base_device, get_dense_weight, merge_dtype, set_dense_weight
from . import rotation as rot

KINDS = ("linear", "conv2d", "embedding")


@dataclass(frozen=True)
class Settings:
    """One adapter's layout and form in this layer (block layout already moved to divide the width)."""

    blocks: int
    block_size: int
    block_share: bool
    coft: bool
    eps: float
    use_neumann: bool
    terms: int
    module_dropout: float


def adapter_settings(config, width: int) -> Settings:
    """An OFTConfig's settings for a layer rotating `width` features (r / oft_block_size moved to divide it)."""
    blocks, size = rot.block_layout(width, config.r, config.oft_block_size)
    return Settings(blocks, size, config.block_share, config.coft, float(config.eps), config.use_cayley_neumann,
                    config.num_cayley_neumann_terms, float(config.module_dropout))


def rotated_width(base: nn.Module, kind: str) -> int:
    """The features R acts on: in_features, in_channels (1x1 kernel) or embedding_dim."""
    if kind == "embedding":
        return base.embedding_dim
    if kind == "conv2d":
        return base.in_channels
    if hasattr(base, "in_features"):
        return base.in_features
    return get_dense_weight(base).shape[1]


class OFTLayer(RoutedHolder, nn.Module):
    """Wraps one layer of kind 'linear', 'conv2d' (1x1) or 'embedding'; holds any number of named OFT adapters."""

    peftkit_wrapper = True
    peftkit_peft_type = "OFT"  # the method whose wrapper this is (targeting judges its own by their base)
    peftkit_holder = True

    def __init__(self, base: nn.Module, kind: str, path: str = "") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"OFTLayer wraps layers of kind {KINDS}, not {kind!r}")
        self.base = base
        self.training = base.training
        self.kind = kind
        self.path = path  # for error messages
        self.width = rotated_width(base, kind)
        self.oft_R = nn.ParameterDict()
        self.settings: dict[str, Settings] = {}
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        self.pending: tuple[str, ...] = ()  # active, present here and not merged, in the order forward applies them
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # set by peftkit.per_row for mixed batches
        self._refresh()

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (PEFT's wrappers pass it through too; T5 reads `layer.weight.dtype`)."""
        return self.base.weight

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "base" and "settings" in self.__dict__:  # a replaced base must be the one called
            self._refresh()

    # --- the holder protocol (peftkit.record.AdapterHolder) ----------------------------------------
    def add_adapter(self, name: str, settings: Settings, init: bool = True) -> None:
        """Create adapter `name`'s parameter, (blocks or 1, b(b-1)/2); `init` True starts it at zero (R = I)."""
        if name in self.settings:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if settings.blocks * settings.block_size != self.width:
            raise ValueError(f"{self.path}: {settings.blocks} blocks of {settings.block_size} do not cover its "
                             f"{self.width} features")
        rows = 1 if settings.block_share else settings.blocks
        shape = (rows, settings.block_size * (settings.block_size - 1) // 2)
        self.oft_R[name] = nn.Parameter(torch.empty(shape, device=base_device(self.base),
                                                    dtype=adapter_dtype(self.base)))
        self.settings[name] = settings
        self.reset_adapter(name, init)

    @torch.no_grad()
    def reset_adapter(self, name: str, init: bool) -> None:
        """PEFT's init_weights: True zeros (the identity rotation); False N(0, 0.1) (so the output changes)."""
        if init:
            nn.init.zeros_(self.oft_R[name])
        else:
            nn.init.normal_(self.oft_R[name], mean=0.0, std=0.1)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.oft_R[name]]

    def adapter_names(self) -> list[str]:
        return list(self.settings)

    def _order(self, pending: list[str]) -> tuple[str, ...]:
        """Rotations do not commute: a weight is rotated by the last active adapter first, as merging does."""
        return tuple(pending if self.kind == "embedding" else reversed(pending))

    def _drop(self, name: str) -> None:
        del self.oft_R[name]
        del self.settings[name]

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes (merged adapters stay in its weights)."""
        return self.base

    # --- the rotation ---------------------------------------------------------------------------------
    def rotation(self, name: str) -> Tensor:
        """Adapter `name`'s blocks R, (blocks or 1, b, b) in the parameter's dtype. With COFT the stored parameter
        is first projected in place when it left its radius (as PEFT's forward does)."""
        s, param = self.settings[name], self.oft_R[name]
        if s.coft:
            with torch.no_grad():
                projected = rot.coft_projection(param, s.block_size, s.eps)
                if projected is not None:
                    param.copy_(projected)
        return rot.cayley(rot.skew(param, s.block_size), s.use_neumann, s.terms)

    def _dropped(self, name: str, blocks: Tensor) -> Tensor:
        """module_dropout in training: that share of the blocks (at random) replaced by the identity."""
        s = self.settings[name]
        count = int(s.module_dropout * blocks.shape[0])
        if not (self.training and count and blocks.shape[0] > 1):
            return blocks
        mask = torch.zeros(blocks.shape[0], 1, 1, device=blocks.device, dtype=blocks.dtype)
        mask[torch.randperm(blocks.shape[0], device=blocks.device)[:count]] = 1
        eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
        return (1 - mask) * blocks + mask * eye

    def _rotate(self, name: str, x: Tensor) -> Tensor:
        """x with adapter `name`'s rotation applied to its feature (channel) dimension, in x's dtype."""
        s = self.settings[name]
        blocks = self._dropped(name, self.rotation(name))
        h = x.to(blocks.dtype)
        if self.kind == "conv2d":  # the channels of every pixel: (B, C, H, W) -> (B, H, W, C) and back
            out = rot.rotate(h.movedim(-3, -1), blocks, s.blocks).movedim(-1, -3)
            return out.to(x.dtype).contiguous()  # the conv's usual layout (a channels-last one rounds differently)
        return rot.rotate(h, blocks, s.blocks).to(x.dtype)

    # --- merging ----------------------------------------------------------------------------------
    def _rotated_weight(self, name: str, inverse: bool) -> Tensor:
        W = get_dense_weight(self.base)
        wide = merge_dtype(W)
        blocks = self.rotation(name).detach().to(W.device, wide)
        flat = W.to(wide).reshape(W.shape[0], -1)  # (out, in), a 1x1 kernel's (out, in, 1, 1) too
        if self.kind == "embedding":
            out = rot.rotate_weight_outputs(flat, blocks, self.settings[name].blocks, inverse)
        else:
            out = rot.rotate_weight_inputs(flat, blocks, self.settings[name].blocks, inverse)
        return out.reshape(W.shape).to(W.dtype)

    @torch.no_grad()
    def merged_weight(self, name: str) -> Tensor:
        """The base weight, in its own dtype, after merging adapter `name` (what merge writes)."""
        return self._rotated_weight(name, inverse=False)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W <- W R^T (E <- E R), in place. Merging an adapter already merged does nothing."""
        if name in self.merged:
            return
        set_dense_weight(self.base, self._rotated_weight(name, inverse=False))
        self.merged.append(name)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """W <- W R^-T (E <- E R^-1) with the adapter's current parameter."""
        if name not in self.merged:
            return
        set_dense_weight(self.base, self._rotated_weight(name, inverse=True))
        self.merged.remove(name)
        self._refresh()

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._forward_rows(x, *args, **kwargs)
        if self.kind == "embedding":
            out = self.base(x, *args, **kwargs)  # (B, T, dim)
            for name in self.pending:
                out = self._rotate(name, out)
            return out
        for name in self.pending:
            x = self._rotate(name, x)  # (B, T, in) or (B, C, H, W)
        return self.base(x, *args, **kwargs)

    def _forward_rows(self, x: Tensor, *args, **kwargs) -> Tensor:
        """One batch whose row i uses adapter row_adapters[i] (None, or one not placed here: the base alone)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        target = self.base(x, *args, **kwargs) if self.kind == "embedding" else x
        for name in dict.fromkeys(rows):
            if name is None or name not in self.settings:
                continue
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            target = target.index_copy(0, idx, self._rotate(name, target.index_select(0, idx)))
        return target if self.kind == "embedding" else self.base(target, *args, **kwargs)

    def extra_repr(self) -> str:
        layout = {n: f"{s.blocks}x{s.block_size}" + (" shared" if s.block_share else "") for n, s in self.settings.items()}
        return (f"kind={self.kind}, width={self.width}, blocks={layout}, active={list(self.active)}, "
                f"merged={self.merged}")


def oft_layers(model: nn.Module) -> Iterator[tuple[str, OFTLayer]]:
    """Every OFTLayer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, OFTLayer):
            yield path, w
