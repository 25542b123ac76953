"""The folder `peftkit ui` was started on: the only place it reads from.

Every path a request names is relative to the folder; it is refused (400) when it is absolute, holds '..',
a NUL or a backslash, and (404) when, symlinks followed, it resolves outside the folder or does not exist.
Reads are bounded: JSON files up to MAX_JSON_BYTES, metrics.jsonl in pieces of at most MAX_METRICS_CHUNK
bytes from a byte offset (so a live run is polled by reading only what was appended), and the search for
runs and sweeps stops at MAX_DEPTH levels and MAX_DIRS folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_JSON_BYTES = 8 << 20
MAX_METRICS_CHUNK = 2 << 20
MAX_DEPTH = 4
MAX_DIRS = 5000
MAX_PATH_CHARS = 1024
RUN_MARKERS = ("run_options.json", "metrics.jsonl")
SWEEP_MARKER = "sweep.json"


class UiError(Exception):
    """A request the console refuses or cannot answer: an HTTP status and a message that says what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Folder:
    """Reads under `root` only (see the module docstring for the rules)."""

    def __init__(self, root: str | Path) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(f"{root} is not a directory; give the folder that holds your runs (peftkit train "
                             "--output-dir) and sweeps (peftkit sweep --output-dir)")
        self.root = path.resolve()

    # --- paths ----------------------------------------------------------------------------------------------
    def resolve(self, rel: str, kind: str = "path") -> Path:
        """The file or folder `rel` names under the root; UiError 400 for a malformed path, 404 when it is
        missing or (links followed) outside the root."""
        if not isinstance(rel, str) or len(rel) > MAX_PATH_CHARS:
            raise UiError(400, f"{kind}: give a path relative to the console's folder, at most {MAX_PATH_CHARS} "
                               "characters")
        text = rel.strip()
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if text.startswith("/") or "\\" in text or "\x00" in text or ".." in parts or (text[1:2] == ":"):
            raise UiError(400, f"{kind} {rel[:200]!r} is not a plain relative path: paths are relative to the "
                               "console's folder, without '..', a leading '/', backslashes or a drive")
        target = self.root.joinpath(*parts)
        try:
            real = target.resolve(strict=True)
        except (OSError, RuntimeError):
            raise UiError(404, f"{kind} {rel[:200]!r} does not exist under {self.root}") from None
        if real != self.root and self.root not in real.parents:
            raise UiError(404, f"{kind} {rel[:200]!r} does not exist under {self.root} (it links outside it)")
        return real

    def relative(self, path: Path) -> str:
        """`path` as the API names it: relative to the root, '/'-separated ('.' for the root itself)."""
        rel = path.relative_to(self.root).as_posix()
        return rel or "."

    # --- reading ------------------------------------------------------------------------------------------
    def read_json(self, path: Path, required: bool = True) -> dict | None:
        """A JSON object from `path` (bounded); None when it is absent and not `required`."""
        if not path.is_file():
            if required:
                raise UiError(404, f"{self.relative(path)} does not exist")
            return None
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise UiError(413, f"{self.relative(path)} is {size} bytes, more than the console reads "
                               f"({MAX_JSON_BYTES} bytes)")
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            raise UiError(422, f"{self.relative(path)} is not readable JSON ({err}); repair or remove it") from None
        if not isinstance(data, dict):
            raise UiError(422, f"{self.relative(path)} holds a JSON {type(data).__name__}, not an object")
        return data

    def find(self) -> tuple[list[Path], list[Path]]:
        """(run folders, sweep folders) under the root, sorted by path. A run folder holds run_options.json or
        metrics.jsonl; a sweep folder holds sweep.json (its trials' own runs are not listed as runs)."""
        runs, sweeps, seen = [], [], 0
        for here, dirs, files in os.walk(self.root, followlinks=False):
            path = Path(here)
            depth = len(path.relative_to(self.root).parts)
            seen += 1
            if SWEEP_MARKER in files:
                sweeps.append(path)
                dirs.clear()  # a sweep's trials/ are shown on its own page
            elif any(m in files for m in RUN_MARKERS):
                runs.append(path)
                dirs.clear()  # checkpoints/, adapter/: nothing more to find inside a run
            if depth >= MAX_DEPTH or seen >= MAX_DIRS:
                dirs.clear()
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        return sorted(runs), sorted(sweeps)


def read_rows(path: Path, offset: int = 0, limit: int = MAX_METRICS_CHUNK) -> tuple[list[dict], int, int]:
    """(rows, next offset, lines skipped) of a metrics.jsonl from byte `offset`: whole lines only, at most
    `limit` bytes of them, so a line still being written is read at the next poll. Lines that are not JSON
    objects are skipped and counted (the trainer's own reader names them)."""
    if offset < 0:
        raise UiError(400, f"offset must be 0 or more, got {offset}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if offset > size:  # the file was replaced (a run started over): read it again from the start
            offset = 0
        f.seek(offset)
        data = f.read(limit)
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset, 0
    rows, skipped = [], 0
    for line in data[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return rows, offset + end + 1, skipped


def tail_rows(path: Path, nbytes: int = 64 << 10) -> list[dict]:
    """The rows of the last `nbytes` of a metrics.jsonl (a line cut by that window is left out)."""
    size = path.stat().st_size
    start = max(0, size - nbytes)
    if start > 0:
        with open(path, "rb") as f:
            f.seek(start - 1)
            head = f.read(nbytes)
        cut = head.find(b"\n")  # the window starts after the first newline at or past start - 1
        if cut < 0:
            return []
        start += cut
    return read_rows(path, start, nbytes)[0]
