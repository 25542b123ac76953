"""Prefix tuning as a registered method, and its model-level functions (kept as public API: each is the
generic peftkit function restricted to prefixes)."""

from __future__ import annotations

import os
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ...adapters import delete_adapter
from ...checkpoint import load_adapter, read_adapter, save_adapter
from ... import hf
from ...inject import inject
from ...record import active_adapters, configs, mark_trainable, set_active
from ...registry import Expected
from . import plan
from .config import KEY, PEFT_TYPE, PrefixConfig, prefix_geometry, refuse_checkpointing
from .hooks import PrefixAdapters, PrefixEncoder

MERGE_REFUSAL = ("prefixes {names} cannot be merged into the base weights: they are extra key/value positions, "
                 "not a change of any weight")


def container(model: nn.Module) -> PrefixAdapters | None:
    found = getattr(model, "peftkit_prefix", None)
    return found if isinstance(found, PrefixAdapters) else None


def require_prefix(model: nn.Module, name: str) -> PrefixAdapters:
    adapters = container(model)
    if adapters is None or name not in adapters.encoders:
        known = ", ".join(adapters.encoders) if adapters else "none"
        raise KeyError(f"no prefix named {name!r} in this model (prefixes: {known})")
    return adapters


class PrefixMethod:
    """peft_type PREFIX_TUNING: trained key/value vectors prepended in every attention layer's cache."""

    peft_type = PEFT_TYPE
    config_class = PrefixConfig
    train_names = ("prefix",)
    train_help = {"prefix": "prefix tuning (--num-virtual-tokens)"}
    merge_refusal = MERGE_REFUSAL
    file_key_prefix = ""  # PEFT stores prompt_embeddings without the base_model.model. prefix
    ranked = False  # has a rank and target layers (the planner's and sweep's rank candidates)
    nf4_train_names = ()  # train names whose frozen base is quantized to NF4
    plan = plan

    def read_config(self, data: dict[str, Any]) -> PrefixConfig:
        return PrefixConfig.from_file(data)

    def inject(self, model: nn.Module, config: PrefixConfig, name: str, init: bool) -> None:
        geometry = prefix_geometry(model)  # raises, naming the model class, when it cannot take a prefix
        refuse_checkpointing(model)
        adapters = container(model)
        if adapters is None:
            adapters = PrefixAdapters(model, geometry)
            model.add_module("peftkit_prefix", adapters)
        param = next(model.parameters(), None)
        encoder = PrefixEncoder(config, geometry, init=init)
        adapters.encoders[name] = encoder.to(param.device) if param is not None else encoder
        adapters.enabled = True

    def extra_trainable(self, model: nn.Module, name: str, config: PrefixConfig) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: PrefixConfig) -> dict[str, Tensor]:
        """{"prompt_embeddings": [P, num_layers * 2 * token_dim]}, with any projection folded in."""
        encoder = require_prefix(model, name).encoders[name]
        with torch.no_grad():
            return {KEY: encoder().detach()}

    def expected(self, model: nn.Module, config: PrefixConfig) -> Expected:
        try:
            geometry = prefix_geometry(model)
        except ValueError as err:
            return Expected(problems=[str(err)])
        want = Expected(required={KEY: (config.num_virtual_tokens, geometry.width)})
        want.notes[KEY] = (f"(num_virtual_tokens, num_layers * 2 * token_dim = {geometry.num_layers} * 2 * "
                           f"{geometry.token_dim})")
        stated = dict(zip(("num_layers", "token_dim", "num_attention_heads"), config.file_geometry or ()))
        ours = {"num_layers": geometry.num_layers, "token_dim": geometry.token_dim,
                "num_attention_heads": geometry.num_heads}
        want.problems = [f"{key}: file {stated[key]}, model {ours[key]}" for key in ours
                         if stated.get(key) is not None and stated[key] != ours[key]]
        return want

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        with torch.no_grad():
            model.peftkit_prefix.encoders[name].prompt_embeddings.copy_(tensors[KEY])

    def file_config(self, model: nn.Module, name: str, config: PrefixConfig) -> dict[str, Any]:
        """PEFT's PrefixTuningConfig with the model's geometry; a projection is folded on disk."""
        adapters = require_prefix(model, name)
        config = adapters.encoders[name].config.replace(projection_dim=None)
        if config.base_model_name_or_path is None:
            config = config.replace(base_model_name_or_path=hf.name_or_path(model))
        return config.to_peft_dict(adapters.geometry)

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> PrefixConfig:
        return PrefixConfig(num_virtual_tokens=o.num_virtual_tokens, projection_dim=o.prefix_projection)

    def describe_options(self, o: Any) -> str:
        return f"prefix tuning ({o.num_virtual_tokens} virtual tokens)"

    def describe(self, config: PrefixConfig) -> str:
        return f"prefix, {config.num_virtual_tokens} virtual tokens, projection_dim={config.projection_dim}"


