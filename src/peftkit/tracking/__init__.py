"""Experiment tracking for `peftkit train --report-to tensorboard,mlflow,wandb` and for sweeps.

    tracker = open_tracker(["mlflow"], RunInfo(run_dir, name, params))   # at setup (main process only)
    tracker.log(row)                                                      # every metrics.jsonl row
    tracker.finish(summary, {"adapter": adapter_dir, ...})                # at the end
    tracker.close(error)                                                  # if training failed instead

Each backend's library (tensorboard, mlflow, wandb: the `track` extra) is imported only when it is used.
The user guide is docs/tracking.md.
"""

from __future__ import annotations

from .sweep import SweepParent, sweep_parent
from .tracker import (
    BACKENDS,
    INSTALL,
    STATE_FILE,
    RunInfo,
    Tracker,
    TrackingError,
    check_installed,
    open_tracker,
    parse_report_to,
    read_state,
)

__all__ = ["BACKENDS", "INSTALL", "STATE_FILE", "RunInfo", "SweepParent", "Tracker", "TrackingError",
           "check_installed", "open_tracker", "parse_report_to", "read_state", "sweep_parent"]
