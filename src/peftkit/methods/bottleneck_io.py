"""Bottleneck adapters on disk: `adapter_config.json` (peft_type "BOTTLENECK") + `adapter_model.safetensors`.

Keys, for every wrapped module (the adapter's name is not in the file, as in PEFT's LoRA files):

    base_model.model.<module path>.bottleneck.down.weight   [hidden // reduction_factor, hidden]
    base_model.model.<module path>.bottleneck.down.bias     [hidden // reduction_factor]
    base_model.model.<module path>.bottleneck.up.weight     [hidden, hidden // reduction_factor]
    base_model.model.<module path>.bottleneck.up.bias       [hidden]

e.g. `base_model.model.model.layers.0.self_attn.o_proj.bottleneck.down.weight` for a Llama model. Loading
checks every key and shape against the model before anything changes, and reads safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME, _atomic_write, find_adapter_dir, raise_if_unfit
from ..inject import check_name, configs, mark_trainable, require_adapter
from .bottleneck import (
    BottleneckConfig,
    bottleneck_dim,
    bottleneck_layers,
    default_bottleneck_targets,
    inject_bottleneck,
    select_bottleneck_targets,
)


def _keys(path: str) -> dict[str, str]:
    """File key (without PREFIX) -> parameter name inside the adapter's Bottleneck module."""
    return {f"{path}.bottleneck.{p}.{t}": f"{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")}


def bottleneck_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors under the file's key names (without the `base_model.model.` prefix)."""
    require_adapter(model, name)
    if not isinstance(configs(model)[name], BottleneckConfig):
        raise TypeError(f"adapter {name!r} is not a bottleneck adapter; save it with peftkit.save_adapter")
    out: dict[str, Tensor] = {}
    for path, layer in bottleneck_layers(model):
        if name in layer.bottleneck:
            params = dict(layer.bottleneck[name].named_parameters())
            out.update({key: params[p].detach() for key, p in _keys(path).items()})
    return out


def save_bottleneck(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write bottleneck adapter `name` to `directory` (adapter_config.json + adapter_model.safetensors)."""
    state = bottleneck_state_dict(model, name)
    config = configs(model)[name]
    if config.base_model_name_or_path is None:
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        config = config.replace(base_model_name_or_path=base)
    if config.target_modules is None:  # as PEFT does: the file names the modules it was trained on
        config = config.replace(target_modules=default_bottleneck_targets(model, config.variant))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + k: v.to("cpu").contiguous().clone() for k, v in state.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config.to_peft_dict(), indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return directory


def read_bottleneck(directory: str | os.PathLike, name: str = "default") -> tuple[BottleneckConfig, dict[str, Tensor]]:
    """(config, tensors with the `base_model.model.` prefix stripped), without touching a model."""
    folder = find_adapter_dir(directory, name)
    try:
        config = BottleneckConfig.from_peft_dict(json.loads((folder / CONFIG_NAME).read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (bottleneck adapters are "
                                "read from safetensors only)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is corrupt or truncated and cannot be read ({err}); "
                         "save the adapter again or restore the file") from err
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _expected(model: nn.Module, config: BottleneckConfig) -> tuple[dict[str, tuple], list[str]]:
    """(key -> shape the model needs, problems) for loading `config` into `model`."""
    try:
        targets = select_bottleneck_targets(model, config)
    except ValueError as err:
        return {}, [str(err)]
    shapes: dict[str, tuple] = {}
    for path, _, size in targets:
        dim = bottleneck_dim(size, config.reduction_factor)
        want = {"down.weight": (dim, size), "down.bias": (dim,), "up.weight": (size, dim), "up.bias": (size,)}
        shapes.update({key: want[p] for key, p in _keys(path).items()})
    return shapes, []


def load_bottleneck(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                    trainable: bool = False) -> nn.Module:
    """Load a bottleneck adapter into `model` in place as adapter `name`, and make it active.

    Every key is checked first; on any problem the error lists every offending key and the model is left
    exactly as it was. trainable=False leaves every parameter frozen; True lets the adapter's weights train.
    """
    check_name(name)
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) or load under another name")
    config, tensors = read_bottleneck(directory, name)
    required, problems = _expected(model, config)
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required)
    wrong = sorted(f"{k}: file {tuple(v.shape)}, model expects {required[k]}"
                   for k, v in tensors.items() if k in required and tuple(v.shape) != required[k])
    raise_if_unfit(f"bottleneck adapter in {str(directory)!r}", missing, unexpected, wrong, problems,
                   config.base_model_name_or_path)

    inject_bottleneck(model, config, name, init=False)
    with torch.no_grad():
        for path, layer in bottleneck_layers(model):
            if name in layer.bottleneck:
                params = dict(layer.bottleneck[name].named_parameters())
                for key, p in _keys(path).items():
                    params[p].copy_(tensors[key])
    mark_trainable(model, name if trainable else None)
    return model
