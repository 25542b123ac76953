"""Adapter folders on disk, whatever the method: HF PEFT's `adapter_config.json` + `adapter_model.safetensors`
(metadata {"format": "pt"}, keys prefixed `base_model.model.`), written atomically, read without unpickling
anything unless the caller opts in, and one error naming every key that does not fit a model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .registry import Expected

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """Write `target` through `write(tmp_path)` and rename it into place: readers see the old file or the
    new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_adapter(directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any],
                  key_prefix: str = PREFIX) -> Path:
    """Write one adapter folder: tensors (keys without `key_prefix`, which is added) and the config dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    on_disk = {key_prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(on_disk, p, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text + "\n"))
    return directory


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


def read_config_dict(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err


def read_tensors(folder: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """The folder's tensors with the `base_model.model.` prefix stripped. A pickled `.bin` is opened only
    with allow_pickle=True (and then with torch.load(weights_only=True))."""
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
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


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


def check_fit(what: str, tensors: dict[str, Tensor], want: Expected, base: str | None) -> None:
    """Compare a file's tensors with what the model needs; raise_if_unfit with every offending key."""
    required, optional = want.required, want.optional
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required and k not in optional)
    wrong = sorted(f"{k}: file {tuple(v.shape)}, model expects {required.get(k, optional.get(k))}"
                   + (f" {want.notes[k]}" if k in want.notes else "")
                   for k, v in tensors.items()
                   if (k in required or k in optional) and tuple(v.shape) != required.get(k, optional.get(k)))
    raise_if_unfit(what, missing, unexpected, wrong, want.problems, base)
