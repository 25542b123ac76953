"""Load a transformers checkpoint straight into NF4, one tensor at a time.

The model skeleton is built on the meta device (no memory), then each tensor of the safetensors files is
read alone: a linear layer's weight is quantized as soon as it arrives and its full-precision copy is
dropped, everything else is materialized in `dtype`. Peak memory stays near the 4-bit size plus the
largest single tensor, instead of the full fp32 model (measured in tests/quant/test_qlora.py).
Imports transformers, so it lives outside the core.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..targeting import output_head_names
from . import nf4
from .linear import NF4Linear


def _tensor_names(files: list[Path]) -> list[tuple[Path, str]]:
    names = []
    for path in files:
        with safe_open(str(path), "pt") as f:
            names += [(path, key) for key in f.keys()]
    return names


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor, copied out of a mapping that is closed again at once, so the file's pages do not
    stay resident while the rest loads."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(key).clone()


def _set(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, pname = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if pname in module._parameters:
        module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    elif pname in module._buffers:
        module._buffers[pname] = value
    else:
        raise KeyError(f"checkpoint tensor {key!r} has no place in the model")


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: build those modules again on CPU."""
    for name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(config=model.config)
            for bname, buf in fresh.named_buffers(recurse=False):
                module._buffers[bname] = buf


def load_nf4(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, double_quant: bool = True,
             blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from tqdm.auto import tqdm

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}; NF4 streaming needs safetensors weights")
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    heads = output_head_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads}
    pending_bias: dict[str, torch.Tensor] = {}
    pending_weight: dict[str, nf4.NF4Weight] = {}

    def place(name: str) -> None:
        module = linears[name]
        if name in pending_weight and (module.bias is None or name in pending_bias):
            layer = NF4Linear(pending_weight.pop(name), pending_bias.pop(name, None), compute_dtype or dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)

    for path, key in tqdm(_tensor_names(files), desc="loading into NF4", unit="tensor", leave=False):
        module_name, _, pname = key.rpartition(".")
        value = _read(path, key)
        if module_name in linears and pname in ("weight", "bias"):
            if pname == "weight":
                pending_weight[module_name] = nf4.quantize(value.to(dtype), blocksize, double_quant)
            else:
                pending_bias[module_name] = value.to(dtype)
            del value
            place(module_name)
        else:
            _set(model, key, value.to(dtype) if value.is_floating_point() else value)
    missing = sorted(n for n, m in model.named_modules() if n in linears and not isinstance(m, NF4Linear))
    if missing:
        raise ValueError(f"checkpoint in {directory} lacks the weights of {missing[:5]} ({len(missing)} layers)")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model)
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise ValueError(f"checkpoint in {directory} lacks tensors for: {left[:8]}")
    model.requires_grad_(False)
    return model
