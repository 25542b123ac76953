"""`peftkit sweep`: short seeded trials of each method and rank on the user's data, within a time budget.

Every trial is one `train()` run with the same data, seed, batch and step count, in its own process so
that its peak memory is its own (a process's peak resident set only grows). The first candidate is the
cheapest; it runs as a short probe that measures the step time and the fixed cost of a trial (start-up,
model load, evaluation), from which the steps per trial that fit the budget are chosen. After that a
trial starts only if its estimate fits in the time left, and a trial that overruns is stopped at the
deadline: the sweep keeps to its budget (within 2%, at most 10 s), and says which candidates it skipped.

Quality: with the built-in task, exact match on held-out tickets first (higher is better), eval loss on
the validation examples to break ties; otherwise eval loss alone (lower is better). Cost: step time and
peak memory. The recommendation is the best quality within --max-memory and --max-step-time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import registry
from ..train import options as opts
from . import sweep_report
from .sweep_report import rank_trials, recommend, suggest_rank

# methods with a rank get one candidate per rank; the others one candidate each
RANKED_METHODS = tuple(n for n in registry.train_names() if registry.by_train_name(n).ranked)
MIN_STEPS = 3  # "a few steps": fewer than this says little about a method
DEFAULT_MAX_STEPS = 40  # per trial, when --steps is not given and the budget allows more
SAFETY = 1.15  # estimates are padded by this factor before a trial is started
UNSEEN_FACTOR = 1.5  # a method not yet measured may be slower (qlora dequantizes its base every step)


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: a method, and its rank where the method has one."""

    method: str
    r: int | None = None

    @property
    def name(self) -> str:
        return f"{self.method}-r{self.r}" if self.r else self.method

    @property
    def label(self) -> str:
        return f"{self.method} r={self.r}" if self.r else self.method


@dataclass(frozen=True)
class SweepSettings:
    """What to sweep and the limits that decide it; everything about the trials' training is a TrainOptions."""

    methods: tuple[str, ...]
    ranks: tuple[int, ...]
    budget_s: float
    output_dir: Path
    steps: int | None = None  # per trial, at most
    max_memory_mb: float | None = None
    max_step_s: float | None = None
    suggest_rank: bool = False
    energy: float = 0.9


@dataclass
class Timing:
    """Measured cost of one trial of a method: seconds per step, and the fixed seconds around the steps."""

    step_s: float
    overhead_s: float


# --- parsing the command line's values ---------------------------------------------------------------------------
_SECONDS = {"s": 1, "m": 60, "h": 3600}
_MEGABYTES = {"kb": 2**-10, "k": 2**-10, "mb": 1, "m": 1, "mib": 1, "gb": 1024, "g": 1024, "gib": 1024,
              "tb": 2**20, "t": 2**20, "tib": 2**20}


def parse_duration(text: str) -> float:
    """Seconds in '15m', '90s', '1h', '1h30m', '2.5m' or a bare number of seconds."""
    import re

    s = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", s)
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        seconds = float(s)
    elif parts and "".join(n + u for n, u in parts) == s:
        seconds = sum(float(n) * _SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"--budget {text!r} is not a duration; write it like 15m, 90s, 1h or 1h30m")
    if seconds <= 0:
        raise ValueError(f"--budget {text!r} must be more than zero")
    return seconds


