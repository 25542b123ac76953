"""--report-to mlflow: one MLflow run per training run, through `mlflow.MlflowClient`.

The store: $MLFLOW_TRACKING_URI when set (a server, a database, a directory); otherwise a local SQLite
database `sqlite:///<dir>/mlflow.db` with artifacts in `<dir>/mlartifacts`, where <dir> is --tracking-dir or
the run directory's parent, so sibling runs land in one store (`mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`). The experiment is --experiment (default "peftkit").

The options are the run's parameters; every metrics.jsonl number a metric at its step (buffered and written
in batches, at most every few seconds, so a step never waits for the database); at the end the summary's
numbers are `summary/<name>` metrics and the adapter, loss_curve.png, summary.json, metrics.jsonl and
run_options.json artifacts. A sweep's trial is a child of the sweep's run ($PEFTKIT_MLFLOW_PARENT_RUN_ID,
set by `sweep_parent`), so the MLflow UI nests them.

Resume: the run id kept in tracking.json is reopened; metrics it already holds (a step logged before the
interruption, recomputed identically after it) are not logged twice.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .tracker import RunInfo, TrackingError, require

ENV_PARENT = "PEFTKIT_MLFLOW_PARENT_RUN_ID"
FLUSH_SECONDS = 5.0
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAMS_PER_BATCH = 100  # and of parameters
MAX_PARAM_CHARS = 6000  # MLflow's longest parameter value
MAX_ARTIFACT_BYTES = 2 * 2**30  # a whole fine-tuned model is left in the run directory, not copied again


def store(tracking_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the store's default)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    root = Path(tracking_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def experiment_id(client, name: str, artifacts: str | None) -> str:
    """The id of experiment `name`, created (with `artifacts` as its artifact location) if it does not exist."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another process created it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TrackingError(f"the MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore "
                            f"--experiment-id {found.experiment_id}) or pass another --experiment")
    return found.experiment_id


def _param(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 12] + "...(cut)"


class MlflowBackend:
    name = "mlflow"

    def __init__(self, info: RunInfo, saved: dict | None) -> None:
        require("mlflow", self.name)
        from mlflow import MlflowClient

        self.info = info
        self.uri, artifacts = store(info.tracking_dir or Path(info.run_dir).parent)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.buffer: list = []
        self.flushed_at = time.monotonic()
        self.logged: dict[str, int] = {}  # metric -> the last step the reopened run holds
        self.run_id = self._reopen(saved) if info.resumed and saved else None
        if self.run_id is None:
            parent = os.environ.get(ENV_PARENT)  # a sweep's trial joins the sweep's experiment
            self.run_id = self._create(self.client.get_run(parent).info.experiment_id if parent
                                       else experiment_id(self.client, info.experiment, artifacts))

    def _create(self, experiment: str) -> str:
        from mlflow.entities import Param

        tags = {"peftkit.run_dir": str(Path(self.info.run_dir).resolve())}
        if os.environ.get(ENV_PARENT):
            tags["mlflow.parentRunId"] = os.environ[ENV_PARENT]
        run_id = self.client.create_run(experiment, run_name=self.info.name, tags=tags).info.run_id
        params = [Param(k, _param(v)) for k, v in self.info.params.items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH])
        return run_id

    def _reopen(self, saved: dict) -> str | None:
        """The run id of tracking.json when this store still has that run; None (said) otherwise."""
        from mlflow.exceptions import MlflowException

        run_id = saved.get("run_id")
        if not isinstance(run_id, str) or saved.get("tracking_uri") != self.uri:
            print(f"peftkit: the MLflow run in tracking.json is in another store ({saved.get('tracking_uri')}); "
                  f"logging the resumed run as a new MLflow run in {self.uri}", file=sys.stderr)
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            print(f"peftkit: MLflow run {run_id} is no longer in {self.uri}; logging the resumed run as a new "
                  "MLflow run", file=sys.stderr)
            return None
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "peftkit.resumed_at_step", str(self.info.resume_step))
        return run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if time.monotonic() - self.flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            batch, self.buffer = self.buffer[:BATCH], self.buffer[BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed_at = time.monotonic()

    def finish(self, step: int, summary: dict[str, Any], files: dict[str, Path]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.buffer += [Metric(f"summary/{k}", v, now, step) for k, v in summary.items() if isinstance(v, float)]
        self.flush()
        tags = [RunTag(f"summary.{k}", v) for k, v in summary.items() if isinstance(v, str)]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        for name, path in files.items():
            self._artifact(name, path)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _artifact(self, name: str, path: Path) -> None:
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if size > MAX_ARTIFACT_BYTES:
                print(f"peftkit: {path} ({size / 2**30:.1f} GiB) is not copied into MLflow's artifacts; it stays in "
                      f"the run directory (log it with: mlflow artifacts log-artifacts --local-dir {path} "
                      f"--run-id {self.run_id} --artifact-path {name})", file=sys.stderr)
                return
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.info.experiment}


def open_backend(info: RunInfo, saved: dict | None) -> MlflowBackend:
    """This run's MLflow run: the one in `saved` when resuming it, else a new one."""
    return MlflowBackend(info, saved)
