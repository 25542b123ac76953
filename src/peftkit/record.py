"""The model's record of its adapters, and the protocol of the modules that hold their weights.

One record per model: `model.peftkit_configs` (adapter name -> config, any method) and `model.peftkit_active`
(the active names, in order), plain attributes of the root module, so nothing forwards attributes and the
model pickles and deep-copies as usual. The weights live in holder modules: wrappers that replace a targeted
module and keep it as `.base` (LoRA, bottleneck, modules_to_save copies) or a container registered on the
model (the prefix). Every holder implements `AdapterHolder`, so activation, disabling, per-row routing,
deletion and trainability are one loop over holders, whatever the method.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from torch import nn

from .registry import AdapterConfig, for_config

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


@runtime_checkable
class AdapterHolder(Protocol):
    """A module holding named adapters' weights (marked with `peftkit_holder = True`)."""

    active: tuple[str, ...]

    def adapter_names(self) -> list[str]: ...

    def adapter_parameters(self, name: str) -> list[nn.Parameter]: ...

    def set_active(self, names: tuple[str, ...]) -> None: ...

    def set_disabled(self, disabled: bool) -> None: ...

    def set_rows(self, rows: list[str | None] | None) -> None: ...

    def delete_adapter(self, name: str) -> None: ...


def route_forward(wrapper: nn.Module, idle: bool) -> None:
    """With nothing to add (`idle`: merged, disabled or no adapter active here, and no per-row routing), calls
    of the wrapper go straight to its base module: the wrapper then costs no frame of its own (about 7 us a
    layer at one token), and hooks registered on the base still fire, since the base is called as a module
    (never its bound forward). Otherwise the wrapper's own forward runs."""
    if idle:
        wrapper.__dict__["forward"] = wrapper.base
    else:
        wrapper.__dict__.pop("forward", None)


class RoutedHolder:
    """The bookkeeping that every wrapping holder shares, as a mixin: which adapters are active, whether they
    are disabled or routed per row, which are merged; `pending` (active here, not merged) is what forward adds,
    and with nothing to add calls go straight to the base (`route_forward`). A holder using it sets `active`,
    `disabled`, `row_adapters` (and `merged` where it merges) in __init__ and defines `adapter_names()` and
    `_drop(name)` (remove the adapter's own tensors); `_order` and `_idle` may be overridden."""

    def set_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(names)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._refresh()

    def set_rows(self, rows: list[str | None] | None) -> None:
        self.row_adapters = rows
        self._refresh()

    def _order(self, pending: list[str]) -> tuple[str, ...]:
        """The order forward applies the pending adapters in (the activation order)."""
        return tuple(pending)

    def _idle(self) -> bool:
        """True when forward has nothing to add: calls then go straight to the base."""
        return (self.disabled or not self.pending) and self.row_adapters is None

    def _refresh(self) -> None:
        here, merged = set(self.adapter_names()), getattr(self, "merged", ())
        self.pending = self._order([n for n in self.active if n in here and n not in merged])
        route_forward(self, self._idle())

    def delete_adapter(self, name: str) -> None:
        if name in getattr(self, "merged", ()):
            raise RuntimeError(f"adapter {name!r} is merged into the base; unmerge it before deleting it")
        self._drop(name)
        self.set_active(tuple(n for n in self.active if n != name))


