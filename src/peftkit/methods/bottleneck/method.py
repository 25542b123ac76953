"""Bottleneck adapters as a registered method, and their model-level functions (kept as public API:
each is the generic peftkit function restricted to bottleneck adapters)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

from ...checkpoint import load_adapter, read_adapter, save_adapter
from ... import hf
from ...files import PREFIX
from ...inject import inject
from ...merge import merge_check as check_mergeable
from ...record import configs, forget, replace_module, require_adapter
from ...registry import Expected
from . import io, plan
from .config import BottleneckConfig
from .layer import MERGE_REFUSAL, BottleneckLayer
from ...targeting import target_spec
from .targets import default_bottleneck_targets, select_bottleneck_targets


class BottleneckMethod:
    """peft_type BOTTLENECK: a residual MLP on a module's output (Houlsby, Pfeiffer); never merges."""

    peft_type = "BOTTLENECK"
    config_class = BottleneckConfig
    train_names = ("bottleneck",)
    train_help = {"bottleneck": "adapter layers (--variant)"}
    merge_refusal = MERGE_REFUSAL
    file_key_prefix = PREFIX
    ranked = False  # has a rank and target layers (the planner's and sweep's rank candidates)
    nf4_train_names = ()  # train names whose frozen base is quantized to NF4
    plan = plan

    def read_config(self, data: dict[str, Any]) -> BottleneckConfig:
        return BottleneckConfig.from_peft_dict(data)

    def inject(self, model: nn.Module, config: BottleneckConfig, name: str, init: bool) -> None:
        for path, module, size in select_bottleneck_targets(model, config):  # raises before anything changes
            layer = module if isinstance(module, BottleneckLayer) else BottleneckLayer(module, size, path)
            layer.add_adapter(name, config.reduction_factor, config.non_linearity, init=init)
            if layer is not module:
                replace_module(model, path, layer)

    def extra_trainable(self, model: nn.Module, name: str, config: BottleneckConfig) -> list[nn.Parameter]:
        return []

    def state_dict(self, model: nn.Module, name: str, config: BottleneckConfig) -> dict[str, Tensor]:
        return io.state_dict(model, name)

    def expected(self, model: nn.Module, config: BottleneckConfig) -> Expected:
        return io.expected(model, config)

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        io.load_tensors(model, name, tensors)

    def file_config(self, model: nn.Module, name: str, config: BottleneckConfig) -> dict[str, Any]:
        if config.base_model_name_or_path is None:
            config = config.replace(base_model_name_or_path=hf.name_or_path(model))
        if config.target_modules is None:  # as PEFT does: the file names the modules it was trained on
            config = config.replace(target_modules=default_bottleneck_targets(model, config.variant))
        return config.to_peft_dict()

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        return nullcontext()  # no fused nodes: the model's own forward

    def config_from_options(self, o: Any) -> BottleneckConfig:
        targets = None if o.target_modules == "all-linear" else target_spec(o.target_modules)
        return BottleneckConfig(variant=o.variant, reduction_factor=o.reduction_factor,
                                non_linearity=o.non_linearity, target_modules=targets)

    def describe_options(self, o: Any) -> str:
        return f"bottleneck ({o.variant}, reduction {o.reduction_factor}, {o.non_linearity})"

    def describe(self, config: BottleneckConfig) -> str:
        return config.describe()


METHOD = BottleneckMethod()


def _require_bottleneck(model: nn.Module, name: str) -> None:
    require_adapter(model, name)
    if not isinstance(configs(model)[name], BottleneckConfig):
        raise TypeError(f"adapter {name!r} is not a bottleneck adapter; save it with peftkit.save_adapter")


def inject_bottleneck(model: nn.Module, config: BottleneckConfig, name: str = "default", *,
                      init: bool = True) -> nn.Module:
    """Add bottleneck adapter `name` to `model` in place and make it the one active, trainable adapter.
    Everything else is frozen. `init=False` skips the initialisation (the loader fills the weights)."""
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"inject_bottleneck expects a BottleneckConfig, got {type(config).__name__}")
    return inject(model, config, name, init=init)


def bottleneck_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors under the file's key names (without the `base_model.model.` prefix)."""
    _require_bottleneck(model, name)
    return io.state_dict(model, name)


def save_bottleneck(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write bottleneck adapter `name` to `directory` (adapter_config.json + adapter_model.safetensors)."""
    _require_bottleneck(model, name)
    return save_adapter(model, directory, name)


def read_bottleneck(directory: str | os.PathLike, name: str = "default") -> tuple[BottleneckConfig, dict[str, Tensor]]:
    """(config, tensors with the `base_model.model.` prefix stripped), without touching a model."""
    config, tensors = read_adapter(directory, name)
    if not isinstance(config, BottleneckConfig):
        raise ValueError(f"adapter_config.json has peft_type {config.peft_type!r}; this reads 'BOTTLENECK'")
    return config, tensors


def load_bottleneck(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                    trainable: bool = False) -> nn.Module:
    """Load a bottleneck adapter into `model` in place as adapter `name`, and make it active (checked
    first: on any problem every offending key is named and the model is left as it was)."""
    read_bottleneck(directory, name)
    return load_adapter(model, directory, name, trainable=trainable)


def merge_check(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Raise if any of `names` (default: every adapter in the model) cannot be merged, as a bottleneck
    adapter cannot; peftkit.merge makes the same check before merging anything."""
    check_mergeable(model, names)


def unload_bottleneck(model: nn.Module) -> nn.Module:
    """Put every module wrapped by a BottleneckLayer back and forget the bottleneck adapters; other
    methods' adapters stay. The model then computes what it did before any bottleneck was added."""
    for path, w in list(io.bottleneck_layers(model)):
        replace_module(model, path, w.base)
    for name in [n for n, c in configs(model).items() if isinstance(c, BottleneckConfig)]:
        forget(model, name)
    return model
