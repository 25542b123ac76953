"""Adapter folders on disk, whatever the method: HF PEFT's `adapter_config.json` + `adapter_model.safetensors`
(metadata {"format": "pt"}, keys prefixed `base_model.model.`), written atomically, read without unpickling
anything unless the caller opts in, and one error naming every key that does not fit a model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections import Counter
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
    new one, never half of one. The file gets the mode open() would give it (0666 less the umask), so a
    server running as another user can read what this process saved (mkstemp's files are always 0600)."""
    tmp, mode = _new_temp_file(target)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that made its own file (safetensors does)
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_temp_file(target: Path) -> tuple[str, int]:
    """(path, mode) of a new empty hidden file next to `target`, created exclusively (a name nobody else holds)
    with mode 0666, which the kernel narrows by the process umask: the mode open() gives a new file, read
    back without changing the process-wide umask."""
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"could not create a temporary file next to {target}")


def honour_umask(path: str | os.PathLike) -> None:
    """Give the file at `path`, or every file under the folder `path`, the mode open() gives a new file (0666
    less the umask). safetensors' save_file, and so transformers' save_pretrained, makes its files 0600
    whatever the umask, which a server running as another user cannot read."""
    path = Path(path)
    probe, mode = _new_temp_file((path if path.is_dir() else path.parent) / "umask")
    os.unlink(probe)
    for f in path.rglob("*") if path.is_dir() else [path]:
        if f.is_file() and not f.is_symlink():
            current = stat.S_IMODE(f.stat().st_mode)
            if current != mode and not current & 0o111:  # data files only; an executable keeps its mode
                os.chmod(f, mode)


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
    """The folder's adapter_config.json as a dict; a ValueError naming the file when it is not a JSON object."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{folder / CONFIG_NAME} holds a JSON {type(data).__name__}, not an object ({{...}}) of "
                         "config fields; save the adapter again (peftkit.save_adapter or PEFT's save_pretrained)")
    return data


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


SHOWN_KEYS = 8  # keys listed per kind in a mismatch error; the error object holds them all


class AdapterMismatch(ValueError):
    """An adapter file that does not fit the model. The message lists the first few keys of each kind,
    the counts and what the shapes say about the model the file was made for; `missing`, `unexpected`,
    `wrong` and `problems` hold every one."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], wrong: list[str],
                 problems: list[str]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.wrong, self.problems = missing, unexpected, wrong, problems


def _listed(count_line: str, keys: list[str]) -> str:
    more = len(keys) - SHOWN_KEYS
    tail = [f"... and {more} more (`peftkit inspect DIR --limit 0` lists the file's keys)"] if more > 0 else []
    return count_line + ":\n  " + "\n  ".join(keys[:SHOWN_KEYS] + tail)


def _layers(keys: list[str]) -> set[int]:
    return {int(m) for k in keys for m in re.findall(r"\.(\d+)\.", k)[:1]}


def likely_base(shape_pairs: list[tuple[tuple, tuple]], file_keys: list[str], model_keys: list[str],
                base: str | None) -> str:
    """What the mismatch says about the model the file was made for: the commonest differing dimension
    (file vs this model), the layer counts when they differ, and the base the config names."""
    dims = Counter((a, b) for file_shape, model_shape in shape_pairs
                   for a, b in zip(file_shape, model_shape) if a != b and len(file_shape) == len(model_shape))
    says = []
    if dims:
        (a, b), n = dims.most_common(1)[0]
        says.append(f"{n} dimension(s) are {a} in the file where this model has {b}")
    file_layers, model_layers = _layers(file_keys), _layers(model_keys)
    if file_layers and model_layers and max(file_layers) != max(model_layers):
        says.append(f"the file adapts layers up to {max(file_layers)}, this model's go up to {max(model_layers)}")
    story = f" ({'; '.join(says)})" if says else ""
    named = (f"Its config says base_model_name_or_path={base!r}: load it onto that model" if base else
             "Its config does not name its base (no base_model_name_or_path): load it onto the model it was made for")
    return f"This adapter looks made for another base model{story}. {named}, or pass --model with the right base."


def raise_if_unfit(what: str, missing: list[str], unexpected: list[str], wrong: list[str], problems: list[str],
                   base: str | None, story: str | None = None) -> None:
    """One error (AdapterMismatch) with the counts and first keys of each kind, or nothing when all fit."""
    if not (missing or unexpected or wrong or problems):
        return
    parts = [f"{what} does not fit this model; nothing was changed.", *problems]
    if wrong:
        parts.append(_listed(f"{len(wrong)} key(s) with wrong shapes", wrong))
    if missing:
        parts.append(_listed(f"{len(missing)} key(s) the model needs but the file lacks", missing))
    if unexpected:
        parts.append(_listed(f"{len(unexpected)} unexpected key(s) in the file", unexpected))
    parts.append(story or likely_base([], unexpected, missing, base))
    raise AdapterMismatch("\n".join(parts), missing, unexpected, wrong, problems)


def check_fit(what: str, tensors: dict[str, Tensor], want: Expected, base: str | None,
              unknown_options: list[str] | None = None) -> None:
    """Compare a file's tensors with what the model needs; raise_if_unfit with every offending key (and the
    config's options this peftkit does not know, which may explain the mismatch)."""
    required, optional = want.required, want.optional
    missing = sorted(k for k in required if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in required and k not in optional)
    shapes = {k: (tuple(v.shape), tuple(required.get(k, optional.get(k)))) for k, v in tensors.items()
              if (k in required or k in optional) and tuple(v.shape) != tuple(required.get(k, optional.get(k)))}
    wrong = sorted(f"{k}: file {file_shape}, model expects {model_shape}"
                   + (f" {want.notes[k]}" if k in want.notes else "") for k, (file_shape, model_shape) in shapes.items())
    story = likely_base(list(shapes.values()), list(tensors), list(required), base)
    if unknown_options:
        story = (f"Its config sets options this peftkit version does not know, which may be why: "
                 f"{', '.join(unknown_options[:SHOWN_KEYS])}. Otherwise: {story}")
    raise_if_unfit(what, missing, unexpected, wrong, want.problems, base, story)
