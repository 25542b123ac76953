"""The runs page's API: every training run under the folder, one run's options, summary and metrics (read from
a byte offset, for live curves), and the difference between two runs' options.

A run folder is what `peftkit train --output-dir DIR` writes: run_options.json, metrics.jsonl (one JSON row per
logged step), summary.json once it finished, loss_curve.png and adapter/. Any of them may be missing (a run
that just started, or one that stopped): the API says what it found and never fails a listing for one run.
"""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Query, Request

from .folder import Folder, UiError, read_rows, tail_rows

router = APIRouter()
LIVE_SECONDS = 120  # an unfinished run whose metrics changed this recently is shown as "running"
SUMMARY_KEYS = ("final_loss", "val_loss_start", "val_loss", "exact_match_before", "exact_match_after", "steps",
                "train_seconds", "tokens_per_second", "trainable_params", "trainable_share", "peak_memory_mb",
                "adapter_bytes")


def folder_of(request: Request) -> Folder:
    return request.app.state.folder


def finite(x):
    """x when it is a finite number, else None (JSON has no NaN or infinity)."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def run_status(run) -> str:
    """'finished' (summary.json written), 'running' (metrics changed in the last LIVE_SECONDS) or 'stopped'."""
    if (run / "summary.json").is_file():
        return "finished"
    metrics = run / "metrics.jsonl"
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < LIVE_SECONDS:
        return "running"
    return "stopped"


def run_entry(folder: Folder, run) -> dict:
    """One row of the runs table; a file that cannot be read is named in `problem` instead of failing."""
    entry = {"path": folder.relative(run), "name": run.name, "status": run_status(run), "problem": None}
    try:
        options = folder.read_json(run / "run_options.json", required=False) or {}
        summary = folder.read_json(run / "summary.json", required=False) or {}
        rows = tail_rows(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    except (UiError, OSError) as err:
        entry["problem"] = getattr(err, "message", str(err))
        return entry
    losses = [r for r in rows if finite(r.get("loss")) is not None]
    vals = [r for r in rows if finite(r.get("val_loss")) is not None]
    entry |= {"model": options.get("model"), "method": options.get("method"), "r": options.get("r"),
              "lr": options.get("lr"), "max_steps": options.get("max_steps") or summary.get("steps"),
              "step": max((r.get("step", 0) for r in rows if isinstance(r.get("step"), int)), default=0),
              "last_loss": finite(losses[-1]["loss"]) if losses else None,
              "val_loss": finite(vals[-1]["val_loss"]) if vals else None,
              "modified": (run / "metrics.jsonl").stat().st_mtime if (run / "metrics.jsonl").is_file() else None}
    return entry


@router.get("/api/runs")
def list_runs(request: Request) -> dict:
    """Every run under the folder, with its method, rank, progress and latest losses."""
    folder = folder_of(request)
    runs, _ = folder.find()
    return {"root": str(folder.root), "runs": [run_entry(folder, r) for r in runs]}


def run_dir(folder: Folder, path: str):
    run = folder.resolve(path, "run")
    if not run.is_dir() or not any((run / m).is_file() for m in ("run_options.json", "metrics.jsonl")):
        raise UiError(404, f"run {path!r} is not a training run (no run_options.json or metrics.jsonl in it)")
    return run


@router.get("/api/run")
def get_run(request: Request, path: str = Query(..., max_length=1024)) -> dict:
    """One run: its options, its summary (null until it finished), its status and which outputs exist."""
    folder = folder_of(request)
    run = run_dir(folder, path)
    summary = folder.read_json(run / "summary.json", required=False)
    return {"path": folder.relative(run), "name": run.name, "status": run_status(run),
            "options": folder.read_json(run / "run_options.json", required=False),
            "summary": summary, "summary_keys": [k for k in SUMMARY_KEYS if summary and k in summary],
            "has_adapter": (run / "adapter" / "adapter_config.json").is_file(),
            "has_loss_curve": (run / "loss_curve.png").is_file()}


@router.get("/api/run/metrics")
def get_metrics(request: Request, path: str = Query(..., max_length=1024), offset: int = Query(0, ge=0)) -> dict:
    """metrics.jsonl rows from byte `offset` (0: the start); poll with the returned `offset` to get only the
    rows appended since. `more` says that the file holds more than this answer carried."""
    folder = folder_of(request)
    metrics = run_dir(folder, path) / "metrics.jsonl"
    if not metrics.is_file():
        return {"rows": [], "offset": 0, "size": 0, "skipped": 0, "more": False}
    rows, new_offset, skipped = read_rows(metrics, offset)
    size = metrics.stat().st_size
    clean = [{k: (finite(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return {"rows": clean, "offset": new_offset, "size": size, "skipped": skipped, "more": size - new_offset > 1}


def options_diff(a: dict, b: dict) -> dict:
    """The keys whose values differ, and those only one side has (both sorted by key)."""
    changed = [{"key": k, "a": a[k], "b": b[k]} for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return {"changed": changed, "only_a": {k: a[k] for k in sorted(a.keys() - b.keys())},
            "only_b": {k: b[k] for k in sorted(b.keys() - a.keys())},
            "same": len([k for k in a.keys() & b.keys() if a[k] == b[k]])}


@router.get("/api/runs/diff")
def diff_runs(request: Request, a: str = Query(..., max_length=1024), b: str = Query(..., max_length=1024)) -> dict:
    """The difference between two runs' run_options.json."""
    folder = folder_of(request)
    sides = []
    for path in (a, b):
        options = folder.read_json(run_dir(folder, path) / "run_options.json", required=False)
        if options is None:
            raise UiError(404, f"run {path!r} has no run_options.json to compare")
        sides.append(options)
    return {"a": a, "b": b, **options_diff(*sides)}
