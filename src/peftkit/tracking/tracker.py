"""One training run's experiment tracking: the backends `--report-to` names, opened together, fed the same rows.

A run's trainer hands the tracker four things: at setup, the options (logged as parameters); after every
step, the row it also writes to metrics.jsonl; at the end, the summary and the run's files (the adapter, the
loss curve, summary.json); and, if training fails, the exception. Each backend (tensorboard.py, mlflow.py,
wandb.py) imports its library only when it is opened, so none of them is a dependency of peftkit.

A backend that fails while the run trains is reported on stderr and dropped; the training goes on (its own
record, metrics.jsonl, is complete either way). A backend that cannot be opened stops the run before its first
step, with an error that says what to install or change.

Resume: what a backend needs to continue the same tracking run (MLflow's run id, W&B's run id) is kept in
<run dir>/tracking.json, read back when the run is resumed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..files import atomic_write

BACKENDS = ("tensorboard", "mlflow", "wandb")
INSTALL = "pip install 'peftkit[track]'"
STATE_FILE = "tracking.json"
MAX_NAMES_CHARS = 200  # --report-to is a short list; anything longer is not one


class TrackingError(RuntimeError):
    """A tracking backend cannot be used: its library is missing, or its store refuses the run."""


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """The backends named by `--report-to`: a comma-separated string or a list of names, in the given order
    without repeats; "none" (or nothing) is no backend. An unknown name is a ValueError naming the valid ones."""
    if value is None:
        return ()
    if isinstance(value, str):
        if len(value) > MAX_NAMES_CHARS:
            raise ValueError(f"--report-to is {len(value)} characters long; give a comma-separated list of "
                             f"{', '.join(BACKENDS)}")
        value = value.split(",")
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"--report-to takes backend names, got {item!r}; valid: {', '.join(BACKENDS)}, none")
        name = item.strip().lower()
        if name and name != "none" and name not in names:
            names.append(name)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"--report-to: unknown backend(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(BACKENDS)} (several separated by commas), or none")
    return tuple(names)


def require(module: str, backend: str):
    """Import a backend's library, or a TrackingError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TrackingError(f"--report-to {backend} needs the '{module}' package, which cannot be imported ({e}); "
                            f"install the tracking extras with: {INSTALL}") from None


LIBRARIES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # backend -> the package it needs


def check_installed(report_to: Iterable[str]) -> None:
    """Refuse backends whose library is not installed, without importing any (so a run stops before loading its
    model, not after): a TrackingError naming them and the command that installs them."""
    missing = []
    for name in parse_report_to(list(report_to)):
        try:
            found = importlib.util.find_spec(LIBRARIES[name]) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (import disabled)
            found = False
        if not found:
            missing.append(f"{name} (package '{LIBRARIES[name]}')")
    if missing:
        raise TrackingError(f"--report-to {', '.join(missing)}: not installed; install the tracking extras with: "
                            f"{INSTALL}, or leave those names out of --report-to")


@dataclass(frozen=True)
class RunInfo:
    """What the backends need to know about the run they track."""

    run_dir: Path
    name: str  # the run's display name in each tool (the run directory's name)
    params: dict[str, Any]  # the options, logged once as the run's parameters
    experiment: str = "peftkit"  # MLflow experiment, W&B project
    tracking_dir: Path | None = None  # a shared MLflow store and TensorBoard root (default: beside the run)
    resume_step: int | None = None  # None for a new run; the checkpoint's step when resuming
    saved: dict[str, dict] = field(default_factory=dict)  # tracking.json of the run being resumed

    @property
    def resumed(self) -> bool:
        return self.resume_step is not None


class Backend(Protocol):
    """One tracking tool. `log` may buffer; `flush` makes what was logged durable; `finish` records the summary
    and files and ends the tracking run as finished; `close` ends it with a status when `finish` did not run."""

    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, step: int, summary: dict[str, Any], files: dict[str, Path]) -> None: ...
    def close(self, status: str) -> None: ...
    def state(self) -> dict[str, Any]: ...


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers (not its step): the values a tracking tool can plot. None (not measured) is left out."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


class Tracker:
    """The open backends of one run (none when --report-to is empty, or on processes other than the main one)."""

    def __init__(self, backends: list[Backend] | None = None) -> None:
        self.backends = list(backends or [])
        self.last_step = 0
        self.closed = False

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: its numbers at its step."""
        if not self.backends:
            return
        step = int(row.get("step", self.last_step))
        self.last_step = max(self.last_step, step)
        values = numeric(row)
        if values:
            self._each("log", step, values)

    def flush(self) -> None:
        self._each("flush")

    def finish(self, summary: dict[str, Any], files: dict[str, Path]) -> None:
        """The summary's numbers and the run's files (name -> file or folder; missing ones are skipped), then
        end each tracking run as finished."""
        if self.closed:
            return
        present = {k: Path(p) for k, p in files.items() if p is not None and Path(p).exists()}
        self._each("finish", self.last_step, _finite(numeric(summary)) | _texts(summary), present)
        self.closed = True

    def close(self, error: BaseException | None = None) -> None:
        """End every tracking run that `finish` did not: FAILED after an error, KILLED after an interrupt."""
        if self.closed:
            return
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self._each("close", status)
        self.closed = True

    def _each(self, method: str, *args) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # the run's own record is metrics.jsonl; a tracking tool must not end training
                print(f"peftkit: --report-to {backend.name} failed in {method} ({type(e).__name__}: {e}); "
                      f"no more is logged to {backend.name} for this run", file=sys.stderr, flush=True)
                self.backends.remove(backend)


def _texts(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's short texts (paths, the model, the method), which a tool may show beside the numbers."""
    return {k: v for k, v in summary.items() if isinstance(v, str) and len(v) <= 500}


def _opener(name: str):
    module = importlib.import_module(f"{__package__}.{name}")
    return module.open_backend


def read_state(run_dir: Path) -> dict[str, dict]:
    """<run dir>/tracking.json: each backend's ids of the run it tracks ({} when there is none, or it is unusable)."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file() or path.stat().st_size > 64 * 1024:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        print(f"peftkit: {path} is not valid JSON; the resumed run starts new tracking runs", file=sys.stderr)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def write_state(run_dir: Path, state: dict[str, dict]) -> None:
    text = json.dumps(state, indent=2) + "\n"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / STATE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def open_tracker(report_to: Iterable[str], info: RunInfo) -> Tracker:
    """Open every backend named (in order), continuing the tracked runs of `info.saved` on resume, and record
    their ids in tracking.json. If one cannot be opened, those already open are closed and the error raised."""
    names = parse_report_to(list(report_to))
    if not names:
        return Tracker()
    backends: list[Backend] = []
    try:
        for name in names:
            backends.append(_opener(name)(info, info.saved.get(name) if info.resumed else None))
    except BaseException as e:
        Tracker(backends).close(e)
        raise
    state = {**(info.saved if info.resumed else {}), **{b.name: b.state() for b in backends}}
    write_state(info.run_dir, state)
    return Tracker(backends)
