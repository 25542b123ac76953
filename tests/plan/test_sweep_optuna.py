"""`peftkit sweep` on Optuna, through the real study in SQLite: the grid runs the same trials as before, TPE is
seeded and reproducible, the pruner stops a clearly-behind trial, --resume re-runs nothing that finished (and
does re-run an interrupted trial), optuna-dashboard serves the study, and one real sweep of tiny trials is
killed and resumed end to end."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna.trial import TrialState

from peftkit.plan import sweep, sweep_report
from peftkit.plan.sweep import Candidate, SweepSettings
from peftkit.plan.sweep_cli import add_sweep_command, settings_from_args
from peftkit.plan.sweep_study import STUDY_NAME, SweepStudy, checks_every, storage_url
from peftkit.plan.sweep_trial import pruned_record
from peftkit.train import options as opts

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Lab:
    """A runner and clock: a trial 'takes' overhead + steps x step seconds, validates every eval_every steps
    (a loss curve falling by 2.0 to its final loss, the same shape for every candidate) and reports each check
    to the pruner's monitor, as the real runner does from metrics.jsonl."""

    def __init__(self, final=None, step_s: float = 1.0, overhead_s: float = 10.0, interrupt_at: int | None = None):
        self.final = final or (lambda c: 1.0 + 1.0 / (c.r or 3))
        self.now, self.step_s, self.overhead_s, self.interrupt_at = 0.0, step_s, overhead_s, interrupt_at
        self.runs: list[tuple[str, int]] = []
        self.options: list[opts.TrainOptions] = []

    def clock(self) -> float:
        return self.now

    def run(self, c: Candidate, o: opts.TrainOptions, timeout_s: float, monitor=None) -> dict:
        self.runs.append((c.name, o.max_steps))
        self.options.append(o)
        Path(o.output_dir).mkdir(parents=True, exist_ok=True)
        if len(self.runs) == self.interrupt_at:
            self.now += self.overhead_s
            raise KeyboardInterrupt
        final, rows = self.final(c), []
        for step in range(o.eval_every, o.max_steps, o.eval_every) if monitor and o.eval_every else ():
            rows += [{"step": s, "loss": 1.0, "seconds": s * self.step_s, "memory_mb": 900.0}
                     for s in range(len(rows) + 1, step + 1)]
            rows[-1]["val_loss"] = final + 2.0 * (1 - step / o.max_steps)
            if monitor(step, rows[-1]["val_loss"]):
                self.now += self.overhead_s + step * self.step_s
                return {**pruned_record(rows, rows[-1]), "wall_s": self.overhead_s + step * self.step_s}
        cost = self.overhead_s + o.max_steps * self.step_s
        self.now += cost
        return {"status": "ok", "steps": o.max_steps, "eval_loss": final, "exact_match": None, "step_s": self.step_s,
                "mean_step_s": self.step_s, "peak_memory_mb": 1000.0 + (c.r or 0), "trainable_params": 100,
                "trainable_share": 0.01, "train_s": cost - self.overhead_s, "wall_s": cost, "adapter_dir": None}


def lab_sweep(out: Path, lab: Lab, budget_s: float = 1000, steps: int | None = 20, seed: int = 0, **kw) -> dict:
    settings = SweepSettings(methods=kw.pop("methods", ("lora", "bottleneck")), ranks=kw.pop("ranks", (4, 16, 64)),
                             budget_s=budget_s, output_dir=out, steps=steps, **kw)
    base = opts.build({"model": "tiny", "data": "d.jsonl", "seed": seed})
    return sweep.run_sweep(settings, base, runner=lab.run, clock=lab.clock, say=lambda line: None)


def study_of(out: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=storage_url(out))


