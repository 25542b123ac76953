"""The method registry: every PEFT method is one folder under `methods/`, registered here under PEFT's
`peft_type`, and the core (inject, checkpoint, merge, adapters), the trainer and the planner reach a method
only through this table; they never name one.

A method is an object satisfying `Method` (torchtune's AdapterModule protocol and PEFT's tuner mapping are
the models): it knows its config class, how to put its layers into a model, its tensors' file keys, whether
it merges, how `peftkit train --method` options become its config, and what it adds to the memory plan.
`peftkit/methods/__init__.py` registers the built-in methods; adding a method is a new folder plus one line
there.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class AdapterConfig(Protocol):
    """What every method's frozen config offers the core."""

    peft_type: str
    base_model_name_or_path: str | None

    def to_peft_dict(self) -> dict[str, Any]: ...

    def replace(self, **changes: Any) -> AdapterConfig: ...


@dataclass
class Expected:
    """What loading a config into a model needs: file key -> shape (required, optional) and the problems
    found before any key is compared (no target matched, the model cannot take the method, ...)."""

    required: dict[str, tuple] = field(default_factory=dict)
    optional: dict[str, tuple] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # key -> how its shape follows from the model


class Method(Protocol):
    """One PEFT method. Stateless: the adapters' weights live in the model (wrappers or a container module),
    their configs in the model's record (`peftkit.record.configs`)."""

    peft_type: str  # PEFT's peft_type, the key in adapter_config.json ("LORA", "BOTTLENECK", ...)
    config_class: type  # the frozen config dataclass, with from_peft_dict / to_peft_dict
    train_names: tuple[str, ...]  # the `peftkit train --method` / planner names this method serves
    train_help: dict[str, str]  # train name -> what it is, for `--help` (e.g. "dora": "weight-decomposed LoRA")
    merge_refusal: str | None  # why merging is impossible (None: the method merges into the base weights)
    file_key_prefix: str  # what PEFT puts before the tensors' keys in this method's files
    ranked: bool  # has a rank r and target layers (the planner's rank candidates)
    nf4_train_names: tuple[str, ...]  # train names whose frozen base is quantized to NF4 (QLoRA)
    plan: Any  # the memory plan's terms: problems(shape, s), trainable(shape, s), activations(shape, s, ...)

    def read_config(self, data: dict[str, Any]) -> Any:
        """The config an adapter_config.json dict of this peft_type describes, as the file's tensors hold it."""

    def inject(self, model: nn.Module, config: Any, name: str, init: bool) -> None:
        """Add adapter `name`'s layers to `model` in place; raise before changing anything on a bad fit."""

    def extra_trainable(self, model: nn.Module, name: str, config: Any) -> list[nn.Parameter]:
        """Parameters outside the adapter holders that train with adapter `name` (e.g. LoRA's biases)."""

    def state_dict(self, model: nn.Module, name: str, config: Any) -> dict[str, Tensor]:
        """Adapter `name`'s tensors under the file's keys (without the `base_model.model.` prefix)."""

    def expected(self, model: nn.Module, config: Any) -> Expected:
        """The keys and shapes a file of this config must hold to fit `model`."""

    def load_tensors(self, model: nn.Module, name: str, tensors: dict[str, Tensor], expected: Expected) -> None:
        """Copy checked file tensors into adapter `name`, which `inject(..., init=False)` just created."""

    def file_config(self, model: nn.Module, name: str, config: Any) -> dict[str, Any]:
        """The adapter_config.json dict for adapter `name` of `model`."""

    def training_kernels(self, model: nn.Module, keep: Tensor | None) -> AbstractContextManager:
        """A block inside which the decoder's training forward may use this method's fused nodes (exact: each
        node checks its own preconditions); `keep` (B, T) marks the positions whose gradients matter."""

    def config_from_options(self, options: Any) -> Any:
        """The config that `peftkit train --method <one of train_names>` options describe."""

    def describe_options(self, options: Any) -> str:
        """One line naming the method and its main settings, for the training header."""

    def describe(self, config: Any) -> str:
        """One line for peftkit.summary."""

    # Optional training hooks: the trainer calls them through getattr with a no-op default (train/method.py), so
    # a method without them needs nothing. `names` are the model's active adapters (the ones training).
    def training_loss_extra(self, model: nn.Module, names: list[str]) -> Tensor | None:
        """A term added to the training loss once per optimizer step (a regularizer), or None."""

    def after_optimizer_step(self, model: nn.Module, names: list[str], step: int, total_steps: int) -> None:
        """Called after the optimizer's step `step` (0-based) of `total_steps`, gradients still present."""

    def trainer_state(self, model: nn.Module, names: list[str]) -> dict[str, Any]:
        """What a checkpoint must keep beyond the trainable parameters (tensors, lists, numbers) to resume."""

    def load_trainer_state(self, model: nn.Module, names: list[str], state: dict[str, Any]) -> None:
        """Put `trainer_state`'s dict back when a run resumes."""

    # Optional, read through `lr_scale` below: train name -> the learning rate that name trains well at, as a multiple
    # of LoRA's (its default --lr is LoRA's times this; names it leaves out train at LoRA's)
    lr_scales: dict[str, float]

    # Optional, read through `allocated_ranks` below: a method that chooses its own per-layer ranks while training
    def allocated_ranks(self, config: Any) -> dict[str, int]:
        """Module path -> the rank training left it, from a saved config ({} when nothing was reallocated)."""


