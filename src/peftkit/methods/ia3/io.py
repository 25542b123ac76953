"""IA3 vectors under HF PEFT's keys, both directions.

    base_model.model.<module path>.ia3_l    (out, 1) for a target whose output is scaled
                                            (1, in)  for a feedforward target (its input is scaled)

The same for nn.Linear and transformers' Conv1D. The adapter's name is not in the file, and the
`base_model.model.` prefix is added and stripped by `peftkit.files`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...patterns import PatternError
from ...registry import Expected
from ...weights import linear_features
from .config import IA3Config
from .layer import ia3_layers
from .targets import resolved, select_ia3_targets


def key(path: str) -> str:
    return f"{path}.ia3_l"


def state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s vectors under PEFT's key names (without the `base_model.model.` prefix)."""
    return {key(path): layer.ia3_l[name].detach() for path, layer in ia3_layers(model) if name in layer.ia3_l}


def expected(model: nn.Module, config: IA3Config) -> Expected:
    """Key -> shape the model needs for `config`, or the problem that stops any placement."""
    try:
        targets = select_ia3_targets(model, resolved(model, config))
    except PatternError:
        raise
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    for path, module, kind, feedforward in targets:
        n_in, n_out = linear_features(kind, getattr(module, "base", module))
        want.required[key(path)] = (1, n_in) if feedforward else (n_out, 1)
        want.notes[key(path)] = ("(1, in_features): a feedforward target, its input is scaled" if feedforward
                                 else "(out_features, 1): its output is scaled")
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    """Copy checked file vectors into adapter `name` (just injected with init=False)."""
    for path, layer in ia3_layers(model):
        if name in layer.ia3_l:
            layer.ia3_l[name].copy_(tensors[key(path)])
