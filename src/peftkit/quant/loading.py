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


QUANT_CONFIG = "peftkit_quantization.json"


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write a model with NF4 layers as `model.safetensors` (packed codes and statistics as tensors),
    its transformers `config.json`, and `peftkit_quantization.json` listing each NF4 layer's settings.
    Adapters are not included: save them with save_adapter."""
    import json

    from safetensors.torch import save_model

    from ..inject import configs

    if configs(model):
        raise ValueError("the model carries adapters; save them with save_adapter and quantized base without "
                         "them (delete_adapter, or save before inject)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: m.settings() for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not layers:
        raise ValueError("the model has no NF4 layers; use save_pretrained for a plain model")
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model, "config"):
        model.config.save_pretrained(directory)
    (directory / QUANT_CONFIG).write_text(json.dumps({"method": "nf4", "layers": layers}, indent=1))
    return directory


def load_quantized(directory: str | os.PathLike) -> nn.Module:
    """Load what save_quantized wrote: the transformers model with its NF4 layers, no dequantization."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta_path = directory / QUANT_CONFIG
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} has no {QUANT_CONFIG}; it was not written by save_quantized")
    layers = json.loads(meta_path.read_text())["layers"]
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, st in layers.items():
        parent, _, child = name.rpartition(".")
        layer = NF4Linear.empty(st["out_features"], st["in_features"], st["bias"], st["blocksize"],
                                st["double_quant"], getattr(torch, st["weight_dtype"]), getattr(torch, st["compute_dtype"]))
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model)
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if unexpected or left:
        raise ValueError(f"{directory}/model.safetensors does not match its config: unexpected {unexpected[:8]}, "
                         f"missing {left[:8]}")
    return model.requires_grad_(False).eval()
