"""--report-to wandb: one Weights & Biases run per training run, written under <run dir>/wandb.

Offline unless $WANDB_API_KEY is set or $WANDB_MODE says otherwise: an offline run touches no network and
keeps everything in <run dir>/wandb/offline-run-*/ (`wandb sync <that dir>` uploads it later; `wandb leet
inspect <that dir>` shows it). The project is --experiment; a sweep's trials share the group $WANDB_RUN_GROUP
(set by `sweep_parent`). Console capture is off (peftkit prints its own progress), and so, offline, is the
system-metrics sampler and the machine description.

The options are the run's config; every metrics.jsonl number is logged at its step; at the end the summary
goes into the run's summary, the adapter is a "model" artifact, and loss_curve.png, summary.json and
metrics.jsonl are the run's files. Resume: the run id kept in tracking.json is continued (resume="allow").
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from .tracker import RunInfo, require


def mode() -> str:
    """"offline" unless $WANDB_MODE is given or an API key is set in $WANDB_API_KEY."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _config_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class WandbBackend:
    name = "wandb"

    def __init__(self, info: RunInfo, saved: dict | None) -> None:
        wandb = require("wandb", self.name)
        self.wandb, self.info = wandb, info
        chosen = mode()
        quiet = chosen in ("offline", "disabled")
        settings = wandb.Settings(mode=chosen, silent=True, console="off", disable_git=quiet, save_code=False,
                                  x_disable_stats=quiet, x_disable_meta=quiet, x_disable_machine_info=quiet,
                                  x_save_requirements=not quiet)
        run_id = saved.get("id") if saved and isinstance(saved.get("id"), str) else None
        root = Path(info.run_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=info.experiment, name=info.name, dir=str(root),
                              config={k: _config_value(v) for k, v in info.params.items()},
                              id=run_id, resume="allow" if run_id else None, group=os.environ.get("WANDB_RUN_GROUP"),
                              settings=settings, reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # the W&B service writes as it receives; `finish` waits for it

    def finish(self, step: int, summary: dict[str, Any], files: dict[str, Path]) -> None:
        self.run.summary.update(summary)
        for name, path in files.items():
            if path.is_dir():
                artifact = self.wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{self.info.name}-{name}")[:120],
                                               type="model")
                artifact.add_dir(str(path))
                self.run.log_artifact(artifact)
            else:  # files copied into the run's files folder are part of the run (synced with it)
                shutil.copy2(path, Path(self.run.dir) / path.name)
        self.run.finish(exit_code=0)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def state(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.info.experiment, "mode": mode(),
                "dir": str(Path(self.run.dir).parent)}


def open_backend(info: RunInfo, saved: dict | None) -> WandbBackend:
    """This run's W&B run: the id in `saved` continued when resuming, else a new one."""
    return WandbBackend(info, saved)
