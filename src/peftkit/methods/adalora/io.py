"""AdaLoRA tensors under HF PEFT's keys, both directions.

    base_model.model.<module path>.lora_A    (r, in)     right singular vectors
    base_model.model.<module path>.lora_E    (r, 1)      singular values
    base_model.model.<module path>.lora_B    (out, r)    left singular vectors

The same for nn.Linear and transformers' Conv1D. With a rank_pattern in the config, a file holds only the kept
triplets (r = the pattern's True entries) of each layer the pattern names; ranknum is not saved (PEFT derives
it from init_r). The adapter's name is not in the file, and `base_model.model.` is added and stripped by
`peftkit.files`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...patterns import PatternError
from ...registry import Expected
from ...weights import linear_features
from .allocator import layers_of
from .config import AdaLoraConfig
from .targets import select_adalora_targets


def keys(path: str) -> tuple[str, str, str]:
    return f"{path}.lora_A", f"{path}.lora_E", f"{path}.lora_B"


def state_dict(model: nn.Module, name: str, config: AdaLoraConfig) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's keys; a layer still at init_r ranks keeps only the triplets of its
    rank_pattern entry (PEFT's resize_state_dict_by_rank_pattern)."""
    out: dict[str, Tensor] = {}
    for path, layer in layers_of(model, name):
        A, E, B = layer.lora_A[name].detach(), layer.lora_E[name].detach(), layer.lora_B[name].detach()
        kept = config.kept(path)
        if kept is not None and len(kept) == A.shape[0] and sum(kept) != A.shape[0]:
            rows = torch.tensor(kept, dtype=torch.bool, device=A.device)
            A, E, B = A[rows], E[rows], B[:, rows]
        key_a, key_e, key_b = keys(path)
        out[key_a], out[key_e], out[key_b] = A, E, B
    return out


def expected(model: nn.Module, config: AdaLoraConfig) -> Expected:
    """Key -> shape the model needs for a file of `config`, or the problem that stops any placement."""
    try:
        targets = select_adalora_targets(model, config)
    except PatternError:
        raise
    except ValueError as err:
        return Expected(problems=[str(err)])
    want = Expected()
    for path, module, kind in targets:
        n_in, n_out = linear_features(kind, getattr(module, "base", module))
        r = config.loaded_rank(path)
        key_a, key_e, key_b = keys(path)
        want.required[key_a], want.required[key_e], want.required[key_b] = (r, n_in), (r, 1), (n_out, r)
        note = f"r={r}: " + ("init_r" if config.kept(path) is None else "the triplets its rank_pattern keeps")
        want.notes.update({key_a: note, key_e: note, key_b: note})
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    """Copy checked file tensors into adapter `name` (just injected with init=False)."""
    for path, layer in layers_of(model, name):
        key_a, key_e, key_b = keys(path)
        layer.lora_A[name].copy_(tensors[key_a])
        layer.lora_E[name].copy_(tensors[key_e])
        layer.lora_B[name].copy_(tensors[key_b])
