"""`--report-to tensorboard,mlflow,wandb`: a tiny Llama trained with each tool, every record read back through the
tool's own reader (TensorBoard's event accumulator, an MLflow client on the SQLite store, `wandb leet inspect` on
the offline run) and compared with the run's metrics.jsonl, run_options.json and summary.json; resume continues
the same tracking runs; a sweep's trials nest under its parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LazyImport
from peftkit import tracking
from peftkit.cli import main
from peftkit.train import loop
from peftkit.train import options as opts

mlflow = LazyImport("mlflow", optional=True)
event_accumulator = LazyImport("tensorboard.backend.event_processing.event_accumulator", optional=True)

TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_GROUP",
                "WANDB_DIR", "WANDB_PROJECT", "PEFTKIT_MLFLOW_PARENT_RUN_ID", "PEFTKIT_TENSORBOARD_DIR")


@pytest.fixture(autouse=True)
def clean_tracking_env(monkeypatch, tmp_path_factory):
    """No tracking setting of the machine leaks in, and W&B keeps its caches and settings out of the home folder."""
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path_factory.mktemp("wandb-home")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory) -> Path:
    """One --tracking-dir for the tests that do not check the default location (a new MLflow database runs its
    schema migrations, seconds each time)."""
    return tmp_path_factory.mktemp("tracking-store")


def run_opts(model: str, data: str, out: Path, **kw) -> opts.TrainOptions:
    base = dict(model=model, data=data, output_dir=str(out), max_steps=6, batch_size=4, lr=5e-3, warmup_steps=1, r=4,
                lora_alpha=8, save_every=3, val_fraction=0.125, progress=False, max_length=64, threads=1,
                eval_examples=4)
    base.update(kw)
    return opts.build(base)


def jsonl_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {metric: [(step, value), ...]}, the numbers only."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        for key, value in tracking.tracker.numeric(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def tensorboard_series(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0,
                                                                         event_accumulator.IMAGES: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of a run's offline .wandb files, as W&B's own inspector prints them."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir / 'wandb'}"
    records = []
    for f in files:
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)], capture_output=True,
                              text=True, timeout=120, check=True)
        records += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records


def wandb_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.get("type") == "history":
            item = r["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_"):
                    series.setdefault(key, []).append((item["_step"], value))
    return series


def assert_same_series(got: dict, expected: dict, rel: float = 0.0) -> None:
    assert set(expected) <= set(got), f"missing metrics: {sorted(set(expected) - set(got))}"
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=rel), key


@pytest.mark.slow
def test_every_row_params_summary_and_files_reach_tensorboard_mlflow_and_wandb(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "run"
    summary = loop.train(run_opts(tiny_model_dir, qa_jsonl, out, eval_every=3,
                                  report_to=["tensorboard", "mlflow", "wandb"]))
    expected = jsonl_series(out)
    assert len(expected["loss"]) == 6 and [s for s, _ in expected["val_loss"]] == [0, 3, 6]
    assert "exact_match" in expected  # the scorer's final figure, in the last row
    options = json.loads((out / "run_options.json").read_text())
    state = json.loads((out / tracking.STATE_FILE).read_text())

    # TensorBoard: <run dir>/tensorboard; scalars are float32, hence the tolerance
    scalars, acc = tensorboard_series(out / "tensorboard")
    assert_same_series(scalars, expected, rel=1e-6)
    assert scalars["summary/val_loss"] == [(6, pytest.approx(summary["val_loss"], rel=1e-6))]
    assert "loss_curve" in acc.Tags()["images"] and "options/text_summary" in acc.Tags()["tensors"]

    # MLflow: the default store beside the run directory
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("peftkit").experiment_id])
    assert run.info.run_id == state["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert run.data.params == {k: ",".join(v) if isinstance(v, list) else str(v) for k, v in options.items()}
    assert_same_series(mlflow_series(client, run.info.run_id, expected), expected)
    assert run.data.metrics["summary/val_loss"] == summary["val_loss"]
    assert run.data.metrics["summary/trainable_params"] == summary["trainable_params"]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "loss_curve.png", "summary.json", "metrics.jsonl", "run_options.json"} <= top
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    copy = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=client.tracking_uri,
                                               artifact_path="adapter/adapter_model.safetensors",
                                               dst_path=str(tmp_path / "dl"))
    assert Path(copy).read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "mlartifacts").is_dir()  # the file artifact store next to mlflow.db

    # W&B: offline (no key, no WANDB_MODE), inside the run directory
    assert state["wandb"]["mode"] == "offline"
    records = wandb_records(out)
    assert_same_series(wandb_series(records), expected, rel=1e-12)
    (run_record,) = [r["run"] for r in records if r.get("type") == "run"]
    config = run_record["config"]["update"]
    assert config["r"] == 4 and config["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert run_record["run_id"] == state["wandb"]["id"] and run_record["project"] == "peftkit"
    files = Path(state["wandb"]["dir"]) / "files"
    assert (files / "loss_curve.png").read_bytes() == (out / "loss_curve.png").read_bytes()
    assert json.loads((files / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert any(r.get("type") == "artifact" and r["artifact"]["name"] == "run-adapter" for r in records)
    summaries = [r["summary"]["update"] for r in records if r.get("type") == "summary"]
    assert any(s.get("trainable_params") == summary["trainable_params"] for s in summaries)
    assert [r["exit"].get("exit_code", 0) for r in records if r.get("type") == "exit"] == [0]


def test_resume_continues_the_same_tracking_runs_without_the_rows_after_the_checkpoint(
        tiny_model_dir, qa_jsonl, tmp_path, shared_store, monkeypatch):
    out = tmp_path / "resumed-run"
    o = run_opts(tiny_model_dir, qa_jsonl, out, report_to="tensorboard,mlflow", tracking_dir=str(shared_store))
    real_step = loop.train_step

    def die_at_step_5(run, step):
        if step == 4:  # steps 1-4 are logged, the last checkpoint is step 3: step 4 is logged twice in all
            raise RuntimeError("simulated crash in step 5")
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", die_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(o)
    monkeypatch.setattr(loop, "train_step", real_step)
    first = json.loads((out / tracking.STATE_FILE).read_text())
    client = mlflow.MlflowClient(tracking_uri=first["mlflow"]["tracking_uri"])
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "FAILED"
    assert [s for s, _ in mlflow_series(client, first["mlflow"]["run_id"], ["loss"])["loss"]] == [1, 2, 3, 4]

    loop.train(o.replace(resume="latest"))
    state = json.loads((out / tracking.STATE_FILE).read_text())
    assert state == first  # the same MLflow run and TensorBoard directory
    expected = jsonl_series(out)
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4, 5, 6]
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["peftkit.resumed_at_step"] == "3"
    timings = ("seconds", "tokens_per_s", "memory_mb")
    computed = {k: v for k, v in expected.items() if k not in timings}  # the same after a resume, bit for bit
    assert_same_series(mlflow_series(client, run.info.run_id, computed), computed)
    # step 4's timings are the first attempt's in MLflow (it keeps what it has), each step appears once
    assert [s for s, _ in mlflow_series(client, run.info.run_id, ["seconds"])["seconds"]] == [1, 2, 3, 4, 5, 6]
    scalars, _ = tensorboard_series(shared_store / "tensorboard" / "resumed-run")
    assert_same_series(scalars, expected, rel=1e-6)  # TensorBoard purged the first attempt's step 4


def test_sweep_trials_are_child_runs_of_the_sweep_and_tensorboard_subdirectories(
        tiny_model_dir, qa_jsonl, tmp_path, shared_store):
    sweep_dir = tmp_path / "sweep-a"
    with tracking.sweep_parent(["mlflow", "tensorboard"], sweep_dir, {"methods": "lora", "trials": 2},
                               experiment="sweeps", tracking_dir=shared_store) as parent:
        assert set(parent.env) == {"MLFLOW_TRACKING_URI", "PEFTKIT_MLFLOW_PARENT_RUN_ID", "PEFTKIT_TENSORBOARD_DIR"}
        with parent.environ():
            for n, r in enumerate((2, 4)):
                # the sweep's trials: another experiment name in the options does not split them from the parent
                loop.train(run_opts(tiny_model_dir, qa_jsonl, sweep_dir / "trials" / f"trial-r{r}", r=r, max_steps=2,
                                    save_every=0, eval_examples=0, report_to=["mlflow", "tensorboard"]))
                parent.log({"best_val_loss": 1.0 / (n + 1)}, step=n)
            # a pruned trial: its process is terminated (SIGTERM) before it can end its tracking run
            tracking.open_tracker(["mlflow"], tracking.RunInfo(sweep_dir / "trials" / "pruned", "pruned", {}))
    assert "PEFTKIT_MLFLOW_PARENT_RUN_ID" not in os.environ
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{shared_store.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweeps")
    parent_id = parent.env["PEFTKIT_MLFLOW_PARENT_RUN_ID"]
    sweep_run = client.get_run(parent_id)
    assert sweep_run.info.status == "FINISHED" and sweep_run.info.experiment_id == experiment.experiment_id
    assert sweep_run.data.params == {"methods": "lora", "trials": "2"}
    assert [m.value for m in client.get_metric_history(parent_id, "best_val_loss")] == [1.0, 0.5]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == ["pruned", "trial-r2", "trial-r4"]
    assert {c.info.run_name: c.info.status for c in children} == {"pruned": "KILLED", "trial-r2": "FINISHED",
                                                                 "trial-r4": "FINISHED"}
    children = [c for c in children if c.info.run_name != "pruned"]
    assert {c.data.params["r"] for c in children} == {"2", "4"}
    for child in children:
        trial = sweep_dir / "trials" / child.info.run_name
        assert_same_series(mlflow_series(client, child.info.run_id, ["loss"]), {"loss": jsonl_series(trial)["loss"]})
        scalars, _ = tensorboard_series(shared_store / "tensorboard" / child.info.run_name)
        assert_same_series(scalars, {"loss": jsonl_series(trial)["loss"]}, rel=1e-6)


def test_a_failed_sweep_ends_its_parent_run_failed(tmp_path, shared_store):
    with pytest.raises(KeyError):
        with tracking.sweep_parent("mlflow", tmp_path / "sweep-b", {}, tracking_dir=shared_store) as parent:
            raise KeyError("a trial runner's bug")
    client = mlflow.MlflowClient(tracking_uri=parent.env["MLFLOW_TRACKING_URI"])
    assert client.get_run(parent.env["PEFTKIT_MLFLOW_PARENT_RUN_ID"]).info.status == "FAILED"
    with tracking.sweep_parent("wandb", tmp_path / "sweep-c", {}) as parent:
        assert parent.env == {"WANDB_RUN_GROUP": "sweep-c"}


def test_report_to_names_are_parsed_from_flags_yaml_and_json(tmp_path):
    assert opts.build({"report_to": "MLflow, tensorboard,mlflow"}).report_to == ("mlflow", "tensorboard")
    assert opts.build({"report_to": ["wandb"]}).report_to == ("wandb",)
    assert opts.build({"report_to": "none"}).report_to == () == opts.build({}).report_to
    assert opts.TrainOptions(report_to=["tensorboard"]).report_to == ("tensorboard",)  # a sweep's trial_options.json
    config = tmp_path / "o.yaml"
    config.write_text("report-to: [tensorboard, wandb]\nexperiment: my-exp\n")
    o = opts.build({}, str(config))
    assert (o.report_to, o.experiment) == (("tensorboard", "wandb"), "my-exp")
    with pytest.raises(ValueError, match="experiment 'a/b' must be"):
        opts.build({"experiment": "a/b"})


def test_an_unknown_backend_exits_2_naming_the_valid_ones(capsys, tiny_model_dir, qa_jsonl):
    code = main(["train", "--model", tiny_model_dir, "--data", qa_jsonl, "--report-to", "tensorboard,comet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown backend(s) 'comet'" in err and "valid: tensorboard, mlflow, wandb" in err


def test_a_missing_library_exits_2_before_the_model_loads_naming_the_extra(capsys, monkeypatch, tmp_path, qa_jsonl):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    out = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "no-such-model"), "--data", qa_jsonl, "--output-dir", str(out),
                 "--report-to", "tensorboard,mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "mlflow (package 'mlflow'): not installed" in err and "pip install 'peftkit[track]'" in err
    assert not out.exists()
    with pytest.raises(tracking.TrackingError, match=r"pip install 'peftkit\[track\]'"):
        tracking.open_tracker(["mlflow"], tracking.RunInfo(tmp_path, "x", {}))


def test_a_tool_that_fails_mid_run_is_named_and_dropped_and_the_others_go_on(tmp_path, shared_store, capsys):
    info = tracking.RunInfo(tmp_path / "dropped", "dropped", {"r": 4}, tracking_dir=shared_store)
    tracker = tracking.open_tracker(["mlflow", "tensorboard"], info)
    mlflow_run = json.loads((tmp_path / "dropped" / tracking.STATE_FILE).read_text())["mlflow"]["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{shared_store.resolve() / 'mlflow.db'}")
    client.delete_run(mlflow_run)  # logging to a deleted run is refused by the store
    tracker.log({"step": 1, "loss": 2.0})
    tracker.flush()
    assert "--report-to mlflow failed in flush" in capsys.readouterr().err
    assert [b.name for b in tracker.backends] == ["tensorboard"]
    tracker.log({"step": 2, "loss": 1.5, "grad_norm": None})
    tracker.finish({"val_loss": 1.25, "method": "x"}, {"missing.png": tmp_path / "nope.png"})
    scalars, _ = tensorboard_series(shared_store / "tensorboard" / "dropped")
    assert scalars["loss"] == [(1, 2.0), (2, 1.5)] and scalars["summary/val_loss"] == [(2, 1.25)]
    assert "grad_norm" not in scalars  # not measured: left out, not logged as a number
