"""LoRA (and DoRA) tensors under HF PEFT's keys, both directions.

Keys: `<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]); for embeddings
`.lora_embedding_A` ([r, num_embeddings]) and `.lora_embedding_B` ([dim, r]); DoRA's magnitude as
`.lora_magnitude_vector` ([out], no `.weight` suffix, as PEFT writes it); torch convolutions' A and B as
[r, in, *kernel] and [out, r / groups, 1, ...], their magnitude as [1, out, 1, ...] (conv.py); an
nn.MultiheadAttention's in_proj factors under its own path, its out_proj's under `.base_layer.out_proj`
(mha.py); a modules_to_save copy under the
module's own path; biases of wrapped layers under `.base_layer.bias`. The adapter's name is not in the file,
and the `base_model.model.` prefix is added and stripped by `peftkit.files`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...record import wrappers
from ...registry import Expected
from ...targeting import adaptable_kind, named_modules_outside_wrappers, select_targets
from . import conv, mha
from .config import LoraConfig
from .layer import LoraLayer
from .weights import factor_shapes
from .saved_copy import SavedCopy

MAGNITUDE = "lora_magnitude_vector"


def factor_keys(path: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def saved_copy_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """Modules named by modules_to_save: a name equal to an entry or ending with "." + entry."""
    if not config.modules_to_save:
        return []
    found = [(n, m) for n, m in named_modules_outside_wrappers(model)
             if any(n == e or n.endswith("." + e) for e in config.modules_to_save)]
    missing = [e for e in config.modules_to_save if not any(n == e or n.endswith("." + e) for n, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save names modules that do not exist: {missing}")
    return found


def peft_param_name(model: nn.Module, pname: str) -> str:
    """Our parameter name -> PEFT's: a LoRA layer's `.base.` is PEFT's `.base_layer.`."""
    for path, _ in wrappers(model):
        if pname.startswith(f"{path}.base."):
            return f"{path}.base_layer." + pname[len(path) + 6:]
    return pname


def state_dict(model: nn.Module, name: str, config: LoraConfig) -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (without the `base_model.model.` prefix)."""
    out: dict[str, Tensor] = {}
    for path, w in wrappers(model):
        if isinstance(w, LoraLayer) and name in w.lora_A:
            key_a, key_b = factor_keys(path, w.peftkit_kind)
            out[key_a], out[key_b] = w.lora_A[name], w.lora_B[name]
            if name in w.lora_magnitude_vector:
                m = w.lora_magnitude_vector[name]
                out[f"{path}.{MAGNITUDE}"] = m.reshape(conv.magnitude_shape(w.base)) if w.peftkit_kind == "conv" else m
            if config.bias == "lora_only" and getattr(w.base, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = w.base.bias
        elif isinstance(w, mha.LoraMhaLayer) and name in w.lora_A:
            out.update(mha.file_tensors(path, w, name))
        elif isinstance(w, SavedCopy) and name in w.copies:
            out.update({f"{path}.{k}": v for k, v in w.copies[name].state_dict().items()})
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                out[peft_param_name(model, pname)] = p
    return {k: v.detach() for k, v in out.items()}


def expected(model: nn.Module, config: LoraConfig) -> Expected:
    """Required key -> shape, optional key -> shape and problems for loading `config` into `model`."""
    want = Expected()
    try:
        targets = select_targets(model, config)
    except ValueError as err:
        targets, want.problems = [], [str(err)]
    for path, module in targets:
        kind = adaptable_kind(module)
        base = module.base if isinstance(module, (LoraLayer, mha.LoraMhaLayer)) else module
        if kind == "mha":
            want.required.update(mha.file_shapes(path, base, config.rank_for(path)))
            continue  # its base parameters are not in PEFT's files
        a_shape, b_shape = factor_shapes(kind, base, config.rank_for(path))
        key_a, key_b = factor_keys(path, kind)
        want.required[key_a], want.required[key_b] = a_shape, b_shape
        if config.use_dora:
            want.required[f"{path}.{MAGNITUDE}"] = conv.magnitude_shape(base) if kind == "conv" else (b_shape[0],)
        for pname, p in base.named_parameters(recurse=False):
            want.optional[f"{path}.base_layer.{pname}"] = tuple(p.shape)  # PEFT saves embedding weights, biases
    try:
        copies = saved_copy_targets(model, config)
    except ValueError as err:
        copies = []
        want.problems.append(str(err))
    for path, module in copies:
        inner = module.base if isinstance(module, SavedCopy) else module
        want.required.update({f"{path}.{k}": tuple(v.shape) for k, v in inner.state_dict().items()})
    if config.bias != "none":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                want.optional.setdefault(peft_param_name(model, pname), tuple(p.shape))
    return want


@torch.no_grad()
def load_tensors(model: nn.Module, name: str, tensors: dict[str, Tensor], want: Expected) -> None:
    """Copy checked tensors into adapter `name` (just injected with init=False) and the optional base
    parameters the file carries (biases, embedding weights)."""
    params = dict(model.named_parameters())
    for path, w in wrappers(model):
        if isinstance(w, LoraLayer) and name in w.lora_A:
            key_a, key_b = factor_keys(path, w.peftkit_kind)
            w.lora_A[name].copy_(tensors[key_a])
            w.lora_B[name].copy_(tensors[key_b])
            if name in w.lora_magnitude_vector:
                w.lora_magnitude_vector[name].copy_(tensors[f"{path}.{MAGNITUDE}"].reshape(-1))
        elif isinstance(w, mha.LoraMhaLayer) and name in w.lora_A:
            for param, key in zip(w.adapter_parameters(name), mha.file_tensors(path, w, name)):
                param.copy_(tensors[key])
        elif isinstance(w, SavedCopy) and name in w.copies:
            w.copies[name].load_state_dict({k[len(path) + 1:]: v for k, v in tensors.items()
                                            if k.startswith(path + ".")})
    for key in (k for k in tensors if k in want.optional):
        ours = key.replace(".base_layer.", ".base.")
        target = params.get(ours, params.get(key))
        if target is not None:
            target.copy_(tensors[key])
