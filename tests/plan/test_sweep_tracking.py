"""`peftkit sweep --report-to mlflow,tensorboard`: the sweep is a parent run in MLflow with each real trial (its
own process) nested under it, and each trial has its own TensorBoard folder (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftkit.plan import sweep_cli


@pytest.mark.slow
def test_a_sweep_logs_its_trials_as_child_runs(tiny_model_dir, qa_jsonl, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import argparse

    parser = argparse.ArgumentParser()
    sweep_cli.add_sweep_command(parser.add_subparsers())
    out, store = tmp_path / "sweep", tmp_path / "store"
    args = parser.parse_args([
        "sweep", "--model", tiny_model_dir, "--data", qa_jsonl, "--methods", "lora", "--ranks", "2,4", "--steps", "2",
        "--batch-size", "2", "--max-length", "32", "--lr", "0.02", "--threads", "1", "--budget", "5m",
        "--pruner", "none", "--report-to", "mlflow,tensorboard", "--experiment", "sweeps",
        "--tracking-dir", str(store), "--output-dir", str(out)])
    assert args.func(args) == 0
    record = json.loads((out / "sweep.json").read_text())
    names = sorted(t["name"] for t in record["trials"])
    assert names == ["lora-r2", "lora-r4"] and all(t["status"] == "ok" for t in record["trials"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["methods"] == "lora" and parent.data.metrics["summary/trials"] == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.json", "sweep.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == names
    assert all(c.info.status == "FINISHED" and c.data.metrics["loss"] > 0 for c in children)
    for name in names:  # one TensorBoard folder per trial, with event files
        assert list((store / "tensorboard" / name).glob("events.out.tfevents.*")), name
    assert Path(record["files"]["json"]).is_file()
