"""Ctrl-C and SIGTERM during `peftkit train` (train/stop.py): the step under way finishes, a checkpoint of it is
written, the tracking run ends KILLED, the command exits 128 + the signal's number saying how to continue, and the
resumed run equals an uninterrupted one bit for bit; a second signal stops at once; from the command line and
with two processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftkit import tracking
from peftkit.train import loop, recipe
from peftkit.train import options as opts
from peftkit.train.stop import Stopped, StopRequests


@pytest.fixture(autouse=True)
def python_signal_defaults():
    """Python's own handlers for the test, even when the suite runs as a shell's background job (where SIGINT
    starts ignored, and a stop honours an ignored signal); put back afterwards."""
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL}
    before = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def run_opts(model: str, data: str, out: Path, **kw) -> opts.TrainOptions:
    base = dict(model=model, data=data, output_dir=str(out), max_steps=6, batch_size=4, lr=5e-3, warmup_steps=1,
                r=4, lora_alpha=8, lora_dropout=0.1, save_every=4, keep_checkpoints=5, val_fraction=0.125,
                progress=False, max_length=64, threads=1)
    base.update(kw)
    return opts.build(base)


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(max((out / "checkpoints").glob("step-*")) / "params.safetensors")


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def signal_during_step(monkeypatch, at: int, *signums: int) -> None:
    """Make loop.train_step send `signums` to this process while it runs step `at` (0-based)."""
    real = loop.train_step

    def step(run, s):
        result = real(run, s)
        if s == at:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(loop, "train_step", step)


def test_a_first_signal_in_the_loop_is_recorded_and_a_second_of_its_kind_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequests(out=sys.stdout) as stop:
        assert stop.active and signal.getsignal(signal.SIGTERM) != previous
        with stop.graceful():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)  # another kind (a launcher passing Ctrl-C on): still graceful
            assert stop.signum == signal.SIGTERM
            with pytest.raises(Stopped) as caught:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs between bytecodes; never reached
        assert caught.value.exit_code == 143 and caught.value.checkpoint is None
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    with StopRequests(out=sys.stdout), pytest.raises(Stopped) as caught:  # outside the loop: at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert caught.value.exit_code == 130 and "SIGINT" in str(caught.value)


def test_sighup_is_taken_too_and_a_signal_after_the_loops_last_look_stops_on_leaving_it():
    with StopRequests(out=sys.stdout) as stop:
        with pytest.raises(Stopped) as caught, stop.graceful():
            os.kill(os.getpid(), signal.SIGHUP)
            assert stop.signum == signal.SIGHUP  # recorded, not acted on yet
        assert caught.value.exit_code == 129


def test_under_torchrun_the_launchers_copy_of_a_signal_is_not_a_second_one(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "peftkit-test")
    with StopRequests(out=sys.stdout) as stop, stop.graceful():
        os.kill(os.getpid(), signal.SIGTERM)  # from the scheduler, to every process
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher passing it on
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)  # a third: a real second request
            time.sleep(1)


def test_a_signal_the_process_ignores_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with StopRequests(out=sys.stdout) as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and stop.active
            with stop.graceful():
                os.kill(os.getpid(), signal.SIGHUP)
                assert stop.signum is None
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_off_the_main_thread_nothing_is_installed():
    seen = {}

    def worker():
        with StopRequests() as stop:
            seen["active"] = stop.active

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"active": False}


def test_sigterm_checkpoints_the_step_under_way_and_resume_equals_an_uninterrupted_run(
        tiny_model_dir, qa_jsonl, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    loop.train(run_opts(tiny_model_dir, qa_jsonl, straight))

    stopped_out = tmp_path / "stopped"
    signal_during_step(monkeypatch, 2, signal.SIGTERM)  # during the third step: not a --save-every step
    with StopRequests() as stop, pytest.raises(Stopped) as caught:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, stopped_out), stop)
    err = caught.value
    assert (err.signum, err.step, err.total, err.exit_code) == (signal.SIGTERM, 3, 6, 143)
    assert err.checkpoint == stopped_out / "checkpoints" / "step-00000003" and steps_of(stopped_out) == [3]
    assert "--resume latest" in err.describe() and str(stopped_out) in err.describe()
    assert "finishing this step" in capsys.readouterr().err
    assert not (stopped_out / "summary.json").exists()
    assert len(losses(stopped_out)) == 3

    monkeypatch.undo()
    torch.manual_seed(99)
    loop.train(run_opts(tiny_model_dir, qa_jsonl, stopped_out, resume="latest"))
    a, b = final_params(straight), final_params(stopped_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(stopped_out)


def test_a_stop_right_after_a_periodic_checkpoint_writes_no_second_one(tiny_model_dir, qa_jsonl, tmp_path,
                                                                         monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    signal_during_step(monkeypatch, 3, signal.SIGINT)  # step 4 is a --save-every 4 step
    saves = []
    real_save = recipe.save_checkpoint
    monkeypatch.setattr(recipe, "save_checkpoint", lambda run, step: (saves.append(step), real_save(run, step)))
    with StopRequests() as stop, pytest.raises(Stopped) as caught:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, out, report_to="mlflow", tracking_dir=str(tmp_path / "t")), stop)
    assert caught.value.step == 4 and caught.value.exit_code == 130 and steps_of(out) == [4]
    assert saves == [4]  # the periodic checkpoint only
    state = json.loads((out / tracking.STATE_FILE).read_text())["mlflow"]
    run = mlflow.MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "KILLED"  # not left RUNNING


def test_a_stop_after_resuming_from_an_older_checkpoint_names_the_one_it_wrote(tiny_model_dir, qa_jsonl, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "run"
    loop.train(run_opts(tiny_model_dir, qa_jsonl, out, save_every=2, max_steps=6))  # step-2, 4, 6 (keeps 5)
    signal_during_step(monkeypatch, 2, signal.SIGTERM)
    older = out / "checkpoints" / "step-00000002"
    with StopRequests() as stop, pytest.raises(Stopped) as caught:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, out, save_every=2, max_steps=6, resume=str(older)), stop)
    assert caught.value.step == 3 and caught.value.checkpoint == out / "checkpoints" / "step-00000003"


def test_a_stop_in_the_finish_stages_names_the_last_checkpoint(tiny_model_dir, qa_jsonl, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = recipe.validate

    def validate(run):
        if run.data.total_steps and steps_of(out)[-1:] == [6]:  # the final validation, after the last checkpoint
            os.kill(os.getpid(), signal.SIGINT)
        return real(run)

    monkeypatch.setattr(recipe, "validate", validate)
    with StopRequests() as stop, pytest.raises(Stopped) as caught:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, out), stop)
    assert caught.value.checkpoint == out / "checkpoints" / "step-00000006" and caught.value.step is None
    assert "newest checkpoint" in caught.value.describe() and "--resume latest" in caught.value.describe()


def test_without_stop_requests_train_keeps_pythons_behaviour(tiny_model_dir, qa_jsonl, tmp_path, monkeypatch):
    signal_during_step(monkeypatch, 1, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as caught:
        loop.train(run_opts(tiny_model_dir, qa_jsonl, tmp_path / "plain"))
    assert not isinstance(caught.value, Stopped)


def _cli(tiny_model_dir: str, qa_jsonl: str, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", tiny_model_dir, "--data", qa_jsonl,
           "--output-dir", str(out), "--max-steps", "400", "--batch-size", "4", "--r", "4", "--no-progress",
           "--save-every", "1000", "--threads", "1", "--val-fraction", "0.125", "--max-length", "64", *extra]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)


def _default_signals() -> None:
    """In the child: the signals' default actions, even when this test runs as a shell's background job (which
    ignores SIGINT, and a stop honours an ignored signal)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _after_steps(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(losses(out)) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {n} steps in {timeout} s: {proc.communicate()}")


def test_ctrl_c_from_the_command_line_exits_130_with_a_checkpoint_and_the_way_to_continue(
        tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "cli"
    proc = _cli(tiny_model_dir, qa_jsonl, out)
    _after_steps(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    done = steps_of(out)
    assert len(done) == 1 and 2 <= done[0] < 400 and len(losses(out)) == done[0]
    assert f"after step {done[0]} of 400" in stderr and "--resume latest" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_two_processes_stops_both_after_the_same_step(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "two"
    proc = _cli(tiny_model_dir, qa_jsonl, out, "--nproc", "2")
    _after_steps(proc, out, 2, timeout=240)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    done = steps_of(out)
    assert len(done) == 1 and len(losses(out)) == done[0], stderr[-3000:]
    assert stderr.count("--resume latest") == 1  # rank 0 says it