class HookedHolder(nn.Module):
    """A container registered on the model (not a wrapper) whose adapters act through forward hooks on the whole
    model, one at a time (prefix tuning, prompt tuning): the holder protocol, and binding forward's arguments.
    A subclass sets `encoders` (an nn.ModuleDict), `current`, `enabled`, `cache_arg`, `positional` and `handles` in
    __init__ (`hook_model` does the last three), and says in `TOGETHER` / `PER_ROW` why its adapters cannot be
    active together or differ per row."""

    peftkit_container = True  # holds adapter weights: not a module tree for LoRA targeting to descend into
    peftkit_holder = True  # the AdapterHolder protocol
    TOGETHER = "adapters {names} cannot be active together"
    PER_ROW = "per_row cannot give rows different adapters of this kind"

    def hook_model(self, model: nn.Module, cache_arg: str | None) -> None:
        """Read forward's positional parameters and register the subclass's `_before_forward`/`_after_forward`."""
        import inspect

        self.cache_arg = cache_arg
        self.positional = [p.name for p in inspect.signature(model.forward).parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                        model.register_forward_hook(self._after_forward, with_kwargs=True)]

    @property
    def active(self) -> tuple[str, ...]:
        return (self.current,) if self.current is not None else ()

    @property
    def disabled(self) -> bool:
        return not self.enabled

    def adapter_names(self) -> list[str]:
        return list(self.encoders.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.encoders[name].parameters())

    def set_active(self, names: tuple[str, ...]) -> None:
        mine = [n for n in names if n in self.encoders]
        if len(mine) > 1:
            raise ValueError(self.TOGETHER.format(names=mine))
        self.current = mine[0] if mine else None

    def set_disabled(self, disabled: bool) -> None:
        self.enabled = not disabled

    def set_rows(self, rows: list[str | None] | None) -> None:
        if rows is not None and any(n in self.encoders for n in rows):
            raise ValueError(self.PER_ROW)

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        if self.current == name:
            self.current = None

    def release(self) -> None:
        """Remove the forward hooks (the container is about to leave the model)."""
        for handle in self.handles:
            handle.remove()

    def forward_arguments(self, model: nn.Module, args: tuple, kwargs: dict) -> dict:
        """forward's arguments by name, the cache under `cache_arg` (transformers' deprecated `past_key_values`
        moved there; both given is an error)."""
        if len(args) > len(self.positional):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
        kw = dict(zip(self.positional, args))
        kw.update(kwargs)
        if self.cache_arg not in (None, "past_key_values") and "past_key_values" in kw:  # the deprecated name
            if kw.get(self.cache_arg) is not None:
                raise ValueError("pass either `cache` or `past_key_values`, not both")
            kw[self.cache_arg] = kw.pop("past_key_values")
        return kw


def configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The configs of the adapters in this model, by adapter name (empty if none)."""
    return model.__dict__.setdefault("peftkit_configs", {})


def holders(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module holding adapter weights (wrappers and containers), with its module path."""
    for name, module in model.named_modules():
        if getattr(module, "peftkit_holder", False):
            yield name, module


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every wrapper (a holder that replaced a module and keeps it as `.base`), with its module path."""
    for name, module in model.named_modules():
        if getattr(module, "peftkit_wrapper", False):
            yield name, module


def check_name(name: str) -> None:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r} is not a plain name: use letters, digits, '_' and '-' "
            "(no dots, slashes or spaces), for example 'default' or 'support-tickets'"
        )


def require_adapter(model: nn.Module, name: str) -> None:
    if name not in configs(model):
        known = ", ".join(configs(model)) or "none"
        raise KeyError(f"no adapter named {name!r} in this model (adapters: {known})")


def require_new(model: nn.Module, name: str) -> None:
    """The name is plain and not taken by an adapter of any method."""
    check_name(name)
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at module path `path` of `model` (the root itself cannot be replaced)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters (they apply in this order; an empty list means the base alone).
    Trainability is not changed: use `peftkit.set_trainable` for that."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        require_adapter(model, name)
    for _, holder in holders(model):
        holder.set_active(tuple(names))
    model.__dict__["peftkit_active"] = tuple(names)


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("peftkit_active", ()))


def mark_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything, then unfreeze adapter `name`'s weights (and what its method trains with them)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if name is None:
        return
    for _, holder in holders(model):
        if name in holder.adapter_names():
            for p in holder.adapter_parameters(name):
                p.requires_grad_(True)
    config = configs(model)[name]
    for p in for_config(config).extra_trainable(model, name, config):
        p.requires_grad_(True)


def forget(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from the record (its weights are gone already)."""
    configs(model).pop(name, None)
    active = tuple(n for n in active_adapters(model) if n != name)
    model.__dict__["peftkit_active"] = active
    if not configs(model):
        model.__dict__.pop("peftkit_configs", None)
        model.__dict__.pop("peftkit_active", None)


def remove_wrappers(model: nn.Module, keep_copy_of: str | None = None) -> nn.Module:
    """Replace every wrapper by the module it wrapped (`unwrap(keep_copy_of)`: a saved copy's adapter copy
    when it has one), and forget the adapters no holder keeps any more. Adapters still unmerged are dropped;
    the caller merges first when that matters."""
    for path, w in list(wrappers(model)):
        replace_module(model, path, w.unwrap(keep_copy_of))
    kept = {n for _, h in holders(model) for n in h.adapter_names()}
    for name in [n for n in configs(model) if n not in kept]:
        forget(model, name)
    return model


def drop_empty_containers(model: nn.Module) -> None:
    """A container (a holder that is not a wrapper) left with no adapter releases its hooks and leaves the
    model."""
    for path, holder in list(holders(model)):
        if not getattr(holder, "peftkit_wrapper", False) and not holder.adapter_names():
            holder.release()
            parent_path, _, child = path.rpartition(".")
            delattr(model.get_submodule(parent_path) if parent_path else model, child)

