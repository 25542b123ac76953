"""Several adapters on one model: which are active, switching them off, per-row routing, counting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .inject import configs, mark_trainable, remove_wrappers, require_adapter, wrappers
from .methods.lora import LoraLayer


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (their LoRA terms add up; an empty list means the base alone).
    Trainability is not changed: use `peftkit.set_trainable` for that."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        require_adapter(model, name)
    for _, w in wrappers(model):
        w.set_active(tuple(names))


def active_adapters(model: nn.Module) -> list[str]:
    for _, w in wrappers(model):
        return list(w.active)
    return []


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything but adapter `name` (None: freeze everything)."""
    if name is not None:
        require_adapter(model, name)
    mark_trainable(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its weights; a wrapper left with no adapter becomes its base again."""
    from .methods.prefix import prefix_configs, remove_prefix

    if name in prefix_configs(model):
        remove_prefix(model, name)
        return
    require_adapter(model, name)
    merged = [p for p, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.merged]
    if merged:
        raise RuntimeError(f"adapter {name!r} is merged into {merged[:3]}...; unmerge(model) first")
    for _, w in wrappers(model):
        if name in w.adapter_names():
            w.delete_adapter(name)
    del configs(model)[name]
    if not configs(model):
        remove_wrappers(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes its base output exactly. Merged adapters are unmerged for
    the block and merged again after it."""
    from .merge import merge, merged_adapters, unmerge

    from .methods.prefix import set_prefix_enabled

    merged = merged_adapters(model)
    if merged:
        unmerge(model)
    states = [(w, w.disabled) for _, w in wrappers(model)]
    for w, _ in states:
        w.set_disabled(True)
    prefix = getattr(model, "peftkit_prefix", None)
    prefix_before = prefix.enabled if prefix is not None else None
    if prefix is not None:
        set_prefix_enabled(model, False)
    try:
        yield
    finally:
        for w, before in states:
            w.set_disabled(before)
        if prefix is not None:
            set_prefix_enabled(model, prefix_before)
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
    from .merge import merged_adapters

    if merged_adapters(model):
        raise RuntimeError("per_row needs unmerged adapters; call peftkit.unmerge(model) first")
    layers = [w for _, w in wrappers(model)]
    for w in layers:
        w.set_rows(names)
    try:
        yield
    finally:
        for w in layers:
            w.set_rows(None)


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
        layers = [p for p, w in wrappers(model) if name in w.adapter_names()]
        lora = f"r={cfg.r} alpha={cfg.lora_alpha} rslora={cfg.use_rslora}" if cfg.peft_type == "LORA" else None
        what = lora or cfg.describe()  # other methods' configs describe themselves
        lines.append(f"adapter {name!r}: {what} on {len(layers)} modules; active={name in active_adapters(model)}")
    return "\n".join(lines)
