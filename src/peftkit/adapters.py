"""Several adapters on one model: which are active, switching them off, per-row routing, counting.
Every function works through the adapter holders' shared protocol (`peftkit.record.AdapterHolder`), so it
applies to every registered method alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .merge import merge, merged_adapters, unmerge
from .record import (active_adapters, configs, drop_empty_containers, forget, holders, mark_trainable, remove_wrappers, require_adapter,
                     set_active, wrappers)
from .registry import for_config

__all__ = ["active_adapters", "delete_adapter", "disable_adapters", "per_row", "set_active", "set_trainable",
           "summary", "trainable_parameters"]


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything but adapter `name` (None: freeze everything)."""
    if name is not None:
        require_adapter(model, name)
    mark_trainable(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its weights; a wrapper left with no adapter becomes its base again."""
    require_adapter(model, name)
    merged = [p for p, w in wrappers(model) if name in getattr(w, "merged", ())]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into {merged[:3]}...; unmerge(model) first")
    for _, holder in list(holders(model)):
        if name in holder.adapter_names():
            holder.delete_adapter(name)
    drop_empty_containers(model)
    forget(model, name)
    if not configs(model):
        remove_wrappers(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its base output exactly. Merged adapters are unmerged for
    the block and merged again after it."""
    merged = merged_adapters(model)
    if merged:
        unmerge(model)
    states = [(h, h.disabled) for _, h in holders(model)]
    for h, _ in states:
        h.set_disabled(True)
    try:
        yield
    finally:
        for h, before in states:
            h.set_disabled(before)
        if merged:
            merge(model, merged)


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run one batch whose row i uses adapter names[i] (None: the base model), equal to running each
    row alone with that adapter active. Adapters must be unmerged.

        with peftkit.per_row(model, ["support", None, "legal"]):
            logits = model(input_ids).logits   # input_ids has 3 rows
    """
    names = list(names)
    for name in {n for n in names if n is not None}:
        require_adapter(model, name)
    if merged_adapters(model):
        raise RuntimeError("per_row needs unmerged adapters; call peftkit.unmerge(model) first")
    layers = [h for _, h in holders(model)]
    try:
        for h in layers:
            h.set_rows(names)
        yield
    finally:
        for h in layers:
            h.set_rows(None)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once. A quantized layer's weight,
    stored as buffers, counts as the parameters it represents (`stored_weight_numel`)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(getattr(m, "stored_weight_numel", 0) for m in model.modules())
    return trainable, total


def summary(model: nn.Module) -> str:
    """A printable line per adapter and the trainable share, e.g. for logs."""
    trainable, total = trainable_parameters(model)
    lines = [f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"]
    for name, cfg in configs(model).items():
        places = [p for p, h in holders(model) if name in h.adapter_names()]
        lines.append(f"adapter {name!r}: {for_config(cfg).describe(cfg)} on {len(places)} modules; "
                     f"active={name in active_adapters(model)}")
    return "\n".join(lines)
