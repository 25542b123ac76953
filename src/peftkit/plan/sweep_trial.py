"""One sweep trial: a `train()` run in a fresh Python process, watched by the sweep while it runs.

The trial process knows nothing of the sweep or of Optuna: it trains from <dir>/trial_options.json and
writes <dir>/trial_result.json. The parent polls the trial's metrics.jsonl as it grows; each intermediate
validation row (--eval-every) goes to a `monitor(step, val_loss)` callback, and when that answers True (the
pruner's verdict) the parent stops the process and records the trial as pruned. The same loop stops a trial
that runs past its time. A trial process also dies with its parent (Linux), so a killed sweep leaves no
orphan training on.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..train import options as opts
from ..train.report import read_metrics

Monitor = Callable[[int, float], bool]  # (step, validation loss) -> True: stop the trial now (pruned)
POLL_S = 0.25  # how often the parent looks at a running trial
STOP_GRACE_S = 5.0  # after SIGTERM, how long a trial has to exit before SIGKILL


def run_trial(c, o: opts.TrainOptions, timeout_s: float, monitor: Monitor | None = None) -> dict:
    """Train `o` in a fresh Python process (output in <output_dir>/trial.log); the trial's record: status "ok"
    with its measurements, "pruned" when `monitor` stopped it, or "failed" (with timed_out when it ran past
    `timeout_s`). Candidate `c` is not used here; it is the Runner interface's, which fakes in tests share."""
    import peftkit

    out = Path(o.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("trial_result.json", "metrics.jsonl"):  # a trial run again (--resume) starts clean
        (out / stale).unlink(missing_ok=True)
    (out / "trial_options.json").write_text(json.dumps(o.to_dict(), indent=2))
    src = str(Path(peftkit.__file__).resolve().parents[1])  # the child imports this same peftkit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    code = "import sys; from peftkit.plan.sweep_trial import trial_main; sys.exit(trial_main(sys.argv[1]))"
    started = time.monotonic()
    with open(out / "trial.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            stopped = _watch(proc, out / "metrics.jsonl", started + max(timeout_s, 1.0), monitor)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C) or stopped: the trial process goes too
                _stop(proc)
    wall = time.monotonic() - started
    if stopped is not None:
        return {**stopped, "wall_s": wall}
    return _finished_record(out, proc.returncode, wall)


def _watch(proc: subprocess.Popen, metrics: Path, deadline: float, monitor: Monitor | None) -> dict | None:
    """Wait for the trial; None when it exits by itself, else the record of why it was stopped."""
    reported = 0
    while True:
        try:
            proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            pass
        if monitor is not None and metrics.is_file():
            rows = read_metrics(metrics, warn=False)
            checks = [r for r in rows if "loss" in r and r.get("val_loss") is not None and r["step"] > reported]
            for row in checks:
                reported = row["step"]
                if monitor(row["step"], row["val_loss"]):
                    _stop(proc)
                    return pruned_record(rows, row)
        if proc.poll() is not None:
            return None
        if time.monotonic() > deadline:
            _stop(proc)
            return {"status": "failed", "timed_out": True,
                    "error": "stopped at the end of the sweep's time budget (it ran longer than estimated)"}


def pruned_record(rows: list[dict], at: dict) -> dict:
    """What a pruned trial measured up to the step where it was stopped, from its metrics.jsonl rows."""
    steps = [r for r in rows if "loss" in r and r["step"] <= at["step"]]
    ends = [0.0] + [r["seconds"] for r in steps if "seconds" in r]
    per_step = [b - a for a, b in itertools.pairwise(ends)]
    return {"status": "pruned", "pruned_at": at["step"], "eval_loss": at["val_loss"],
            "step_s": statistics.median(per_step) if per_step else None,
            "peak_memory_mb": max((r.get("memory_mb", 0.0) for r in steps), default=None),
            "reason": f"at step {at['step']}, eval loss {at['val_loss']:.4f} behind the other trials"}


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the sweep process dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _finished_record(out: Path, returncode: int, wall: float) -> dict:
    result_file = out / "trial_result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is None:
        how = (f"was killed by {signal.Signals(-returncode).name} (SIGKILL is often the out-of-memory killer)"
               if returncode < 0 else f"exited with status {returncode}")
        tail = (out / "trial.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"status": "failed", "wall_s": wall, "error": f"the trial process {how}: {' | '.join(tail)}"}
    if result["status"] != "ok":
        return {"status": "failed", "wall_s": wall, "error": result["error"]}
    return measured_record(result, wall)


def trial_main(out_dir: str) -> int:
    """The child process: train from <out_dir>/trial_options.json, write <out_dir>/trial_result.json."""
    out = Path(out_dir)
    from ..train.distributed import init_distributed
    from ..train.loop import train
    from ..train.process import configure_process

    try:
        o = opts.TrainOptions(**json.loads((out / "trial_options.json").read_text()))
        configure_process(o, init_distributed(o.device))  # this process is the trial's: as `peftkit train` does
        summary = train(o)
        result = {"status": "ok", "summary": summary}
    except (Exception, MemoryError) as err:  # noqa: BLE001 (the parent records it; the traceback goes to trial.log)
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    (out / "trial_result.json").write_text(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def measured_record(result: dict, wall_s: float) -> dict:
    """The fields of a finished trial, from its summary and metrics.jsonl."""
    s = result["summary"]
    peak = s["peak_memory_mb"]  # VmHWM on Linux: this trial process's own peak
    metrics = Path(s["output_dir"]) / "metrics.jsonl"
    rows = read_metrics(metrics, warn=False) if metrics.is_file() else []
    ends = [0.0] + [r["seconds"] for r in rows if "loss" in r and "seconds" in r]
    steps = s["steps"]
    per_step = [b - a for a, b in itertools.pairwise(ends)] or [s["train_seconds"] / max(steps, 1)]
    return {"status": "ok", "steps": steps, "eval_loss": s["val_loss"], "final_loss": s["final_loss"],
            "exact_match": s.get("exact_match_after"), "step_s": statistics.median(per_step),
            "mean_step_s": s["train_seconds"] / max(steps, 1), "peak_memory_mb": peak,
            "memory_kind": s.get("memory_kind"), "trainable_params": s["trainable_params"],
            "trainable_share": s["trainable_share"], "train_s": s["train_seconds"], "wall_s": wall_s,
            "adapter_dir": s.get("adapter_dir")}
