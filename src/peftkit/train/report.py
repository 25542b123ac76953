"""What a run leaves behind besides the adapter: metrics.jsonl, loss_curve.png, summary.json, and the
guard that keeps one run from writing over another."""

from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path

import torch

from ..files import atomic_write
from .checkpoints import latest_checkpoint, writing

RUN_FILES = ("run_options.json", "metrics.jsonl", "summary.json")


def check_output_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a directory that holds another run, unless the user resumes it or asks to replace it."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"--output-dir {path} exists and is not a directory")
    held = [f for f in RUN_FILES + ("checkpoints", "adapter") if (path / f).exists()]
    if resume:
        if not (path / "run_options.json").is_file():
            raise FileNotFoundError(f"--resume: {path} holds no peftkit run (no run_options.json)")
        return
    finished = any((path / f).exists() for f in ("summary.json", "adapter", "model"))
    if held and not overwrite and not finished and latest_checkpoint(path) is None:
        raise FileExistsError(f"--output-dir {path} holds a run that stopped before writing its first checkpoint "
                              f"({', '.join(held)}; no complete checkpoint in checkpoints/), so --resume has nothing "
                              "to continue from: pass --overwrite to start it over, or choose another --output-dir")
    if held and not overwrite:
        raise FileExistsError(f"--output-dir {path} already holds a run ({', '.join(held)}); pass --resume latest "
                              "to continue it, --overwrite to replace it, or choose another --output-dir")
    if held and overwrite:
        import shutil

        for f in held:
            target = path / f
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        (path / "loss_curve.png").unlink(missing_ok=True)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: accelerator memory allocated on CUDA, resident set size on CPU.
    On Linux the resident peak is VmHWM: ru_maxrss survives exec, so a process started from a larger
    one would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Metrics:
    """Appends one JSON line per logged event; on resume, drops lines from after the checkpoint (rewriting the
    file atomically) and a last line cut short by a kill, with a warning."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():
            kept = [row for row in read_metrics(path) if row.get("step", 0) <= resume_step]
            text = "".join(json.dumps(row) + "\n" for row in kept)
            with writing(path, "the metrics log"):
                atomic_write(path, lambda tmp: _write_synced(tmp, text))

    def log(self, **row) -> None:
        if not self.enabled:
            return
        with writing(self.path, "the metrics log"), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        return read_metrics(self.path) if self.path.is_file() else []


def read_metrics(path: Path, warn: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl. A last line without its newline that is not valid JSON was cut short when
    the process was killed while writing it: it is dropped, with a warning unless `warn` is False. Any other
    line that is not a JSON object is an error naming the file and the line."""
    lines = path.read_text(encoding="utf-8").split("\n")  # split() keeps a last line that has no newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it: the write was cut short
                if warn:
                    warnings.warn(f"{path}: dropped its last line, which was cut short when the run was killed "
                                  f"while writing it ({len(line)} characters: {line[:60]!r})", stacklevel=2)
                continue
            raise ValueError(f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}; "
                             "repair or delete that line, or pass --overwrite to start the run over") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} holds a JSON {type(row).__name__}, not a row of metrics; "
                             "repair or delete that line, or pass --overwrite to start the run over")
        rows.append(row)
    return rows


def _write_synced(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def plot_loss(rows: list[dict], path: Path, title: str) -> Path | None:
    """Training loss per step (and validation loss where measured) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a plot is a nicety; the numbers are in metrics.jsonl
        return None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="training loss", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on answer tokens")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with writing(path, "the loss curve"):
            fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    with writing(path, "the run's record"):
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def format_summary(s: dict) -> str:
    """The table printed at the end of `peftkit train`."""
    lines = ["", f"run: {s['output_dir']}"]
    unit = "tickets" if s.get("task", "built-in tickets") == "built-in tickets" else "examples"
    for key, what in (("exact_match", f"exact match (held-out, {s.get('eval_examples')} {unit})"),
                      ("json_match", f"JSON match (held-out, {s.get('json_examples')} JSON answers)")):
        if s.get(f"{key}_after") is not None:
            before = s.get(f"{key}_before")
            lines.append(f"  {what}: " + (f"{100 * before:.0f}% before -> " if before is not None else "")
                         + f"{100 * s[f'{key}_after']:.0f}% after")
    if s.get("val_loss") is not None:
        start = s.get("val_loss_start")
        lines.append("  validation loss: " + (f"{start:.4f} at step 0 -> " if start is not None else "")
                     + f"{s['val_loss']:.4f}")
    lines += [
        (f"  training: {s['steps']} steps, {s['train_seconds']:.0f} s ({s['tokens_per_second']:.0f} tokens/s); "
         f"whole command {s['total_seconds']:.0f} s"),
        (f"  trainable: {s['trainable_params']:,} of {s['total_params']:,} parameters "
         f"({100 * s['trainable_share']:.2f}%)"),
        f"  adapter: {s['adapter_dir']} ({s['adapter_bytes'] / 2**20:.1f} MB on disk)",
        f"  peak memory: {s['peak_memory_mb']:.0f} MB ({s['memory_kind']})",
        f"  files: metrics.jsonl, loss_curve.png, summary.json, checkpoints/ in {s['output_dir']}",
    ]
    return "\n".join(lines)
