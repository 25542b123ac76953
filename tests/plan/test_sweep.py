"""`peftkit sweep`: parsing, ordering, the budget scheduler (with fake timings), the recommendation, the rank
from a spectrum, failed trials, and one real sweep of tiny trials end to end (each trial its own process)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import nonzero_adapter, tiny_llama

import peftkit
from peftkit.plan import sweep, sweep_report
from peftkit.plan.sweep import Candidate, SweepSettings
from peftkit.plan.sweep_cli import add_sweep_command
from peftkit.train import options as opts


def sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit")
    add_sweep_command(parser.add_subparsers(dest="command"))
    return parser


# --- parsing and validation ----------------------------------------------------------------------------------------
def test_budget_memory_methods_and_ranks_parse_and_bad_values_are_named():
    assert [sweep.parse_duration(s) for s in ("15m", "90s", "1h", "1h30m", "2.5m", "45")] == [900, 90, 3600, 5400,
                                                                                               150, 45]
    assert sweep.parse_memory("2GB") == 2048 and sweep.parse_memory("1500MB") == 1500
    assert sweep.parse_memory("1.5g") == 1536
    assert sweep.parse_methods("lora, QLoRA,bottleneck,lora") == ("lora", "qlora", "bottleneck")
    assert sweep.parse_ranks("16,4,8,4") == (4, 8, 16)
    for bad in ("15 minutes", "m15", "", "0s", "-5m"):
        with pytest.raises(ValueError, match="budget"):
            sweep.parse_duration(bad)
    for bad in ("2 parsecs", "lots", "0MB", "-1GB"):
        with pytest.raises(ValueError, match="max-memory"):
            sweep.parse_memory(bad)
    with pytest.raises(ValueError, match="lorax.*known methods: lora, qlora"):
        sweep.parse_methods("lora,lorax")
    for bad in ("0", "4,x", "4.5", "-8", ""):
        with pytest.raises(ValueError, match="ranks"):
            sweep.parse_ranks(bad)


def test_cli_flags_build_settings_and_trial_options(tmp_path):
    from peftkit.plan.sweep_cli import settings_from_args

    args = sweep_parser().parse_args(["sweep", "--methods", "lora,bottleneck", "--ranks", "8,2", "--budget", "2m",
                                      "--max-memory", "1GB", "--steps", "5", "--lr", "0.01", "--batch-size", "2",
                                      "--target-modules", "q_proj,v_proj", "--output-dir", str(tmp_path)])
    settings, base = settings_from_args(args)
    assert (settings.methods, settings.ranks, settings.budget_s, settings.max_memory_mb) == (
        ("lora", "bottleneck"), (2, 8), 120, 1024)
    assert (base.lr, base.batch_size, base.eval_examples) == (0.01, 2, 20)  # the sweep scores 20 tickets
    lora = sweep.trial_options(base, Candidate("lora", 8), 5, tmp_path / "t")
    assert (lora.r, lora.max_steps, lora.target_modules) == (8, 5, "q_proj,v_proj")
    assert lora.output_dir == str(tmp_path / "t") and not lora.score_base  # the base scores the same every time
    assert sweep.trial_options(base, Candidate("bottleneck"), 5, tmp_path).target_modules == "all-linear"
    for argv, message in ((["--steps", "0"], "steps"), (["--budget", "soon"], "budget"),
                          (["--methods", "lora,magic"], "magic"), (["--max-step-time", "-1"], "max-step-time"),
                          (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl")):
        with pytest.raises(ValueError, match=message):
            settings_from_args(sweep_parser().parse_args(["sweep", *argv]))


def test_information_order_starts_cheap_and_spreads_ranks_over_methods():
    cands = sweep.candidates(("qlora", "lora", "bottleneck"), (4, 8, 16, 32, 64))
    assert len(cands) == 11  # bottleneck has no rank: one candidate
    order = sweep.information_order(cands)
    assert sorted(order, key=str) == sorted(cands, key=str)
    assert order[0] == Candidate("lora", 4)  # cheapest first: it measures the time per step
    assert order[1:4] == [Candidate("qlora", 16), Candidate("lora", 16), Candidate("bottleneck")]
    assert [c.r for c in order if c.method == "qlora"] == [16, 4, 64, 8, 32]
    assert sweep.information_order(cands, suggest_rank=True)[1] == Candidate("lora", 64)


# --- the scheduler, with fake timings ------------------------------------------------------------------------------
class FakeLab:
    """A runner and clock: a trial 'takes' overhead + steps x step seconds; lower loss for higher rank."""

    def __init__(self, step_s: dict[str, float], overhead_s: float = 10.0, fail: tuple[str, ...] = ()):
        self.now, self.step_s, self.overhead_s, self.fail = 0.0, step_s, overhead_s, fail
        self.runs: list[tuple[str, int]] = []

    def clock(self) -> float:
        return self.now

    def run(self, c: Candidate, o: opts.TrainOptions, timeout_s: float, monitor=None) -> dict:
        cost = self.overhead_s + o.max_steps * self.step_s[c.method]
        self.runs.append((c.name, o.max_steps))
        Path(o.output_dir).mkdir(parents=True, exist_ok=True)
        if cost > timeout_s:
            self.now += timeout_s
            return {"status": "failed", "timed_out": True, "wall_s": timeout_s, "error": "stopped: over budget"}
        self.now += cost
        if c.name in self.fail:
            return {"status": "failed", "wall_s": cost, "error": "RuntimeError: out of memory"}
        return {"status": "ok", "steps": o.max_steps, "eval_loss": 1.0 + 1.0 / (c.r or 3), "exact_match": None,
                "step_s": self.step_s[c.method], "mean_step_s": self.step_s[c.method],
                "peak_memory_mb": 1000.0 + 10 * (c.r or 0) - (500 if c.method == "qlora" else 0),
                "trainable_params": 100 * (c.r or 5), "trainable_share": 0.01, "train_s": cost - self.overhead_s,
                "wall_s": cost, "adapter_dir": None}


def fake_sweep(tmp_path: Path, lab: FakeLab, budget_s: float, steps: int | None, **kw) -> dict:
    settings = SweepSettings(methods=kw.pop("methods", ("lora", "qlora", "bottleneck")),
                             ranks=kw.pop("ranks", (4, 16, 64)), budget_s=budget_s, output_dir=tmp_path / "sweep",
                             steps=steps, **kw)
    base = opts.build({"model": "tiny", "data": "d.jsonl"})
    return sweep.run_sweep(settings, base, runner=lab.run, clock=lab.clock, say=lambda line: None)


def test_a_small_budget_skips_candidates_says_so_and_keeps_to_the_budget(tmp_path):
    lab = FakeLab({"lora": 1.0, "qlora": 3.0, "bottleneck": 0.5})
    record = fake_sweep(tmp_path, lab, budget_s=80, steps=20)
    assert record["steps_per_trial"] == sweep.MIN_STEPS  # 20 steps would not fit; at least a few
    assert lab.now <= 80 and record["elapsed_s"] <= 80
    assert record["skipped"] and all(s["reason"].startswith("budget") for s in record["skipped"])
    assert len(record["trials"]) + len(record["skipped"]) == 7
    assert record["probes"] == []  # the probe ran MIN_STEPS steps: it is the first candidate's trial
    assert {t["steps"] for t in record["trials"]} == {sweep.MIN_STEPS}
    text = sweep_report.format_table(record)
    assert all(s["name"].split("-")[0] in text for s in record["skipped"]) and "skipped (budget" in text


def test_a_larger_budget_buys_more_steps_for_every_trial(tmp_path):
    lab = FakeLab({"lora": 1.0, "qlora": 2.0, "bottleneck": 0.5})
    record = fake_sweep(tmp_path, lab, budget_s=600, steps=None)
    steps = record["steps_per_trial"]
    assert sweep.MIN_STEPS < steps <= sweep.DEFAULT_MAX_STEPS
    assert record["skipped"] == [] and len(record["trials"]) == 7 and lab.now <= 600
    assert [p["name"] for p in record["probes"]] == ["lora-r4"]  # a short probe, then the real trial
    assert record["probes"][0]["output_dir"] == str(tmp_path / "sweep" / "trials" / "probe-lora-r4")
    assert sorted(p.name for p in (tmp_path / "sweep" / "trials").iterdir())[:2] == ["bottleneck", "lora-r16"]
    assert {t["steps"] for t in record["trials"]} == {steps}
    assert lab.runs[0] == ("lora-r4", sweep.MIN_STEPS) and ("lora-r4", steps) in lab.runs
    assert Path(record["files"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(record["files"]["json"]).read_text())["steps_per_trial"] == steps


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    lab = FakeLab({"lora": 1.0, "qlora": 1.0, "bottleneck": 1.0}, fail=("lora-r4", "qlora-r16"))
    record = fake_sweep(tmp_path, lab, budget_s=1000, steps=4)
    failed = {t["name"]: t for t in record["trials"] if t["status"] == "failed"}
    assert set(failed) == {"lora-r4", "qlora-r16"} and "out of memory" in failed["qlora-r16"]["error"]
    assert all(t["rank"] is None for t in failed.values())
    assert len([t for t in record["trials"] if t["status"] == "ok"]) == 5 and record["recommendation"]["name"]
    assert "failed: RuntimeError: out of memory" in sweep_report.format_table(record)


def test_a_trial_over_its_time_is_stopped_at_the_deadline(tmp_path):
    lab = FakeLab({"lora": 1.0, "qlora": 50.0, "bottleneck": 1.0})  # qlora far slower than any estimate
    record = fake_sweep(tmp_path, lab, budget_s=100, steps=3, methods=("lora", "qlora"), ranks=(4,))
    qlora = next(t for t in record["trials"] if t["method"] == "qlora")
    assert qlora["status"] == "failed" and qlora["timed_out"]
    assert lab.now <= 100 * 1.02


def test_json_flag_prints_the_record_and_progress_goes_to_stderr(tmp_path, monkeypatch, capsys):
    lab = FakeLab({"lora": 1.0, "qlora": 1.0, "bottleneck": 1.0})
    real = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", lambda settings, base, say: real(settings, base, lab.run, lab.clock, say))
    args = sweep_parser().parse_args(["sweep", "--data", str(tmp_path), "--methods", "lora", "--ranks", "4,8",
                                      "--steps", "3", "--json", "--output-dir", str(tmp_path / "s")])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    record = json.loads(printed.out)
    assert [t["name"] for t in record["trials"]] == ["lora-r8", "lora-r4"] and "lora r=4" in printed.err


# --- ranking and the recommendation --------------------------------------------------------------------------------
def trial(name: str, loss: float, mb: float, step_s: float = 1.0, em: float | None = None) -> dict:
    method, _, r = name.partition("-r")
    return {"name": name, "method": method, "r": int(r) if r else None, "status": "ok", "eval_loss": loss,
            "exact_match": em, "peak_memory_mb": mb, "step_s": step_s, "trainable_params": 10,
            "trainable_share": 0.01, "steps": 4}


def record_of(trials: list[dict], max_memory_mb=None, max_step_s=None) -> dict:
    ranked = sweep_report.rank_trials(trials)
    record = {"trials": ranked, "skipped": [], "steps_per_trial": 4, "train_options": {"model": "m"},
              "settings": {"max_memory_mb": max_memory_mb, "max_step_s": max_step_s},
              "recommendation": sweep_report.recommend(ranked, max_memory_mb, max_step_s)}
    record["recommendation"]["text"] = sweep_report.recommendation_text(record)
    return record


def test_the_recommendation_is_the_best_within_the_limits_and_names_a_cheaper_near_equal():
    trials = [trial("lora-r16", 0.41, 2000), trial("lora-r64", 0.39, 2300), trial("qlora-r16", 0.415, 900),
              trial("bottleneck", 0.6, 700), {"name": "qlora-r64", "method": "qlora", "r": 64, "status": "failed",
                                              "error": "boom"}]
    free = record_of(trials)
    assert [t["name"] for t in free["trials"]] == ["lora-r64", "lora-r16", "qlora-r16", "bottleneck", "qlora-r64"]
    assert free["recommendation"]["name"] == "lora-r64"
    limited = record_of(trials, max_memory_mb=2048, max_step_s=1.5)
    rec = limited["recommendation"]
    assert (rec["name"], rec["alternative"], rec["over_limits"]) == ("lora-r16", "qlora-r16", ["lora-r64"])
    assert rec["text"].startswith("Recommended: lora r=16: best eval loss 0.4100 within --max-memory 2.0 GB and "
                                  "--max-step-time 1.5 s")
    assert "qlora r=16 is within 2% of it at 45% of the memory" in rec["text"] and "lora r=64" in rec["text"]
    none = record_of(trials, max_memory_mb=500)
    assert none["recommendation"]["name"] is None and "700 MB (bottleneck)" in none["recommendation"]["text"]
    slow = record_of([trial("lora-r4", 0.5, 100, step_s=3.0)], max_step_s=2)
    assert slow["recommendation"]["name"] is None
    faster = record_of([trial("lora-r16", 0.30, 1460, step_s=4.7), trial("lora-r4", 0.301, 1470, step_s=3.8)])
    assert "lora r=4 is within 2% of it at 81% of the time per step." in faster["recommendation"]["text"]


def test_exact_match_ranks_first_and_eval_loss_breaks_ties():
    ranked = sweep_report.rank_trials([trial("lora-r4", 0.3, 1, em=0.5), trial("lora-r8", 0.5, 1, em=0.9),
                                       trial("lora-r16", 0.4, 1, em=0.9)])
    assert [t["name"] for t in ranked] == ["lora-r16", "lora-r8", "lora-r4"]
    record = record_of(ranked)
    assert "exact match" in sweep_report.format_table(record)
    assert "best exact match 90% (eval loss 0.4000)" in record["recommendation"]["text"]
    ties = record_of([trial("lora-r4", 0.3, 1, em=0.0), trial("lora-r8", 0.2, 1, em=0.0)])
    assert "lora r=8: best eval loss 0.2000 (exact match 0% for all)" in ties["recommendation"]["text"]


# --- the rank from the spectrum ------------------------------------------------------------------------------------
def test_energy_rank_of_a_synthetic_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    spectrum = torch.tensor([10.0, 6.0, 3.0] + [0.05] * 27, dtype=torch.float64)  # energy 100+36+9 of ~145.07
    delta = u[:, :30] @ torch.diag(spectrum) @ v.T
    s = torch.linalg.svdvals(delta)
    assert sweep_report.energy_rank(s, 0.9) == 2 and sweep_report.energy_rank(s, 0.99) == 3
    assert sweep_report.energy_rank(torch.zeros(5)) is None


def test_lora_spectra_equal_the_svd_of_the_scaled_update(tmp_path):
    model = nonzero_adapter(tiny_llama(), ["q_proj", "down_proj"], r=4, lora_alpha=12)
    peftkit.save_adapter(model, tmp_path / "a")
    spectra = sweep_report.lora_spectra(tmp_path / "a")
    assert len(spectra) == 4  # two layers x two targets
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            key = next(k for k in spectra if k.endswith(name))
            want = torch.linalg.svdvals(module.delta_weight("default").detach().double())[:4]  # alpha / r = 3
            torch.testing.assert_close(spectra[key], want)


# --- real trials, each in its own process --------------------------------------------------------------------------
@pytest.mark.slow
def test_a_trial_that_cannot_start_is_recorded_as_failed(tmp_path, qa_jsonl):
    o = opts.build({"model": str(tmp_path / "no-model"), "data": qa_jsonl, "max_steps": 1})
    rec = sweep.run_trial(Candidate("lora", 4), o.replace(output_dir=str(tmp_path / "t")), timeout_s=120)
    assert rec["status"] == "failed" and "no-model" in rec["error"]
    assert (tmp_path / "t" / "trial.log").read_text()


@pytest.mark.slow
def test_sweep_end_to_end_on_a_tiny_model(tiny_model_dir, qa_jsonl, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = sweep_parser().parse_args([
        "sweep", "--model", tiny_model_dir, "--data", qa_jsonl, "--methods", "lora,bottleneck", "--ranks", "2,8",
        "--steps", "2", "--batch-size", "2", "--max-length", "32", "--lr", "0.02", "--threads", "1",
        "--budget", "5m", "--max-memory", "8GB", "--suggest-rank", "--output-dir", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    record = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in record["trials"]] and not record["skipped"] and not record["probes"]
    assert sorted(t["name"] for t in record["trials"]) == ["bottleneck", "lora-r2", "lora-r8"]
    for t in record["trials"]:
        assert t["status"] == "ok", t
        assert t["eval_loss"] > 0 and t["step_s"] > 0 and 0 < t["trainable_share"] < 1 and t["trainable_params"] > 0
        assert 50 < t["peak_memory_mb"] < 8192 and t["steps"] == 2
        assert t["output_dir"] == str(out / "trials" / t["name"]) and (Path(t["output_dir"]) / "summary.json").is_file()
    losses = [t["eval_loss"] for t in record["trials"]]
    assert losses == sorted(losses) and [t["rank"] for t in record["trials"]] == [1, 2, 3]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert record["recommendation"]["name"] == record["trials"][0]["name"]
    assert record["rank_suggestion"]["from"] == "lora-r8" and 1 <= record["rank_suggestion"]["median_rank"] <= 8
    positions = [printed.out.index(sweep_report.label(t) + " ") for t in record["trials"]]
    assert positions == sorted(positions)  # the printed table follows the ranking
    assert "Recommended:" in printed.out and "Rank suggestion:" in printed.out
    assert f"Train it: peftkit train --method {record['recommendation']['method']}" in printed.out
    assert f"--data {qa_jsonl}" in printed.out
    assert printed.err.count("peftkit sweep: ") >= 3  # a line as each trial starts
    again = sweep_parser().parse_args(["sweep", "--output-dir", str(out), "--model", tiny_model_dir])
    with pytest.raises(ValueError, match="already holds a sweep"):
        again.func(again)
