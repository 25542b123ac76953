"""Put adapter layers into a model in place, and take them out again.

The user's model stays the user's model: targeted submodules are replaced by wrappers that keep the
original as `.base`, and the adapters' configs are kept in a plain dict attribute on the root module
(`model.peftkit_configs`), so nothing forwards attributes and the model pickles and deep-copies as usual.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .methods.lora import LoraLayer
from .methods.saved_copy import SavedCopy
from .targeting import adaptable_kind, named_modules_outside_wrappers, select_targets

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters in this model, by adapter name (empty if none)."""
    return model.__dict__.setdefault("peftkit_configs", {})


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every peftkit wrapper in the model (LoRA layers and saved copies), with its module path."""
    for name, module in model.named_modules():
        if getattr(module, "peftkit_wrapper", False):
            yield name, module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in wrappers(model):
        if isinstance(module, LoraLayer):
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


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def saved_copy_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules named by modules_to_save: a name equal to an entry or ending with "." + entry."""
    if not config.modules_to_save:
        return []
    found = [(n, m) for n, m in named_modules_outside_wrappers(model)
             if any(n == e or n.endswith("." + e) for e in config.modules_to_save)]
    missing = [e for e in config.modules_to_save if not any(n == e or n.endswith("." + e) for n, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save names modules that do not exist: {missing}")
    return found


def inject(model: nn.Module, config: LoraConfig, name: str = "default", *, init: bool = True) -> nn.Module:
    """Add LoRA adapter `name` to `model` in place and make it the one active, trainable adapter.

    Works on any torch module tree: nn.Linear, transformers' Conv1D and nn.Embedding modules that the
    config's target_modules select are wrapped. Everything else is frozen. Returns the same model.
    `init=False` skips the initialisation (the caller fills the weights, as the loader does).
    """
    from .methods.bottleneck import BottleneckConfig, inject_bottleneck  # here: it imports this module

    from .methods.prefix import PrefixConfig, inject_prefix, prefix_configs

    if isinstance(config, BottleneckConfig):
        return inject_bottleneck(model, config, name, init=init)
    if isinstance(config, PrefixConfig):
        return inject_prefix(model, config, name, init=init)
    check_name(name)
    if name in prefix_configs(model):
        raise ValueError(f"adapter {name!r} already exists (a prefix); remove it first or pick another name")
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"inject expects a LoraConfig, got {type(config).__name__}")
    targets = select_targets(model, config)  # raises before anything changes
    copies = saved_copy_targets(model, config)
    if config.init_lora_weights == "pissa" and any(adaptable_kind(m) == "embedding" for _, m in targets):
        raise ValueError("init_lora_weights='pissa' applies to linear layers only; exclude the embeddings")

    for path, module in targets:
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module, adaptable_kind(module))
        layer.add_adapter(
            name, r=config.rank_for(path), scaling=config.scaling_for(path), dropout=config.lora_dropout,
            init=config.init_lora_weights if init else True, dora=config.use_dora,
        )
        if layer is not module:
            _replace(model, path, layer)
    for path, module in copies:
        wrapper = module if isinstance(module, SavedCopy) else SavedCopy(module)
        wrapper.add_adapter(name)
        if wrapper is not module:
            _replace(model, path, wrapper)
    configs(model)[name] = config
    from .adapters import set_active  # the registry functions live in adapters.py

    set_active(model, [name])
    mark_trainable(model, name)
    return model


def mark_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze everything, then unfreeze adapter `name`'s weights (and biases, per config.bias)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if name is None:
        return
    config = configs(model)[name]
    for _, w in wrappers(model):
        if isinstance(w, LoraLayer) and name in w.lora_A:
            for p in w.adapter_parameters(name):  # A, B and a DoRA magnitude
                p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(w.base, "bias", None) is not None:
                w.base.bias.requires_grad_(True)
        elif isinstance(w, SavedCopy) and name in w.copies:
            w.copies[name].requires_grad_(True)
        elif hasattr(w, "adapter_parameters") and name in w.adapter_names():  # other methods' wrappers
            for p in w.adapter_parameters(name):
                p.requires_grad_(True)
    if getattr(config, "bias", "none") == "all":
        for pname, p in model.named_parameters():
            if pname.split(".")[-1] == "bias" and ".copies." not in pname:
                p.requires_grad_(True)


def remove_wrappers(model: nn.Module, keep_copy_of: str | None = None) -> nn.Module:
    """Replace every wrapper by its base module (for a saved copy: by `keep_copy_of`'s copy if it has
    one). Adapters still unmerged are dropped; the caller merges first when that matters."""
    for path, w in list(wrappers(model)):
        if isinstance(w, SavedCopy) and keep_copy_of in w.copies:
            _replace(model, path, w.copies[keep_copy_of])
        else:
            _replace(model, path, w.base)
    model.__dict__.pop("peftkit_configs", None)
    return model
