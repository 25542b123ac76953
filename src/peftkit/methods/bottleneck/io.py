"""Bottleneck adapters on disk: `adapter_config.json` (peft_type "BOTTLENECK") + `adapter_model.safetensors`.

Keys, for every wrapped module (the adapter's name is not in the file, as in PEFT's LoRA files):

    base_model.model.<module path>.bottleneck.down.weight   [hidden // reduction_factor, hidden]
    base_model.model.<module path>.bottleneck.down.bias     [hidden // reduction_factor]
    base_model.model.<module path>.bottleneck.up.weight     [hidden, hidden // reduction_factor]
    base_model.model.<module path>.bottleneck.up.bias       [hidden]

e.g. `base_model.model.model.layers.0.self_attn.o_proj.bottleneck.down.weight` for a Llama model. The
`base_model.model.` prefix is added and stripped by `peftkit.files`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ...record import wrappers
from ...registry import Expected
from .config import BottleneckConfig
from .layer import BottleneckLayer, bottleneck_dim
from .targets import select_bottleneck_targets


def keys(path: str) -> dict[str, str]:
    """File key (without PREFIX) -> parameter name inside the adapter's Bottleneck module."""
    return {f"{path}.bottleneck.{p}.{t}": f"{p}.{t}" for p in ("down", "up") for t in ("weight", "bias")}


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckLayer]]:
    """Every BottleneckLayer in the model, with its module path."""
    for path, w in wrappers(model):
        if isinstance(w, BottleneckLayer):
            yield path, w


def state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under the file's key names (without the `base_model.model.` prefix)."""
    out: dict[str, Tensor] = {}
    for path, layer in bottleneck_layers(model):
        if name in layer.bottleneck:
            params = dict(layer.bottleneck[name].named_parameters())
            out.update({key: params[p].detach() for key, p in keys(path).items()})
    return out


def expected(model: nn.Module, config: BottleneckConfig) -> Expected:
    """Key -> shape the model needs for `config`, or the problem that stops any placement."""
    try:
        targets = select_bottleneck_targets(model, config)
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    for path, _, size in targets:
        dim = bottleneck_dim(size, config.reduction_factor)
        shapes = {"down.weight": (dim, size), "down.bias": (dim,), "up.weight": (size, dim), "up.bias": (size,)}
        want.required.update({key: shapes[p] for key, p in keys(path).items()})
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    for path, layer in bottleneck_layers(model):
        if name in layer.bottleneck:
            params = dict(layer.bottleneck[name].named_parameters())
            for key, p in keys(path).items():
                params[p].copy_(tensors[key])
