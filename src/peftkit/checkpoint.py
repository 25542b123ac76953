"""Adapters on disk in HF PEFT's format, for every registered method: `adapter_config.json` +
`adapter_model.safetensors` with PEFT's keys (each method's io module names them). Loading validates every
key against the model before anything changes, and never unpickles a `.bin` file unless the caller opts in.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from .files import check_fit, find_adapter_dir, read_config_dict, read_tensors, write_adapter
from .inject import inject
from .record import configs, mark_trainable, require_adapter, require_new
from .registry import AdapterConfig, by_peft_type, config_from_peft_dict, for_config


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (without the `base_model.model.` prefix)."""
    require_adapter(model, name)
    config = configs(model)[name]
    return for_config(config).state_dict(model, name, config)


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 tensors: dict[str, Tensor] | None = None) -> Path:
    """Write adapter `name` to `directory` in HF PEFT's format (loadable by PeftModel.from_pretrained).

    `tensors` (adapter_state_dict's keys) replaces the model's own values: a sharded (FSDP) run gathers
    them on every process first and passes the full tensors to the one process that writes."""
    require_adapter(model, name)
    config = configs(model)[name]
    method = for_config(config)
    state = method.state_dict(model, name, config) if tensors is None else tensors
    return write_adapter(directory, state, method.file_config(model, name, config), method.file_key_prefix)


def read_adapter(directory: str | os.PathLike, name: str = "default",
                 allow_pickle: bool = False) -> tuple[AdapterConfig, dict[str, Tensor]]:
    """Read (config, tensors with the `base_model.model.` prefix stripped) without touching a model."""
    folder = find_adapter_dir(directory, name)
    config = config_from_peft_dict(read_config_dict(folder))
    return config, read_tensors(folder, allow_pickle=allow_pickle)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Load a PEFT-format adapter (any registered method) into `model` in place as adapter `name`, and make
    it active.

    Every key is checked against the model first (missing modules, wrong shapes, unexpected keys); on any
    problem the error lists every offending key and the model is left exactly as it was. With
    trainable=False every parameter ends frozen (inference); with True the adapter's weights train.
    """
    require_new(model, name)
    config, tensors = read_adapter(directory, name, allow_pickle=allow_pickle)
    method = by_peft_type(config.peft_type)
    want = method.expected(model, config)
    check_fit(f"adapter in {str(directory)!r}", tensors, want, config.base_model_name_or_path)
    inject(model, config, name, init=False)
    method.load_tensors(model, name, tensors, want)
    mark_trainable(model, name if trainable else None)
    return model