def test_the_grid_runs_the_same_trials_as_before_in_information_order(tmp_path):
    lab = Lab()
    record = lab_sweep(tmp_path / "s", lab, methods=("lora", "qlora", "bottleneck"), pruner="none")
    order = [c.name for c in sweep.information_order(sweep.candidates(("lora", "qlora", "bottleneck"), (4, 16, 64)))]
    assert lab.runs[0] == ("lora-r4", sweep.MIN_STEPS) and [n for n, _ in lab.runs[1:]] == order  # probe, then grid
    assert {t["name"] for t in record["trials"]} == set(order) and not record["skipped"]
    assert all(o.eval_every == 0 for o in lab.options)  # no pruner: no validation part-way
    study = study_of(tmp_path / "s")
    assert isinstance(optuna.load_study(study_name=STUDY_NAME, storage=record["study"]), optuna.Study)
    assert [t.params["candidate"] for t in study.trials] == order
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    losses = {t["name"]: t["eval_loss"] for t in record["trials"]}
    assert {t.params["candidate"]: t.value for t in study.trials} == losses
    assert study.best_trial.params["candidate"] == record["recommendation"]["name"] == "lora-r64"
    assert study.user_attrs["steps_per_trial"] == 20 and study.user_attrs["sweep"]["search"] == "grid"
    assert study.trials[0].user_attrs["record"]["name"] == order[0]


def test_a_pruner_stops_a_clearly_behind_trial_which_is_never_recommended(tmp_path):
    behind = lambda c: 5.0 if c.method == "bottleneck" else 1.0 + 1.0 / c.r  # noqa: E731
    free, pruned = Lab(behind), Lab(behind)
    unpruned = lab_sweep(tmp_path / "none", free, pruner="none")
    record = lab_sweep(tmp_path / "median", pruned, pruner="median")
    assert [o.eval_every for o in pruned.options[1:]] == [5] * 4 == [checks_every(20, "median")] * 4
    bottleneck = next(t for t in record["trials"] if t["name"] == "bottleneck")
    assert bottleneck["status"] == "pruned" and bottleneck["rank"] is None and bottleneck["pruned_at"] == 10
    assert bottleneck["eval_loss"] == pytest.approx(6.0)  # its check at half-way, 5.0 + 2.0 x (1 - 10/20)
    assert [t["status"] for t in record["trials"] if t["method"] == "lora"] == ["ok"] * 3  # the first two always finish
    assert record["recommendation"]["name"] == unpruned["recommendation"]["name"] == "lora-r64"
    assert pruned.now < free.now - 9  # it stopped 10 steps early
    assert "pruned (at step 10, eval loss 6.0000 behind" in sweep_report.format_table(record)
    assert json.loads((tmp_path / "median" / "sweep.json").read_text())["trials"][-1]["status"] == "pruned"
    study = study_of(tmp_path / "median")
    states = {t.params["candidate"]: t.state for t in study.trials}
    assert states["bottleneck"] == TrialState.PRUNED and list(states.values()).count(TrialState.PRUNED) == 1
    assert study.trials[1].intermediate_values == {5: pytest.approx(1.0625 + 1.5), 10: pytest.approx(1.0625 + 1.0),
                                                   15: pytest.approx(1.0625 + 0.5)}


def test_successive_halving_stops_the_trial_behind_at_half_way(tmp_path):
    record = lab_sweep(tmp_path, Lab(lambda c: 5.0 if c.method == "bottleneck" else 1.0 + 1.0 / c.r), pruner="halving")
    assert [(t["name"], t["pruned_at"]) for t in record["trials"] if t["status"] == "pruned"] == [("bottleneck", 10)]
    assert record["recommendation"]["name"] == "lora-r64"


def test_tpe_is_seeded_and_reproducible(tmp_path):
    final = lambda c: 1.0 + 1.0 / (c.r or 3) + (math.log10(c.lr) + 3) ** 2  # noqa: E731 (best near lr 1e-3)

    def tpe(name: str, seed: int) -> list[tuple]:
        record = lab_sweep(tmp_path / name, Lab(final), steps=3, seed=seed, search="tpe", trials=6,
                           lr_range=(1e-4, 1e-2), pruner="none")
        assert len(record["trials"]) == 6 and all(t["status"] == "ok" for t in record["trials"])
        return [(t["method"], t["r"], t["lr"]) for t in sorted(record["trials"], key=lambda t: t["name"])]

    first, again, other = tpe("a", 0), tpe("b", 0), tpe("c", 1)
    assert first == again and first != other
    assert all(1e-4 <= lr <= 1e-2 for _, _, lr in first) and len({lr for _, _, lr in first}) >= 5
    assert {r for m, r, _ in first if m == "lora"} <= {4, 16, 64} and all(r is None for m, r, _ in first if m != "lora")
    study = study_of(tmp_path / "a")
    assert set(study.trials[-1].params) >= {"method", "lr"} and study.user_attrs["sweep"]["search"] == "tpe"
    rec = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert rec["recommendation"]["lr"] == rec["trials"][0]["lr"]
    command = sweep_report.next_command(rec)
    assert f"--lr {rec['trials'][0]['lr']}" in command


