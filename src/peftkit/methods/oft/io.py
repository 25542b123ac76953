"""OFT tensors under HF PEFT's keys, both directions:

    base_model.model.<module path>.oft_R.weight             (blocks or 1, b(b-1)/2)   nn.Linear, 1x1 nn.Conv2d
    base_model.model.<module path>.oft_embedding_R.weight   (blocks or 1, b(b-1)/2)   nn.Embedding

blocks x b is the layer's width (in_features, in_channels, embedding_dim) with the config's r or oft_block_size
moved to divide it as PEFT moves it; 1 row with block_share. A file may also hold `<module path>.base_layer.weight`
(PEFT writes a targeted embedding's or lm_head's own weight with the adapter); it is read into the base layer, as
PEFT does, and not written. The adapter's name is not in the file, and the `base_model.model.` prefix is added
and stripped by `peftkit.files`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...patterns import PatternError
from ...registry import Expected
from . import rotation as rot
from .config import OFTConfig
from .layer import oft_layers, rotated_width
from .targets import select_oft_targets

BASE = "base_layer"  # PEFT's name for the wrapped layer (ours is `.base`)


def key(path: str, kind: str) -> str:
    return f"{path}.oft_embedding_R.weight" if kind == "embedding" else f"{path}.oft_R.weight"


def state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s parameters under PEFT's key names (without the `base_model.model.` prefix)."""
    return {key(path, layer.kind): layer.oft_R[name].detach() for path, layer in oft_layers(model)
            if name in layer.settings}


def expected(model: nn.Module, config: OFTConfig) -> Expected:
    """Key -> shape the model needs for `config`, or the problem that stops any placement."""
    try:
        targets = select_oft_targets(model, config)
    except PatternError:
        raise
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    for path, module, kind in targets:
        base = getattr(module, "base", module)
        width = rotated_width(base, kind)
        blocks, size = rot.block_layout(width, config.r, config.oft_block_size)
        k = key(path, kind)
        want.required[k] = rot.parameter_shape(width, config.r, config.oft_block_size, config.block_share)
        want.notes[k] = (f"({'1 shared block' if config.block_share else f'{blocks} blocks'}, {size}*{size - 1}/2): "
                         f"blocks of {size} over the {kind} layer's {width} features")
        for pname, p in base.named_parameters(recurse=False):  # PEFT saves a targeted embedding's own weight
            want.optional[f"{path}.{BASE}.{pname}"] = tuple(p.shape)
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    """Copy checked file tensors into adapter `name` (just injected with init=False), and the base layers' own
    parameters a PEFT file carries (as PEFT loads them)."""
    for path, layer in oft_layers(model):
        if name in layer.settings:
            layer.oft_R[name].copy_(tensors[key(path, layer.kind)])
            for pname, p in layer.base.named_parameters(recurse=False):
                if f"{path}.{BASE}.{pname}" in tensors:
                    p.copy_(tensors[f"{path}.{BASE}.{pname}"])
