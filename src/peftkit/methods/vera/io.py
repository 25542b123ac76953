"""VeRA tensors under HF PEFT's keys, both directions.

    base_model.model.<module path>.vera_lambda_b    (out,)
    base_model.model.<module path>.vera_lambda_d    (r,)
    base_model.vera_A                               (r, max in_features)    only with save_projection=True
    base_model.vera_B                               (max out_features, r)   only with save_projection=True

The same for nn.Linear and transformers' Conv1D. The shared projections sit under `base_model.`, not
`base_model.model.` (PEFT keeps them on its tuner, outside the model), so this method writes whole keys
(its `file_key_prefix` is empty) and `state_dict` gives them as the file holds them; `peftkit.files` strips
`base_model.model.` when reading, so `expected` and `load_tensors` see `<path>.vera_lambda_b` and
`base_model.vera_A`. The adapter's name is not in the file.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ...files import PREFIX
from ...patterns import PatternError
from ...registry import Expected
from ...weights import linear_features
from .config import VeraConfig
from .layer import vera_layers
from .targets import base_of, largest_shape, resolved, select_vera_targets

VERA_A, VERA_B = "base_model.vera_A", "base_model.vera_B"


def lambda_keys(path: str) -> tuple[str, str]:
    """(lambda_b, lambda_d) keys of one layer, as read (without the `base_model.model.` prefix)."""
    return f"{path}.vera_lambda_b", f"{path}.vera_lambda_d"


def shared_projections(model: nn.Module, name: str):
    """The model's VeraProjections holding adapter `name`'s pair (from any of its layers), or None."""
    for _, layer in vera_layers(model):
        if name in layer.projections:
            return layer.projections
    return None


def state_dict(model: nn.Module, name: str, config: VeraConfig) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under the file's whole keys (see the module docstring)."""
    out: dict[str, Tensor] = {}
    for path, layer in vera_layers(model):
        if name in layer.vera_lambda_b:
            key_b, key_d = lambda_keys(path)
            out[PREFIX + key_b] = layer.vera_lambda_b[name].detach()
            out[PREFIX + key_d] = layer.vera_lambda_d[name].detach()
    projections = shared_projections(model, name)
    if config.save_projection and projections is not None:
        out[VERA_A], out[VERA_B] = (t.detach() for t in projections.pair(name))
    return out


def expected(model: nn.Module, config: VeraConfig) -> Expected:
    """Key -> shape the model needs for `config` (keys as read), or the problem that stops any placement."""
    try:
        targets = select_vera_targets(model, resolved(model, config))
    except PatternError:
        raise
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    r = config.r
    for path, module, kind in targets:
        _, n_out = linear_features(kind, base_of(module))
        key_b, key_d = lambda_keys(path)
        want.required[key_b], want.required[key_d] = (n_out,), (r,)
        want.notes[key_b], want.notes[key_d] = "(out_features,)", f"(r,) with the config's r={r}"
    max_in, max_out = largest_shape(targets)
    shapes = {VERA_A: (r, max_in), VERA_B: (max_out, r)}
    notes = {VERA_A: f"(r, largest in_features among the targets): the shared projection must cover {max_in} inputs",
             VERA_B: f"(largest out_features among the targets, r): the shared projection must cover {max_out} outputs"}
    (want.required if config.save_projection else want.optional).update(shapes)
    want.notes.update(notes)
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor], config: VeraConfig) -> None:
    """Copy checked file tensors into adapter `name` (just injected with init=False)."""
    for path, layer in vera_layers(model):
        if name in layer.vera_lambda_b:
            key_b, key_d = lambda_keys(path)
            layer.vera_lambda_b[name].copy_(tensors[key_b])
            layer.vera_lambda_d[name].copy_(tensors[key_d])
    if VERA_A not in tensors:
        return
    if not config.save_projection:
        warnings.warn(f"the adapter file holds {VERA_A} / {VERA_B} but its config says save_projection=false: "
                      "they are ignored and the projections are drawn from projection_prng_key, as HF PEFT does; "
                      "save it with save_projection=true to use the file's matrices", stacklevel=4)
        return
    shared_projections(model, name).fill(name, tensors[VERA_A], tensors[VERA_B])