def test_resume_reruns_nothing_that_finished_and_reruns_interrupted_trials(tmp_path):
    out = tmp_path / "s"
    first = Lab(interrupt_at=3)  # the probe, lora-r4, then Ctrl-C during lora-r16
    record = lab_sweep(out, first, pruner="none")
    assert record["interrupted"] and [t["name"] for t in record["trials"]] == ["lora-r4"]
    assert {s["reason"] for s in record["skipped"]} == {"interrupted"}
    # a sweep killed outright leaves its trial RUNNING: make one for bottleneck, as such a sweep would have
    killed = study_of(out)
    killed.enqueue_trial({"candidate": "bottleneck"})
    killed.ask().suggest_categorical("candidate", ["lora-r4", "lora-r16", "lora-r64", "bottleneck"])

    again = Lab()
    again.now = 5000.0  # a later run: the budget counts from its start
    record = lab_sweep(out, again, budget_s=200, pruner="none", resume=True)
    assert [n for n, _ in again.runs] == ["lora-r16", "bottleneck", "lora-r64"]  # no probe, lora-r4 kept
    assert {n for _, n in again.runs} == {20}  # the steps per trial the sweep chose first
    assert record["resumed_trials"] == ["lora-r4"] and not record["interrupted"] and record["elapsed_s"] <= 200
    assert sorted(t["name"] for t in record["trials"]) == ["bottleneck", "lora-r16", "lora-r4", "lora-r64"]
    assert all(t["status"] == "ok" for t in record["trials"]) and not record["skipped"]
    states = [(t.params["candidate"], t.state) for t in study_of(out).trials]
    assert states.count(("lora-r4", TrialState.COMPLETE)) == 1
    assert ("lora-r16", TrialState.FAIL) in states and ("bottleneck", TrialState.FAIL) in states
    assert all(t.state != TrialState.RUNNING for t in study_of(out).trials)

    done = Lab()
    assert lab_sweep(out, done, pruner="none", resume=True)["recommendation"]["name"] == "lora-r64"
    assert done.runs == []  # nothing left to run
    settings = SweepSettings(methods=("lora", "bottleneck"), ranks=(4, 16, 64), budget_s=10, output_dir=out, steps=20,
                             pruner="halving", resume=True)
    resumed = SweepStudy.open(settings, opts.build({"model": "tiny", "data": "d.jsonl", "seed": 0}))
    try:  # the pruner asked for now, set up for the steps chosen then
        assert isinstance(resumed.study.pruner, optuna.pruners.SuccessiveHalvingPruner) and resumed.steps == 20
    finally:
        resumed.close()
    with pytest.raises(ValueError, match="other settings .*methods: was \\['lora', 'bottleneck'\\], now \\['lora'\\]"):
        lab_sweep(out, Lab(), methods=("lora",), resume=True)
    with pytest.raises(ValueError, match="holds no study.db"):
        lab_sweep(tmp_path / "empty", Lab(), resume=True)
    with pytest.raises(ValueError, match="already exists; pass --resume"):
        lab_sweep(out, Lab())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peftkit")
    add_sweep_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


