"""`peftkit sweep`: short seeded trials of each method and rank on the user's data, within a time budget,
run through an Optuna study kept in <output-dir>/study.db (sweep_study.py).

Every trial is one `train()` run with the same data, seed, batch and step count, in its own process so
that its peak memory is its own (a process's peak resident set only grows; sweep_trial.py). The first
candidate is the cheapest; it runs as a short probe that measures the step time and the fixed cost of a
trial (start-up, model load, evaluation), from which the steps per trial that fit the budget are chosen.
After that a trial starts only if its estimate fits in the time left, and a trial that overruns is stopped
at the deadline: the sweep keeps to its budget (within 2%, at most 10 s), and says which candidates it
skipped. The grid runs every candidate in the information order (sweep_space.py); --search tpe lets a seeded
TPE sampler choose --trials candidates (method, rank, learning rate) one after another.

Pruning: a trial validates at each quarter of its steps; the parent reports each validation loss to the
study, and the pruner (median or successive halving) stops a trial that is behind. A pruned trial is
listed, never ranked or recommended. --resume continues the study: kept trials are not run again, the
budget is for the new work, and the steps per trial stay those the sweep chose first.

Quality: with the built-in task, exact match on held-out tickets first (higher is better), eval loss on
the validation examples to break ties; otherwise eval loss alone (lower is better). Cost: step time and
peak memory. The recommendation is the best quality within --max-memory and --max-step-time.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import tracking
from ..train import options as opts
from . import sweep_report
from .sweep_report import rank_trials, recommend, suggest_rank
from .sweep_space import (RANKED_METHODS, Candidate, SweepSettings, candidates,  # noqa: F401 (the sweep's API)
                          information_order, parse_duration, parse_memory, parse_methods, parse_ranks)
from .sweep_study import SweepStudy, checks_every, lr_range, storage_url
from .sweep_trial import Monitor, measured_record, run_trial, trial_main  # noqa: F401 (the sweep's API)

MIN_STEPS = 3  # "a few steps": fewer than this says little about a method
DEFAULT_MAX_STEPS = 40  # per trial, when --steps is not given and the budget allows more
SAFETY = 1.15  # estimates are padded by this factor before a trial is started
UNSEEN_FACTOR = 1.5  # a method not yet measured may be slower (qlora dequantizes its base every step)


@dataclass
class Timing:
    """Measured cost of one trial of a method: seconds per step, and the fixed seconds around the steps."""

    step_s: float
    overhead_s: float


def estimate_s(c: Candidate, steps: int, timings: dict[str, Timing]) -> float:
    """Padded seconds a trial should take: its method's measured cost, or the costliest seen, made larger."""
    t = timings.get(c.method)
    if t is None:
        t = Timing(UNSEEN_FACTOR * max(t.step_s for t in timings.values()),
                   UNSEEN_FACTOR * max(t.overhead_s for t in timings.values()))
    return SAFETY * (t.overhead_s + steps * t.step_s)


def steps_that_fit(queue: list[Candidate], remaining_s: float, timings: dict[str, Timing], target: int) -> int:
    """Steps per trial such that every queued candidate fits in the time left, capped by `target` and at
    least MIN_STEPS (or `target` if smaller): with less time than that, some candidates are skipped."""
    fixed = sum(estimate_s(c, 0, timings) for c in queue)
    per_step = sum(estimate_s(c, 1, timings) for c in queue) - fixed
    fits = math.floor((remaining_s - fixed) / per_step) if per_step > 0 else target
    return max(min(target, fits), min(MIN_STEPS, target))


def add_timing(timings: dict[str, Timing], rec: dict) -> None:
    """Fold a finished trial's cost into its method's timing (the larger of what was seen)."""
    if rec["status"] != "ok":
        return
    old = timings.get(rec["method"])
    timings[rec["method"]] = Timing(max(rec["mean_step_s"], old.step_s if old else 0.0),
                                    max(rec["wall_s"] - rec["train_s"], old.overhead_s if old else 0.0))