METHOD = PrefixMethod()


# --- the model-level API -----------------------------------------------------------------------------------
def prefix_configs(model: nn.Module) -> dict[str, PrefixConfig]:
    """The configs of the prefixes in this model, by name (empty if none)."""
    return {n: c for n, c in configs(model).items() if isinstance(c, PrefixConfig)}


def inject_prefix(model: nn.Module, config: PrefixConfig, name: str = "default", *, init: bool = True) -> nn.Module:
    """Add prefix `name` to `model` in place and make it the active, only trainable part. Returns the model.
    Raises before changing anything when the model cannot take a prefix (the error names its class)."""
    if not isinstance(config, PrefixConfig):
        raise TypeError(f"inject_prefix expects a PrefixConfig, got {type(config).__name__}")
    return inject(model, config, name, init=init)


def set_prefix_trainable(model: nn.Module, name: str | None) -> None:
    """Freeze every parameter of the model, then unfreeze prefix `name` (None: freeze everything)."""
    if name is not None:
        require_prefix(model, name)
    mark_trainable(model, name)


def set_active_prefix(model: nn.Module, name: str | None) -> None:
    """Make prefix `name` the one the model uses (None: none); other methods' active adapters stay."""
    if name is not None:
        require_prefix(model, name)
    others = [n for n in active_adapters(model) if n not in prefix_configs(model)]
    set_active(model, others + ([name] if name is not None else []))


def active_prefix(model: nn.Module) -> str | None:
    adapters = container(model)
    return adapters.current if adapters is not None and adapters.enabled else None


def set_prefix_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the active prefix off (the model computes its base output exactly) or on again."""
    adapters = container(model)
    if adapters is not None:
        adapters.set_disabled(not enabled)


def remove_prefix(model: nn.Module, name: str = "default") -> nn.Module:
    """Delete prefix `name`; with the last one gone the hooks and `model.peftkit_prefix` go too."""
    require_prefix(model, name)
    delete_adapter(model, name)
    return model


def fold_prefix(model: nn.Module, name: str = "default") -> None:
    """Replace prefix `name`'s projection MLP by the prompt_embeddings it computes (same outputs)."""
    encoder = require_prefix(model, name).encoders[name]
    encoder.fold()
    configs(model)[name] = encoder.config


def prefix_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """PEFT's file contents for prefix `name`: {"prompt_embeddings": [P, num_layers * 2 * token_dim]}."""
    return METHOD.state_dict(model, name, configs(model).get(name))


def save_prefix(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                tensors: dict[str, Tensor] | None = None) -> Path:
    """Write prefix `name` in PEFT's PREFIX_TUNING format (loadable by PeftModel.from_pretrained):
    adapter_config.json with the model's geometry, and adapter_model.safetensors with the projection folded
    in. `tensors` (prefix_state_dict's form, e.g. gathered from a sharded run) replaces the model's values."""
    require_prefix(model, name)
    return save_adapter(model, directory, name, tensors=tensors)


def read_prefix(directory: str | os.PathLike, name: str = "default") -> tuple[PrefixConfig, dict[str, Tensor]]:
    """(config, tensors) of a saved prefix, without touching a model."""
    config, tensors = read_adapter(directory, name)
    if not isinstance(config, PrefixConfig):
        raise ValueError(f"adapter_config.json has peft_type {config.peft_type!r}; this reads {PEFT_TYPE!r}")
    return config, tensors


def load_prefix(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                trainable: bool = False) -> nn.Module:
    """Load a PEFT PREFIX_TUNING adapter into `model` as prefix `name` and make it active. The tensor and the
    file's geometry are checked against the model first; on any problem the error lists them all and the
    model is left unchanged."""
    read_prefix(directory, name)
    return load_adapter(model, directory, name, trainable=trainable)