def test_cli_flags_for_search_pruner_and_resume(tmp_path):
    settings, base = settings_from_args(parse("--search", "tpe", "--trials", "12", "--ranks", "4-64", "--lr-range",
                                              "1e-5,1e-3", "--pruner", "halving", "--output-dir", str(tmp_path)))
    assert (settings.search, settings.trials, settings.rank_range, settings.lr_range, settings.pruner) == (
        "tpe", 12, (4, 64), (1e-5, 1e-3), "halving")
    grid, _ = settings_from_args(parse("--output-dir", str(tmp_path)))
    assert (grid.search, grid.trials, grid.ranks, grid.pruner, grid.methods) == (
        "grid", None, (4, 16, 64), "median", ("lora", "qlora", "bottleneck"))
    for argv, message in ((["--trials", "5"], "for --search tpe"), (["--ranks", "4-64"], "for --search tpe"),
                          (["--search", "tpe", "--trials", "0"], "--trials must be from 1"),
                          (["--search", "tpe", "--lr-range", "1e-3"], "lr-range"),
                          (["--search", "tpe", "--lr-range", "1e-3,1e-5"], "low < high"),
                          (["--search", "tpe", "--ranks", "64-4"], "range needs"),
                          (["--resume"], "give --output-dir"),
                          (["--resume", "--overwrite", "--output-dir", str(tmp_path)], "not --overwrite"),
                          (["--resume", "--output-dir", str(tmp_path)], "holds no study.db")):
        with pytest.raises(ValueError, match=message):
            settings_from_args(parse(*argv))
    with pytest.raises(SystemExit):
        parse("--pruner", "hyperband")

    out = tmp_path / "s"
    lab_sweep(out, Lab(), methods=("lora",), ranks=(2, 8), steps=3)
    resumed, base = settings_from_args(parse("--resume", "--output-dir", str(out), "--budget", "1m"))
    assert (resumed.methods, resumed.ranks, resumed.steps, resumed.budget_s) == (("lora",), (2, 8), 3, 60)
    assert (base.model, base.data, base.seed) == ("tiny", "d.jsonl", 0)
    for argv, message in ((["--methods", "lora,bottleneck"], "methods: was"), (["--seed", "3"], "seed: the sweep "
                                                                                              "has 0, not 3")):
        with pytest.raises(ValueError, match=message):
            s, b = settings_from_args(parse("--resume", "--output-dir", str(out), *argv))
            sweep.run_sweep(s, b, runner=Lab().run, clock=Lab().clock, say=lambda line: None)


def test_optuna_dashboard_serves_the_sweeps_study(tmp_path):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")  # the `ui` extra
    out = tmp_path / "s"
    lab_sweep(out, Lab(lambda c: 5.0 if c.method == "bottleneck" else 1.0 + 1.0 / c.r))
    app = optuna_dashboard.wsgi(f"sqlite:///{out}/study.db")

    def get(path: str) -> dict:
        environ = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status = []
        body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
        assert status == ["200 OK"], (path, status, body[:200])
        return json.loads(body)

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == STUDY_NAME
    detail = get(f"/api/studies/{summary['study_id']}")
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete", "Pruned", "Complete"]
    assert detail["has_intermediate_values"] and detail["best_trials"][0]["params"][0]["param_external_value"] == \
        "lora-r64"


# --- real trials: a sweep killed mid-way and resumed -------------------------------------------------------------
def trials_so_far(out: Path) -> list:
    """The study's trials while another process may still be creating it (then none)."""
    try:
        return study_of(out).trials
    except Exception:  # noqa: BLE001 (no file, no tables yet, no study yet: all mean "not yet")
        return []


def trial_processes(out: Path) -> list[int]:
    """Live processes training a trial under `out` (their command line names its folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out / "trials") in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_sweep_of_real_trials_resumes(tiny_model_dir, qa_jsonl, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", tiny_model_dir, "--data", qa_jsonl, "--methods", "lora", "--ranks", "2,8",
            "--steps", "8", "--batch-size", "2", "--max-length", "32", "--lr", "0.02", "--threads", "1",
            "--budget", "10m", "--output-dir", str(out)]
    code = "import sys; from peftkit.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # kill it once one trial has finished
            if any(t.state == TrialState.COMPLETE for t in trials_so_far(out)):
                break
            time.sleep(0.5)
        while time.monotonic() < deadline and proc.poll() is None and not trial_processes(out):
            time.sleep(0.2)  # the next trial is starting: kill the sweep while it trains
        assert proc.poll() is None and trial_processes(out), proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(1.0)
    assert not trial_processes(out), "a trial process outlived its killed sweep"
    study = study_of(out)
    finished = [t.params["candidate"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert finished and study.user_attrs["steps_per_trial"] == 8
    assert study.trials[0].intermediate_values, "the parent reports each validation from metrics.jsonl"
    assert set(study.trials[0].intermediate_values) == {2, 4, 6}

    args = parse("--resume", "--output-dir", str(out), "--budget", "5m")
    assert args.func(args) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["resumed_trials"] == finished
    assert sorted(t["name"] for t in record["trials"]) == ["lora-r2", "lora-r8"]
    assert all(t["status"] in ("ok", "pruned") for t in record["trials"]) and record["recommendation"]["name"]
    trials = study_of(out).trials
    assert sum(t.params["candidate"] in finished for t in trials) == len(finished)  # not run again
    assert all(t.state != TrialState.RUNNING for t in trials)
