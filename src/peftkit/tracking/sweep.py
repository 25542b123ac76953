"""A sweep as one tracked parent with each trial a run under it.

    with tracking.sweep_parent(o.report_to, sweep_dir, params, experiment=o.experiment,
                               tracking_dir=o.tracking_dir) as parent:
        for each trial:  subprocess.run(..., env={**os.environ, **parent.env})   # its train() logs as a child
        parent.log({"best_eval_loss": ...}, step=trial_number)                     # optional
        parent.finish(summary, {"sweep.json": path})                              # optional, else FINISHED on exit

MLflow: the parent is a run in --experiment; each trial's run gets the tag mlflow.parentRunId (the UI nests it)
and uses the parent's store, whatever its own directory. A trial whose process was terminated (pruned, timed
out) cannot end its own run: the parent ends those KILLED when the block is left. TensorBoard: each trial writes to
<--tracking-dir or the sweep directory>/tensorboard/<trial run name>, so one `tensorboard --logdir` shows them
side by side. W&B: the trials share the group named after the sweep directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import mlflow as mlflow_backend
from . import tensorboard as tensorboard_backend
from .tracker import RunInfo, Tracker, parse_report_to


class SweepParent:
    """The sweep's tracking: `env` for each trial's process, and the parent run's own log and finish."""

    def __init__(self, env: dict[str, str], tracker: Tracker) -> None:
        self.env, self.tracker = env, tracker

    def log(self, values: dict[str, Any], step: int) -> None:
        """Numbers of the sweep itself (say, the best loss so far after each trial) on the parent run."""
        self.tracker.log({**values, "step": step})

    def finish(self, summary: dict[str, Any], files: dict[str, Path] | None = None) -> None:
        """The sweep's result on the parent run (its numbers, and files such as the sweep's record), ending it."""
        self.tracker.finish(summary, files or {})

    @contextmanager
    def environ(self) -> Iterator[None]:
        """Set `env` in this process for the block (for trials run in-process rather than as subprocesses)."""
        before = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextmanager
def sweep_parent(report_to: str | Iterable[str] | None, sweep_dir: str | Path, params: dict[str, Any],
                 experiment: str = "peftkit", tracking_dir: str | Path | None = None) -> Iterator[SweepParent]:
    """Open the sweep's parent run (MLflow) and yield the environment each trial's process needs so that its
    `train()` (with the same report_to) logs under it; on leaving the block the parent run ends FINISHED, or
    FAILED (KILLED on Ctrl-C) when the block raised. `params` are the sweep's settings, logged on the parent."""
    names = parse_report_to(report_to)
    sweep_dir = Path(sweep_dir)
    root = Path(tracking_dir) if tracking_dir is not None else None
    env: dict[str, str] = {}
    tracker = Tracker()
    if "tensorboard" in names:
        env[tensorboard_backend.ENV_DIR] = str(((root or sweep_dir) / "tensorboard").resolve())
    if "wandb" in names:
        env["WANDB_RUN_GROUP"] = sweep_dir.name
    if "mlflow" in names:
        info = RunInfo(run_dir=sweep_dir, name=sweep_dir.name, params=params, experiment=experiment,
                       tracking_dir=root or sweep_dir.resolve().parent)
        parent = mlflow_backend.open_backend(info, None)
        tracker = Tracker([parent])
        env["MLFLOW_TRACKING_URI"] = parent.uri
        env[mlflow_backend.ENV_PARENT] = parent.run_id
    try:
        yield SweepParent(env, tracker)
    except BaseException as e:
        tracker.close(e)
        raise
    finally:
        if tracker:
            try:
                end_unfinished_children(tracker.backends[0])
            except Exception as e:  # the sweep's own outcome (or error) matters more than this tidying
                print(f"peftkit: could not end the sweep's unfinished MLflow trial runs ({e})", file=sys.stderr)
    tracker.close()


def end_unfinished_children(parent: mlflow_backend.MlflowBackend) -> list[str]:
    """End as KILLED the trial runs under `parent` that are still RUNNING: a trial whose process the sweep
    terminated (pruned, or over its time) had no chance to end its own. Their ids."""
    client = parent.client
    experiment = client.get_run(parent.run_id).info.experiment_id
    stale = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.run_id}' "
                                             "and attributes.status = 'RUNNING'")
    for run in stale:
        parent.client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in stale]
