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

from .. import hf
from ..files import honour_umask
from ..targeting import output_head_names
from . import nf4
from .linear import BNB_STATE, NF4Linear


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


def _finish(model: nn.Module, config, directory: Path) -> nn.Module:
    """After tensors were placed into a meta-device skeleton: tie weights, rebuild non-persistent buffers,
    refuse if anything is still without data, freeze."""
    hf.tie_embeddings_if_configured(model, config)
    hf.rebuild_nonpersistent_buffers(model)
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta)
    if left:
        raise ValueError(f"checkpoint in {directory} lacks tensors for: {left[:8]}")
    return model.requires_grad_(False)


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
        model = AutoModelForCausalLM.from_config(config, **hf.dtype_kwargs(dtype))
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
    return _finish(model, config, directory)


QUANT_CONFIG = "peftkit_quantization.json"


def save_quantized(model: nn.Module, directory: str | os.PathLike, format: str = "peftkit") -> Path:
    """Write a model with NF4 layers. format="peftkit": `model.safetensors` (packed codes and statistics
    as buffers), `config.json` and `peftkit_quantization.json` listing each NF4 layer's settings.
    format="bnb": the transformers + bitsandbytes 4-bit layout, loadable by transformers'
    `from_pretrained` with bitsandbytes installed (and by load_quantized). Adapters are not included:
    save them with save_adapter."""
    import json

    from safetensors.torch import save_model

    from ..record import configs

    if configs(model):
        raise ValueError("the model carries adapters; save them with save_adapter and quantized base without "
                         "them (delete_adapter, or save before inject)")
    if format not in ("peftkit", "bnb"):
        raise ValueError(f"format must be 'peftkit' or 'bnb', got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: m.settings() for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not layers:
        raise ValueError("the model has no NF4 layers; use save_pretrained for a plain model")
    if format == "bnb":
        return _save_bnb(model, directory, layers)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    honour_umask(directory / "model.safetensors")  # safetensors makes 0600 files whatever the umask
    hf.save_config(model, directory)
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
        if _is_bnb_checkpoint(directory):
            return _load_bnb(directory)
        raise FileNotFoundError(f"{directory} has neither {QUANT_CONFIG} (save_quantized) nor a bitsandbytes 4-bit "
                                "quantization_config in config.json")
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
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{directory}/model.safetensors does not match its config: unexpected {unexpected[:8]}")
    return _finish(model, config, directory).eval()


def _is_bnb_checkpoint(directory: Path) -> bool:
    import json

    config = directory / "config.json"
    if not config.is_file():
        return False
    q = json.loads(config.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def _load_bnb(directory: Path) -> nn.Module:
    """A transformers + bitsandbytes NF4 checkpoint, read into NF4Linear layers without bitsandbytes."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    qconfig = json.loads((directory / "config.json").read_text())["quantization_config"]
    if qconfig.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{directory}: bnb_4bit_quant_type {qconfig.get('bnb_4bit_quant_type')!r}; only nf4 is read")
    compute = getattr(torch, str(qconfig.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))
    config = AutoConfig.from_pretrained(directory)
    hf.drop_quantization_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(path)))
    quantized = sorted(k[: -len(".weight." + BNB_STATE)] for k in state if k.endswith(".weight." + BNB_STATE))
    for name in quantized:
        prefix = name + "."
        own = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, NF4Linear.from_bnb(own, compute))
    for key, value in state.items():
        _set(model, key, value)
    return _finish(model, config, directory).eval()


def _save_bnb(model: nn.Module, directory: Path, layers: dict) -> Path:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            state.update({f"{name}.{k}": v for k, v in module.bnb_state_dict().items()})
            seen.update(id(t) for t in module.buffers())
            seen.update(id(t) for t in module.parameters())
    for key, tensor in [*model.named_parameters(remove_duplicate=True), *model.named_buffers()]:
        persistent = key.rpartition(".")[2] not in model.get_submodule(key.rpartition(".")[0])._non_persistent_buffers_set
        if id(tensor) not in seen and persistent:
            seen.add(id(tensor))
            state[key] = tensor
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    honour_umask(directory / "model.safetensors")  # safetensors makes 0600 files whatever the umask
    first = next(iter(layers.values()))
    hf.save_config(model, directory, quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": first["double_quant"],
        "bnb_4bit_compute_dtype": first["compute_dtype"], "bnb_4bit_quant_storage": "uint8",
    })
    return directory
