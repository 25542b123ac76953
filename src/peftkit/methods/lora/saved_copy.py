"""`modules_to_save`: a fully trainable copy of a module (a classifier head, a resized embedding) per adapter.

The wrapper keeps the original module as `.base` and one deep copy per adapter in `.copies`; the active
adapter's copy runs instead of the original. In PEFT files the copy's parameters are stored under the
module's own path (`base_model.model.lm_head.weight`), which is what LoRA's file I/O (io.py) reads and writes.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SavedCopy(nn.Module):
    peftkit_wrapper = True
    peftkit_holder = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.row_adapters: list[str | None] | None = None

    def add_adapter(self, name: str) -> None:
        if name in self.copies:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        module = copy.deepcopy(self.base)
        for p in module.parameters():
            p.requires_grad_(True)
        self.copies[name] = module

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(names)

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def set_rows(self, rows: list[str | None] | None) -> None:
        self.row_adapters = rows

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.set_active(tuple(n for n in self.active if n != name))

    def adapter_names(self) -> list[str]:
        return list(self.copies.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.copies[name].parameters())

    def unwrap(self, keep_copy_of: str | None = None) -> nn.Module:
        """The module to put back when the wrapper goes: `keep_copy_of`'s trained copy, else the original."""
        return self.copies[keep_copy_of] if keep_copy_of in self.copies else self.base

    def chosen(self) -> nn.Module:
        """The module that runs for the whole batch: the active adapter's copy, else the original."""
        if self.disabled:
            return self.base
        names = [n for n in self.active if n in self.copies]
        if len(names) > 1:
            raise RuntimeError(
                f"adapters {names} each have their own copy of this module and only one can run; "
                "activate one of them, or use per_row to give each row its own"
            )
        return self.copies[names[0]] if names else self.base

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.row_adapters is None or self.disabled:
            return self.chosen()(x, *args, **kwargs)
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"per_row got {len(rows)} adapter names for a batch of {x.shape[0]} rows")
        groups: dict[str | None, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name if name in self.copies else None, []).append(i)
        parts, order = [], []
        for name, idx in groups.items():
            module = self.copies[name] if name is not None else self.base
            parts.append(module(x[idx], *args, **kwargs))
            order.extend(idx)
        out = torch.cat(parts, dim=0)
        inverse = torch.empty(len(order), dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out.index_select(0, inverse)
