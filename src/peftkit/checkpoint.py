"""Adapters on disk in HF PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` ([r, in]) and `.lora_B.weight` ([out, r]);
for embeddings `.lora_embedding_A` ([r, num_embeddings]) and `.lora_embedding_B` ([dim, r]); DoRA's
magnitude as `.lora_magnitude_vector` ([out], no `.weight` suffix, as PEFT writes it); a
modules_to_save copy under the module's own path; biases of wrapped layers under `.base_layer.bias`.
The adapter's name is not in the file. Loading validates every key against the model before anything
changes, and never unpickles a `.bin` file unless the caller opts in.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import LoraConfig, config_from_peft_dict
from .inject import check_name, configs, inject, mark_trainable, require_adapter, saved_copy_targets, wrappers
from .methods.lora import LoraLayer, factor_shapes
from .methods.saved_copy import SavedCopy
from .targeting import adaptable_kind, select_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"


def _factor_keys(path: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"{path}.lora_embedding_A", f"{path}.lora_embedding_B"
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """Adapter `name`'s tensors under PEFT's key names (without the `base_model.model.` prefix)."""
    from .methods.prefix import prefix_configs, prefix_state_dict  # here: methods.prefix imports this module

    if name in prefix_configs(model):
        return prefix_state_dict(model, name)
    require_adapter(model, name)
    config = configs(model)[name]
    if config.peft_type == "BOTTLENECK":
        from .methods.bottleneck_io import bottleneck_state_dict  # here: bottleneck_io imports this module

        return bottleneck_state_dict(model, name)
    out: dict[str, Tensor] = {}
    for path, w in wrappers(model):
        if isinstance(w, LoraLayer) and name in w.lora_A:
            key_a, key_b = _factor_keys(path, w.peftkit_kind)
            out[key_a], out[key_b] = w.lora_A[name], w.lora_B[name]
            if name in w.lora_magnitude_vector:
                out[f"{path}.{MAGNITUDE}"] = w.lora_magnitude_vector[name]
            if config.bias == "lora_only" and getattr(w.base, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = w.base.bias
        elif isinstance(w, SavedCopy) and name in w.copies:
            out.update({f"{path}.{k}": v for k, v in w.copies[name].state_dict().items()})
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                out[_peft_param_name(model, pname)] = p
    return {k: v.detach() for k, v in out.items()}


def _peft_param_name(model: nn.Module, pname: str) -> str:
    """Our parameter name -> PEFT's: a LoRA layer's `.base.` is PEFT's `.base_layer.`."""
    for path, w in wrappers(model):
        if pname.startswith(f"{path}.base."):
            return f"{path}.base_layer." + pname[len(path) + 6:]
    return pname


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 tensors: dict[str, Tensor] | None = None) -> Path:
    """Write adapter `name` to `directory` in HF PEFT's format (loadable by PeftModel.from_pretrained).

    `tensors` (adapter_state_dict's keys) replaces the model's own values: a sharded (FSDP) run gathers
    them on every process first and passes the full tensors to the one process that writes."""
    from .methods.prefix import prefix_configs, save_prefix

    if name in prefix_configs(model):
        return save_prefix(model, directory, name, tensors=tensors)
    require_adapter(model, name)
    if configs(model)[name].peft_type == "BOTTLENECK":
        from .methods.bottleneck_io import save_bottleneck

        return save_bottleneck(model, directory, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = configs(model)[name]
    kinds = {w.peftkit_kind for _, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.lora_A}
    extra = {"fan_in_fan_out": "conv1d" in kinds}
    if config.base_model_name_or_path is None:
        extra["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    state = adapter_state_dict(model, name) if tensors is None else tensors
    tensors = {PREFIX + k: v.to("cpu").contiguous().clone() for k, v in state.items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config.replace(**extra).to_peft_dict(), indent=2, sort_keys=True)
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return directory


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- loading ------------------------------------------------------------------------------------------
def find_adapter_dir(directory: str | os.PathLike, name: str = "default") -> Path:
    """The folder holding adapter_config.json: `directory/<name>` when it has one (PEFT saves adapters
    other than "default" in subfolders named after them), else `directory` itself."""
    directory = Path(directory)
    for candidate in (directory / name, directory):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    subs = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {str(directory)!r} or in its subfolder {name!r}"
        + (f"; adapters found in subfolders: {subs}" if subs else "")
    )


def read_adapter(directory: str | os.PathLike, name: str = "default",
                 allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read (config, tensors with the `base_model.model.` prefix stripped) without touching a model."""
    folder = find_adapter_dir(directory, name)
    try:
        config = config_from_peft_dict(json.loads((folder / CONFIG_NAME).read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights} is corrupt or truncated and cannot be read ({err}); "
                             "save the adapter again or restore the file") from err
    elif (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ValueError(
                f"{folder / PICKLE_NAME} is a pickle file, and unpickling can run arbitrary code, so peftkit does "
                "not open it by default. If you trust its source, pass allow_pickle=True (it is then read with "
                "torch.load(weights_only=True)), and re-save it as safetensors with save_adapter."
            )
        tensors = torch.load(folder / PICKLE_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (or {PICKLE_NAME})")
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def _expected(model: nn.Module, config: LoraConfig) -> tuple[dict[str, tuple], dict[str, tuple], list[str]]:
    """(required key -> shape, optional key -> shape, problems) for loading `config` into `model`."""
    required: dict[str, tuple] = {}
    optional: dict[str, tuple] = {}
    problems: list[str] = []
    try:
        targets = select_targets(model, config)
    except ValueError as err:
        targets, problems = [], [str(err)]
    for path, module in targets:
        kind = adaptable_kind(module)
        base = module.base if isinstance(module, LoraLayer) else module
        a_shape, b_shape = factor_shapes(kind, base, config.rank_for(path))
        key_a, key_b = _factor_keys(path, kind)
        required[key_a], required[key_b] = a_shape, b_shape
        if config.use_dora:
            required[f"{path}.{MAGNITUDE}"] = (b_shape[0],)
        for pname, p in base.named_parameters(recurse=False):
            optional[f"{path}.base_layer.{pname}"] = tuple(p.shape)  # PEFT saves embedding weights, biases
    try:
        copies = saved_copy_targets(model, config)
    except ValueError as err:
        copies, problems = [], problems + [str(err)]
    for path, module in copies:
        inner = module.base if isinstance(module, SavedCopy) else module
        required.update({f"{path}.{k}": tuple(v.shape) for k, v in inner.state_dict().items()})
    if config.bias != "none":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                optional.setdefault(_peft_param_name(model, pname), tuple(p.shape))
    return required, optional, problems


def raise_if_unfit(what: str, missing: list[str], unexpected: list[str], wrong: list[str], problems: list[str],
                   base: str | None) -> None:
    """One error naming every offending key (any adapter kind), or nothing when all fit."""
    if not (missing or unexpected or wrong or problems):
        return
    parts = [f"{what} does not fit this model; nothing was changed.", *problems]
    if wrong:
        parts.append(f"{len(wrong)} key(s) with wrong shapes:\n  " + "\n  ".join(wrong))
    if missing:
        parts.append(f"{len(missing)} key(s) the model needs but the file lacks:\n  " + "\n  ".join(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file:\n  " + "\n  ".join(unexpected))
    parts.append(f"Is this adapter for another base model? Its config says base_model_name_or_path={base!r}.")
    raise ValueError("\n".join(parts))


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Load a PEFT-format adapter into `model` in place as adapter `name`, and make it active.

    Every key is checked against the model first (missing modules, wrong shapes, unexpected keys); on any
    problem the error lists every offending key and the model is left exactly as it was. With
    trainable=False every parameter ends frozen (inference); with True the adapter's weights train.
    """
    check_name(name)
    if name in configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) or load under another name")
    config, tensors = read_adapter(directory, name, allow_pickle=allow_pickle)
    if config.peft_type == "PREFIX_TUNING":
        from .methods.prefix import load_prefix

        return load_prefix(model, directory, name, trainable=trainable)
    if config.peft_type == "BOTTLENECK":
        from .methods.bottleneck_io import load_bottleneck

        return load_bottleneck(model, directory, name, trainable=trainable)
    required, optional, problems = _expected(model, config)
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required and k not in optional)
    wrong = sorted(f"{k}: file {tuple(v.shape)}, model expects {required.get(k, optional.get(k))}"
                   for k, v in tensors.items()
                   if (k in required or k in optional) and tuple(v.shape) != required.get(k, optional.get(k)))
    raise_if_unfit(f"adapter in {str(directory)!r}", missing, unexpected, wrong, problems,
                   config.base_model_name_or_path)

    inject(model, config, name, init=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path, w in wrappers(model):
            if isinstance(w, LoraLayer) and name in w.lora_A:
                key_a, key_b = _factor_keys(path, w.peftkit_kind)
                w.lora_A[name].copy_(tensors[key_a])
                w.lora_B[name].copy_(tensors[key_b])
                if name in w.lora_magnitude_vector:
                    w.lora_magnitude_vector[name].copy_(tensors[f"{path}.{MAGNITUDE}"])
            elif isinstance(w, SavedCopy) and name in w.copies:
                w.copies[name].load_state_dict({k[len(path) + 1:]: v for k, v in tensors.items()
                                                if k.startswith(path + ".")})
        for key in (k for k in tensors if k in optional):
            ours = key.replace(".base_layer.", ".base.")
            target = params.get(ours, params.get(key))
            if target is not None:
                target.copy_(tensors[key])
    mark_trainable(model, name if trainable else None)
    return model
