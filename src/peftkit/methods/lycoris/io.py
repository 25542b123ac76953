"""LoHa / LoKr tensors under HF PEFT's keys, both directions:

    base_model.model.<module path>.hada_w1_a   .hada_w1_b   .hada_w2_a   .hada_w2_b   [.hada_t1   .hada_t2]
    base_model.model.<module path>.lokr_w1 | .lokr_w1_a .lokr_w1_b,   .lokr_w2 | .lokr_w2_a .lokr_w2_b [.lokr_t2]

Which of them a layer has, and their shapes, follow from the layer's geometry, the rank (rank_pattern) and the
config (shapes.py). A file may also hold `<module path>.base_layer.weight` (PEFT writes a targeted lm_head's or
embed_tokens' own weight with the adapter); it is read into the base layer, as PEFT does, and not written. The
adapter's name is not in the file, and the `base_model.model.` prefix is added and
stripped by `peftkit.files`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...patterns import PatternError
from ...registry import Expected
from .family import Family
from .layer import lycoris_layers
from .shapes import geometry
from .targets import select_lycoris_targets

BASE = "base_layer"  # PEFT's name for the wrapped layer (ours is `.base`)


def state_dict(model: nn.Module, family: Family, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (without the `base_model.model.` prefix)."""
    return {f"{path}.{tname}": p.detach() for path, layer in lycoris_layers(model, family)
            if name in layer.settings for tname, p in layer.factors(name).items()}


def expected(model: nn.Module, family: Family, config: Any) -> Expected:
    """Key -> shape the model needs for `config`, or the problem that stops any placement."""
    try:
        targets = select_lycoris_targets(model, config)
    except PatternError:
        raise
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    for path, module, kind in targets:
        base = getattr(module, "base", module)
        geo = geometry(base, kind)
        r = config.rank_for(path)
        for tname, shape in family.shapes(geo, r, config).items():
            want.required[f"{path}.{tname}"] = shape
            want.notes[f"{path}.{tname}"] = f"({family.label} rank {r} on a {kind} weight {geo.weight_shape})"
        for pname, p in base.named_parameters(recurse=False):  # PEFT saves a targeted lm_head / embed_tokens
            want.optional[f"{path}.{BASE}.{pname}"] = tuple(p.shape)  # layer's own weight ("auto")
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, family: Family, name: str, tensors: dict[str, Tensor]) -> None:
    """Copy checked file tensors into adapter `name` (just injected with init=False), and the base layers' own
    parameters a PEFT file carries (as PEFT loads them)."""
    for path, layer in lycoris_layers(model, family):
        if name in layer.settings:
            for tname, p in layer.factors(name).items():
                p.copy_(tensors[f"{path}.{tname}"])
            for pname, p in layer.base.named_parameters(recurse=False):
                if f"{path}.{BASE}.{pname}" in tensors:
                    p.copy_(tensors[f"{path}.{BASE}.{pname}"])