# --- one trial -----------------------------------------------------------------------------------------------------
Runner = Callable[[Candidate, opts.TrainOptions, float, Monitor | None], dict]


def trial_options(base: opts.TrainOptions, c: Candidate, steps: int, out: Path, eval_every: int = 0
                  ) -> opts.TrainOptions:
    """The base options for candidate `c`: its own output directory (and learning rate, under TPE), no
    intermediate checkpoints, a warm-up that suits a short run, validation every `eval_every` steps for the
    pruner, --target-modules only where it means LoRA targets, and no scoring of the base model (the same for
    every trial)."""
    own_lr = {"lr": c.lr} if c.lr is not None else {}  # else the base's --lr, or the method's default if not given
    return base.replace(method=c.method, r=c.r or base.r, **own_lr, max_steps=steps, output_dir=str(out),
                        warmup_steps=min(base.warmup_steps, steps // 4), save_every=0, keep_checkpoints=1,
                        eval_every=eval_every, progress=False, overwrite=True, resume=None, nproc=1, score_base=False,
                        target_modules=base.target_modules if c.method in RANKED_METHODS else "all-linear")


def _skip(c: Candidate, reason: str) -> dict:
    return {"name": c.name, "method": c.method, "r": c.r, "lr": c.lr, "status": "skipped", "reason": reason}


# --- the sweep -----------------------------------------------------------------------------------------------------
class Scheduler:
    """One run of a sweep: the probe, then the trials that fit the budget, each ended in the study."""

    def __init__(self, settings: SweepSettings, base: opts.TrainOptions, study: SweepStudy, runner: Runner,
                 clock: Callable[[], float], say: Callable[[str], None]) -> None:
        self.settings, self.base, self.study, self.runner, self.clock, self.say = (settings, base, study, runner,
                                                                                  clock, say)
        self.start = clock()
        self.deadline = self.start + settings.budget_s
        self.grace = min(10.0, 0.02 * settings.budget_s)  # a trial that overruns its estimate is stopped after this
        self.target = settings.steps or DEFAULT_MAX_STEPS
        self.kept = study.kept()
        self.trials: list[dict] = []
        self.skipped: list[dict] = []
        self.timings: dict[str, Timing] = {}
        for rec in self.kept:
            add_timing(self.timings, rec)
        self.interrupted = False

    def queue(self) -> list[Candidate]:
        """Grid: the candidates still to run, in information order. TPE: a stand-in for the trials still to run
        (methods in turn at the highest rank), which is what the budget plans for."""
        s, done = self.settings, {t["name"] for t in self.kept + self.trials}
        if s.search == "grid":
            return [c for c in information_order(candidates(s.methods, s.ranks), s.suggest_rank) if c.name not in done]
        top = s.rank_range[1] if s.rank_range else max(s.ranks)
        left = max((s.trials or 0) - len(self.kept) - len(self.trials), 0)
        return [Candidate(m, top if m in RANKED_METHODS else None) for m in (list(s.methods) * left)[:left]]

    def run(self) -> None:
        if self.kept:
            self.say(f"peftkit sweep: resuming {self.settings.output_dir}: {len(self.kept)} trial(s) kept "
                     f"({', '.join(t['name'] for t in self.kept)}); the budget is for the rest")
        try:
            if self.study.steps is None:
                self.probe()
            if self.study.steps is not None:
                self.grid() if self.settings.search == "grid" else self.tpe()
        except KeyboardInterrupt:
            self.interrupted = True
            self.say("peftkit sweep: interrupted; reporting the trials that finished (--resume continues it)")
        if self.settings.search == "grid":  # TPE's trials to come are not candidates yet: nothing to list
            why = "interrupted" if self.interrupted else "budget: no time left"
            self.skipped += [_skip(c, why) for c in self.queue() if c.name not in {s["name"] for s in self.skipped}]

    def probe(self) -> None:
        """Short runs of the cheapest candidate until one succeeds: its step time sets the steps per trial."""
        while self.study.steps is None and self.queue() and self.deadline > self.clock():
            c = self.probe_candidate()
            rec = self.execute(c, min(self.target, MIN_STEPS), None, probe=True)
            if rec["status"] != "ok":
                self.study.add_finished(c, rec)
                self.trials.append(rec)
                if rec.get("timed_out"):
                    break
                continue
            steps = steps_that_fit(self.queue(), self.deadline - self.clock(), self.timings, self.target)
            self.study.set_steps(steps)
            if steps == rec["steps"]:  # the probe already is this candidate's trial
                self.study.add_finished(c, rec)
                self.trials.append(rec)
            else:  # keep it aside as probe-<name>; the candidate's trial runs again with more steps
                moved = Path(rec["output_dir"]).with_name(f"probe-{c.name}")
                shutil.rmtree(moved, ignore_errors=True)
                Path(rec["output_dir"]).rename(moved)
                self.study.add_probe({**rec, "output_dir": str(moved), "adapter_dir": None})
            fit = sum(estimate_s(q, steps, self.timings) for q in self.queue()) <= self.deadline - self.clock()
            self.say(f"peftkit sweep: {steps} steps per trial; " + (
                f"the {len(self.queue())} remaining trial(s) should fit the budget" if fit
                else "the budget will not hold every candidate: some will be skipped"))

    def probe_candidate(self) -> Candidate:
        """Grid: the next candidate in information order (the cheapest first). TPE: the cheapest method at the
        lowest rank and the default learning rate (within the searched range)."""
        s = self.settings
        if s.search == "grid":
            return self.queue()[0]
        c = information_order(candidates(s.methods, (s.rank_range[0],) if s.rank_range else s.ranks))[0]
        lo, hi = lr_range(s, self.base)
        return Candidate(c.method, c.r, lr=min(max(self.base.lr, lo), hi))

    def grid(self) -> None:
        for c in self.queue():
            need, left = estimate_s(c, self.study.steps, self.timings), self.deadline - self.clock()
            if need > left:
                self.skipped.append(_skip(c, f"budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left"))
                self.say(f"peftkit sweep: skipping {c.label}: needs ~{need:.0f} s, {max(left, 0):.0f} s of the "
                         "budget left")
                continue
            trial, c = self.study.start(c)
            self.trials.append(self.execute(c, self.study.steps, trial))

    def tpe(self) -> None:
        while self.queue():
            trial, c = self.study.start(None)
            need, left = estimate_s(c, self.study.steps, self.timings), self.deadline - self.clock()
            if need > left:
                skip = _skip(c, f"budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left")
                self.study.finish(trial, {**skip, "skipped": True})
                self.skipped.append(skip)
                self.say(f"peftkit sweep: stopping: the next trial, {c.label}, needs ~{need:.0f} s and "
                         f"{max(left, 0):.0f} s of the budget are left")
                return
            self.trials.append(self.execute(c, self.study.steps, trial))

    def execute(self, c: Candidate, n: int, trial, probe: bool = False) -> dict:
        """Run candidate `c` for `n` steps (reporting to `trial` when there is one); its record."""
        directory = self.settings.output_dir / "trials" / c.name
        left = self.deadline - self.clock()
        done = len(self.kept) + len(self.trials)
        what = "probe (measures time per step)" if probe else f"trial {done + 1}/{done + len(self.queue())}"
        self.say(f"peftkit sweep: {what}: {c.label}, {n} steps; {left:.0f} s of the budget left ...")
        every = checks_every(n, self.settings.pruner) if trial is not None else 0
        options = trial_options(self.base, c, n, directory, every)
        head = {"name": c.name, "method": c.method, "r": c.r, "lr": c.lr, "trained_lr": options.lr, "steps": n,
                "output_dir": str(directory)}  # lr: TPE's choice (None: the base's); trained_lr: what the trial used
        try:
            result = self.runner(c, options, left + self.grace, self.study.monitor(trial) if every else None)
        except KeyboardInterrupt:
            if trial is not None:
                self.study.finish(trial, {**head, "status": "failed", "interrupted": True, "error": "interrupted"})
            raise
        rec = {**head, **result}
        if trial is not None:
            self.study.finish(trial, rec)
        add_timing(self.timings, rec)
        self.say("  " + sweep_report.trial_line(rec))
        return rec

    def record(self) -> dict:
        """The sweep's record over every trial of the study, kept and new (also written as sweep.json)."""
        s, base = self.settings, self.base
        ranked = rank_trials(self.kept + self.trials)
        record = {
            "settings": {"methods": list(s.methods), "ranks": list(s.ranks), "budget_s": s.budget_s,
                         "steps_requested": s.steps, "max_memory_mb": s.max_memory_mb, "max_step_s": s.max_step_s,
                         "suggest_rank": s.suggest_rank, "search": s.search, "trials": s.trials,
                         "rank_range": s.rank_range, "lr_range": lr_range(s, base) if s.search == "tpe" else None,
                         "pruner": s.pruner},
            "train_options": {k: v for k, v in base.to_dict().items() if k != "output_dir"},
            "quality": "exact match, then eval loss" if any(t.get("exact_match") is not None for t in ranked)
            else "eval loss",
            "steps_per_trial": self.study.steps, "elapsed_s": self.clock() - self.start,
            "output_dir": str(s.output_dir), "study": storage_url(s.output_dir),
            "resumed_trials": [t["name"] for t in self.kept], "interrupted": self.interrupted,
            "trials": ranked, "skipped": self.skipped, "probes": self.study.probes,
            "recommendation": recommend(ranked, s.max_memory_mb, s.max_step_s),
            "rank_suggestion": suggest_rank(ranked, _swept_ranks(s, ranked), s.energy) if s.suggest_rank else None,
        }
        best = next((t for t in ranked if t["name"] == record["recommendation"]["name"]), None)
        record["recommendation"]["lr"] = best.get("lr") if best else None
        record["recommendation"]["text"] = sweep_report.recommendation_text(record)
        return record


def _swept_ranks(s: SweepSettings, ranked: list[dict]) -> tuple[int, ...]:
    """--ranks, or for a TPE range the ranks its trials tried."""
    return tuple(sorted({t["r"] for t in ranked if t.get("r")})) or s.ranks if s.rank_range else s.ranks


def run_sweep(settings: SweepSettings, base: opts.TrainOptions, runner: Runner = run_trial,
              clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> dict:
    """Run the trials that fit the budget; the sweep's record (also written as sweep.json, with sweep.png)."""
    study = SweepStudy.open(settings, base)
    params = {"methods": ",".join(settings.methods), "ranks": ",".join(map(str, settings.ranks)),
              "budget_s": settings.budget_s, "search": settings.search, "pruner": settings.pruner}
    try:
        # --report-to: a parent run for the sweep; each trial's process inherits the environment that nests its
        # own run under it (MLflow's parentRunId, a TensorBoard folder per trial, one W&B group)
        with tracking.sweep_parent(base.report_to, settings.output_dir, params, experiment=base.experiment,
                                   tracking_dir=base.tracking_dir) as parent, parent.environ():
            scheduler = Scheduler(settings, base, study, runner, clock, say)
            scheduler.run()
            record = sweep_report.write_outputs(scheduler.record(), settings.output_dir)
            best = next((t for t in record["trials"] if t["name"] == record["recommendation"]["name"]), {})
            parent.finish({"trials": len(record["trials"]), "best_eval_loss": best.get("eval_loss")},
                          {"sweep.json": Path(record["files"]["json"]), "sweep.png": Path(record["files"]["plot"])})
            return record
    finally:
        study.close()