def parse_memory(text: str) -> float:
    """Mebibytes in '2GB', '1500MB', '1.5G', '800M' (binary units, as peak memory is reported in MiB)."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
    if not m or m.group(2) not in _MEGABYTES or float(m.group(1)) <= 0:
        raise ValueError(f"--max-memory {text!r} is not a memory size; write it like 2GB, 1500MB or 1.5G")
    return float(m.group(1)) * _MEGABYTES[m.group(2)]


def parse_methods(text: str) -> tuple[str, ...]:
    names = [s.strip().lower() for s in str(text).split(",") if s.strip()]
    unknown = [n for n in names if n not in opts.METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"known methods: {', '.join(opts.METHODS)}")
    return tuple(dict.fromkeys(names))


def parse_ranks(text: str) -> tuple[int, ...]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    bad = [s for s in items if not s.isdigit() or int(s) < 1]
    if bad or not items:
        raise ValueError(f"--ranks: {', '.join(bad) or '(none given)'} not a positive whole number; "
                         "write the ranks like 4,8,16")
    return tuple(sorted({int(s) for s in items}))


# --- which trials, in which order ----------------------------------------------------------------------------------
def candidates(methods: tuple[str, ...], ranks: tuple[int, ...]) -> list[Candidate]:
    return [Candidate(m, r) for m in methods for r in (ranks if m in RANKED_METHODS else (None,))]


def _spread(xs: list) -> list:
    """Middle first, then the ends, then the middles of the gaps: every prefix covers the range evenly."""
    if len(xs) <= 2:
        return list(xs)
    mid = len(xs) // 2
    order, gaps = [mid, 0, len(xs) - 1], [(0, mid), (mid, len(xs) - 1)]
    while gaps:
        wider = [(lo, hi) for lo, hi in gaps if hi - lo > 1]
        order += [(lo + hi) // 2 for lo, hi in wider]
        gaps = [g for lo, hi in wider for g in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi))]
    return [xs[i] for i in order]


def information_order(cands: list[Candidate], suggest_rank: bool = False) -> list[Candidate]:
    """The order that learns most early: the cheapest candidate first (it measures time per step), then
    round-robin over methods with each method's ranks spread out, so a cut-short sweep still covers the
    methods and the range of ranks. With suggest_rank the highest-rank LoRA trial comes second."""
    by_method: dict[str, list[Candidate]] = {}
    for c in cands:
        by_method.setdefault(c.method, []).append(c)
    queues = [_spread(sorted(cs, key=lambda c: c.r or 0)) for cs in by_method.values()]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    ranked = [c for c in order if c.method in RANKED_METHODS]
    first = min(ranked, key=lambda c: (c.method != "lora", c.r)) if ranked else order[0] if order else None
    front = [first] if first else []
    if suggest_rank and ranked:
        top = max(ranked, key=lambda c: (c.r, c.method == "lora"))
        front += [top] if top != first else []
    return front + [c for c in order if c not in front]


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


# --- one trial, in its own process ---------------------------------------------------------------------------------
Runner = Callable[[Candidate, opts.TrainOptions, float], dict]


def trial_options(base: opts.TrainOptions, c: Candidate, steps: int, out: Path) -> opts.TrainOptions:
    """The base options for candidate `c`: its own output directory, no intermediate checkpoints, a warm-up
    that suits a short run, --target-modules only where it means LoRA targets, and no scoring of the base
    model (the same for every trial)."""
    return base.replace(method=c.method, r=c.r or base.r, max_steps=steps, output_dir=str(out),
                        warmup_steps=min(base.warmup_steps, steps // 4), save_every=0, keep_checkpoints=1,
                        eval_every=0, progress=False, overwrite=True, resume=None, nproc=1, score_base=False,
                        target_modules=base.target_modules if c.method in RANKED_METHODS else "all-linear")


def run_trial(c: Candidate, o: opts.TrainOptions, timeout_s: float) -> dict:
    """Train `o` in a fresh Python process (output in <output_dir>/trial.log); the trial's record."""
    import peftkit

    out = Path(o.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_options.json").write_text(json.dumps(o.to_dict(), indent=2))
    src = str(Path(peftkit.__file__).resolve().parents[1])  # the child imports this same peftkit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    code = "import sys; from peftkit.plan.sweep import trial_main; sys.exit(trial_main(sys.argv[1]))"
    started = time.monotonic()
    with open(out / "trial.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-c", code, str(out)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, timeout=max(timeout_s, 1.0), check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "wall_s": time.monotonic() - started, "timed_out": True,
                    "error": "stopped at the end of the sweep's time budget (it ran longer than estimated)"}
    wall = time.monotonic() - started
    result_file = out / "trial_result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if result is None:
        how = (f"was killed by {signal.Signals(-proc.returncode).name} (SIGKILL is often the out-of-memory killer)"
               if proc.returncode < 0 else f"exited with status {proc.returncode}")
        tail = (out / "trial.log").read_text(errors="replace").strip().splitlines()[-3:]
        return {"status": "failed", "wall_s": wall, "error": f"the trial process {how}: {' | '.join(tail)}"}
    if result["status"] != "ok":
        return {"status": "failed", "wall_s": wall, "error": result["error"]}
    return measured_record(result, wall)


def trial_main(out_dir: str) -> int:
    """The child process: train from <out_dir>/trial_options.json, write <out_dir>/trial_result.json."""
    out = Path(out_dir)
    from ..train.distributed import init_distributed
    from ..train.loop import train
    from ..train.process import configure_process

    try:
        o = opts.TrainOptions(**json.loads((out / "trial_options.json").read_text()))
        configure_process(o, init_distributed(o.device))  # this process is the trial's: as `peftkit train` does
        summary = train(o)
        result = {"status": "ok", "summary": summary}
    except (Exception, MemoryError) as err:  # noqa: BLE001 (the parent records it; the traceback goes to trial.log)
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    (out / "trial_result.json").write_text(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def measured_record(result: dict, wall_s: float) -> dict:
    """The fields of a finished trial, from its summary and metrics.jsonl."""
    s = result["summary"]
    peak = s["peak_memory_mb"]  # VmHWM on Linux: this trial process's own peak
    metrics = Path(s["output_dir"]) / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    ends = [0.0] + [r["seconds"] for r in rows if "loss" in r and "seconds" in r]
    steps = s["steps"]
    per_step = [b - a for a, b in itertools.pairwise(ends)] or [s["train_seconds"] / max(steps, 1)]
    return {"status": "ok", "steps": steps, "eval_loss": s["val_loss"], "final_loss": s["final_loss"],
            "exact_match": s.get("exact_match_after"), "step_s": statistics.median(per_step),
            "mean_step_s": s["train_seconds"] / max(steps, 1), "peak_memory_mb": peak,
            "memory_kind": s.get("memory_kind"), "trainable_params": s["trainable_params"],
            "trainable_share": s["trainable_share"], "train_s": s["train_seconds"], "wall_s": wall_s,
            "adapter_dir": s.get("adapter_dir")}


# --- the sweep -----------------------------------------------------------------------------------------------------
def run_sweep(settings: SweepSettings, base: opts.TrainOptions, runner: Runner = run_trial,
              clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> dict:
    """Run the trials that fit the budget; the sweep's record (also written as sweep.json, with sweep.png)."""
    start = clock()
    deadline = start + settings.budget_s
    grace = min(10.0, 0.02 * settings.budget_s)  # a trial that overruns its estimate is stopped after this
    queue = information_order(candidates(settings.methods, settings.ranks), settings.suggest_rank)
    total = len(queue)
    target = settings.steps or DEFAULT_MAX_STEPS
    timings: dict[str, Timing] = {}
    trials: list[dict] = []
    probes: list[dict] = []
    skipped: list[dict] = []
    steps: int | None = None

    def trial(c: Candidate, n: int, probe: bool) -> dict:
        directory = settings.output_dir / "trials" / c.name
        left = deadline - clock()
        what = "probe (measures time per step)" if probe else f"trial {len(trials) + 1}/{total}"
        say(f"peftkit sweep: {what}: {c.label}, {n} steps; {left:.0f} s of the budget left ...")
        rec = {"name": c.name, "method": c.method, "r": c.r, "steps": n, "output_dir": str(directory),
               **runner(c, trial_options(base, c, n, directory), left + grace)}
        if rec["status"] == "ok":
            old = timings.get(c.method)
            timings[c.method] = Timing(max(rec["mean_step_s"], old.step_s if old else 0.0),
                                       max(rec["wall_s"] - rec["train_s"], old.overhead_s if old else 0.0))
        say("  " + sweep_report.trial_line(rec))
        return rec

    interrupted = False
    try:
        while steps is None and queue and deadline > clock():  # probe until a trial succeeds: it sets the steps
            c = queue[0]
            rec = trial(c, min(target, MIN_STEPS), probe=True)
            if rec["status"] != "ok":
                trials.append(rec)
                queue.pop(0)
                if rec.get("timed_out"):
                    break
                continue
            steps = steps_that_fit(queue, deadline - clock(), timings, target)
            if steps == rec["steps"]:  # the probe already is this candidate's trial
                trials.append(rec)
                queue.pop(0)
            else:  # keep it aside as probe-<name>; the candidate's trial runs again with more steps
                moved = Path(rec["output_dir"]).rename(Path(rec["output_dir"]).with_name(f"probe-{c.name}"))
                probes.append({**rec, "output_dir": str(moved), "adapter_dir": None})
            fit = sum(estimate_s(c, steps, timings) for c in queue) <= deadline - clock()
            say(f"peftkit sweep: {steps} steps per trial; " + (f"the {len(queue)} remaining trial(s) should fit "
                "the budget" if fit else "the budget will not hold every candidate: some will be skipped"))
        for c in list(queue) if steps is not None else []:
            need, left = estimate_s(c, steps, timings), deadline - clock()
            if need > left:
                skipped.append({"name": c.name, "method": c.method, "r": c.r, "status": "skipped",
                                "reason": f"budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left"})
                say(f"peftkit sweep: skipping {c.label}: needs ~{need:.0f} s, {max(left, 0):.0f} s of the budget left")
            else:
                trials.append(trial(c, steps, probe=False))
            queue.remove(c)
    except KeyboardInterrupt:
        interrupted = True
        say("peftkit sweep: interrupted; reporting the trials that finished")
    skipped += [{"name": c.name, "method": c.method, "r": c.r, "status": "skipped",
                 "reason": "interrupted" if interrupted else "budget: no time left"} for c in queue]

    ranked = rank_trials(trials)
    record = {
        "settings": {"methods": list(settings.methods), "ranks": list(settings.ranks), "budget_s": settings.budget_s,
                     "steps_requested": settings.steps, "max_memory_mb": settings.max_memory_mb,
                     "max_step_s": settings.max_step_s, "suggest_rank": settings.suggest_rank},
        "train_options": {k: v for k, v in base.to_dict().items() if k != "output_dir"},
        "quality": "exact match, then eval loss" if any(t.get("exact_match") is not None for t in ranked)
        else "eval loss",
        "steps_per_trial": steps, "elapsed_s": clock() - start, "output_dir": str(settings.output_dir),
        "trials": ranked, "skipped": skipped, "probes": probes,
        "recommendation": recommend(ranked, settings.max_memory_mb, settings.max_step_s),
        "rank_suggestion": suggest_rank(ranked, settings.ranks, settings.energy) if settings.suggest_rank else None,
    }
    record["recommendation"]["text"] = sweep_report.recommendation_text(record)
    return sweep_report.write_outputs(record, settings.output_dir)