_BY_TYPE: dict[str, Method] = {}
_BY_TRAIN_NAME: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the table (once per peft_type and per train name)."""
    if method.peft_type in _BY_TYPE and _BY_TYPE[method.peft_type] is not method:
        raise ValueError(f"peft_type {method.peft_type!r} is registered twice")
    for train_name in method.train_names:
        if train_name in _BY_TRAIN_NAME and _BY_TRAIN_NAME[train_name] is not method:
            raise ValueError(f"train method name {train_name!r} is registered twice")
    _BY_TYPE[method.peft_type] = method
    _BY_TRAIN_NAME.update({train_name: method for train_name in method.train_names})
    return method


def peft_types() -> list[str]:
    return list(_BY_TYPE)


def train_names() -> list[str]:
    """Every `--method` name a registered method serves, in registration order."""
    return list(_BY_TRAIN_NAME)


def by_peft_type(peft_type: str) -> Method:
    if peft_type not in _BY_TYPE:
        raise ValueError(f"peft_type {peft_type!r} is not supported by this peftkit version "
                         f"(supported: {', '.join(_BY_TYPE)})")
    return _BY_TYPE[peft_type]


def by_train_name(name: str) -> Method:
    if name not in _BY_TRAIN_NAME:
        raise ValueError(f"method {name!r} is not available (available: {', '.join(_BY_TRAIN_NAME)})")
    return _BY_TRAIN_NAME[name]


def for_config(config: Any) -> Method:
    """The method a config object belongs to; a TypeError naming the type for anything else."""
    method = _BY_TYPE.get(getattr(config, "peft_type", None))
    if method is None or not isinstance(config, method.config_class):
        known = ", ".join(m.config_class.__name__ for m in _BY_TYPE.values())
        raise TypeError(f"inject expects an adapter config ({known}), got {type(config).__name__}")
    return method


def lr_scale(train_name: str) -> float:
    """How much higher than LoRA's a `--method train_name` run's default learning rate is (1.0 for a method without
    `lr_scales`, and for names no registered method serves, such as 'full')."""
    method = _BY_TRAIN_NAME.get(train_name)
    return float(getattr(method, "lr_scales", {}).get(train_name, 1.0)) if method is not None else 1.0


def allocated_ranks(config: Any) -> dict[str, int]:
    """The per-module ranks a method allocated during training, as its saved config records them; {} for a
    method with fixed ranks (it has no `allocated_ranks` hook) or before any reallocation."""
    hook = getattr(for_config(config), "allocated_ranks", None)
    return dict(hook(config)) if hook is not None else {}


def config_from_peft_dict(data: dict[str, Any]) -> Any:
    """Dispatch adapter_config.json on its peft_type (PEFT's default is LORA). A ValueError for anything but a
    JSON object (a list, a number: a file that is not an adapter config)."""
    if not isinstance(data, dict):
        raise ValueError(f"adapter_config.json must hold a JSON object ({{...}}) of config fields, not a JSON "
                         f"{type(data).__name__}")
    return by_peft_type(data.get("peft_type", "LORA")).read_config(data)


def methods() -> Iterable[Method]:
    return list(_BY_TYPE.values())


def nf4_train_names() -> list[str]:
    """The train names whose frozen base is quantized to NF4 (QLoRA)."""
    return [n for m in _BY_TYPE.values() for n in m.nf4_train_names]


def train_help() -> str:
    """`--method` help text: each train name and what it is, in registration order."""
    return "; ".join(f"{n} = {m.train_help[n]}" if n in m.train_help else n
                     for n, m in _BY_TRAIN_NAME.items())

