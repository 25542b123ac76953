"""The `peftkit sweep` subcommand: its flags, and the handler that runs the sweep and prints what it found."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

SWEEP_EVAL_EXAMPLES = 20  # built-in task: tickets scored per trial (each trial scores them twice: base and adapter)
# the trial-defining flags' defaults (None in argparse, so that --resume can tell a flag given from one left out)
DEFAULTS = {"methods": "lora,qlora,bottleneck", "ranks": "4,16,64", "search": "grid", "trials": 10, "lr_range": None,
            "steps": None}
SEARCHES, PRUNERS = ("grid", "tpe"), ("median", "halving", "none")

# pass-through flag -> (TrainOptions field, type, help)
PASS_THROUGH = {
    "--model": ("model", str, "'smollm2' (embedded, the default), a transformers directory or a .gguf file"),
    "--data": ("data", str, ("training data (.jsonl/.json or a saved datasets directory); omit it for the "
                                  "built-in ticket task, where trials are also scored by exact match")),
    "--val-data": ("val_data", str, "validation data (default: a share of --data is held out)"),
    "--batch-size": ("batch_size", int, "examples per step (default 8 for the built-in task)"),
    "--max-length": ("max_length", int, "longest example in tokens"),
    "--lr": ("lr", float, "peak learning rate of every trial"),
    "--seed": ("seed", int, "seed of every trial (the same for all, so they see the same data)"),
    "--target-modules": ("target_modules", str, ("LoRA targets for the lora/qlora/dora trials (default "
                                                      "all-linear); bottleneck and prefix use their own defaults")),
    "--dtype": ("dtype", str, "compute dtype of the frozen base: auto (the default: bfloat16 where the device runs it "
                              "fast, else float32), float32, bfloat16 or float16"),
    "--device": ("device", str, "cpu, cuda or cuda:N (default: cuda if available)"),
    "--threads": ("threads", int, "torch CPU threads per trial"),
    "--eval-examples": ("eval_examples", int, (f"held-out examples scored by generation per trial "
                                                    f"(default {SWEEP_EVAL_EXAMPLES} here)")),
    "--report-to": ("report_to", str, ("log the sweep and each trial (nested under it in MLflow) to tensorboard, "
                                       "mlflow and/or wandb, comma-separated (docs/tracking.md)")),
    "--experiment": ("experiment", str, "--report-to: the MLflow experiment and the W&B project (default peftkit)"),
    "--tracking-dir": ("tracking_dir", str, "--report-to: a folder for the MLflow store and TensorBoard logs"),
}


def add_sweep_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `sweep` to the `peftkit` subcommands."""
    p = sub.add_parser(
        "sweep", help="try methods and ranks briefly on your data and recommend one",
        description="Short seeded trials of each method (and rank) on the same data, steps and batch, each in "
        "its own process, within a time budget. Measures eval loss (and exact match on the built-in task), "
        "seconds per step, peak memory and trainable parameters; prints a ranked table, writes sweep.json and a "
        "quality-versus-cost plot sweep.png, and recommends the best quality within --max-memory and "
        "--max-step-time. Ranking: exact match first where measured, then eval loss. Exit status 1 if no "
        "trial finished within the limits.")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default {DEFAULTS['methods']}); bottleneck and prefix are one "
                   "trial each, the others one per rank")
    p.add_argument("--ranks", default=None, help=f"comma-separated LoRA ranks (default {DEFAULTS['ranks']}); with "
                   "--search tpe also a range such as 4-64 (drawn on a log scale)")
    p.add_argument("--search", choices=SEARCHES, default=None, help="grid: every method x rank candidate (the "
                   "default); tpe: Optuna's TPE sampler (seeded by --seed) chooses --trials candidates of method, "
                   "rank and learning rate")
    p.add_argument("--trials", type=int, default=None, help=f"--search tpe: how many trials (default "
                   f"{DEFAULTS['trials']}), as the budget allows")
    p.add_argument("--lr-range", default=None, metavar="LOW,HIGH", help="--search tpe: learning rates to draw "
                   "from, log-uniform (default: --lr divided and multiplied by 10)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="stop a trial whose eval loss is behind "
                   "the others part-way: median (the default; from half-way on, after 2 trials have finished), "
                   "halving (successive halving at half-way) or none. Trials validate at each quarter for it")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --output-dir (its study.db): "
                   "finished trials are kept, interrupted ones run again; --budget is for the new work. Flags "
                   "that define the trials are taken from the study (giving different ones is an error)")
    p.add_argument("--budget", default="15m", help="wall-clock budget for the whole sweep: 15m, 90s, 1h "
                   "(default 15m); candidates that would not finish in it are skipped and reported")
    p.add_argument("--steps", type=int, default=None, help="steps per trial, at most (default: as many as the "
                   "budget allows for every candidate, up to 40; at least 3)")
    p.add_argument("--max-memory", default=None, help="only recommend trials whose peak memory is within this "
                   "(2GB, 1500MB; binary units; resident set on CPU, allocated memory on CUDA)")
    p.add_argument("--max-step-time", type=float, default=None, metavar="SECONDS",
                   help="only recommend trials at most this many seconds per step")
    p.add_argument("--suggest-rank", action="store_true", help="also suggest a rank from the singular values of "
                   "the highest-rank LoRA trial's update (the rank holding 90%% of its energy, median over modules)")
    p.add_argument("--output-dir", default=None, help="where sweep.json, sweep.png, trials/ and the Optuna "
                   "study study.db go (default runs/sweep-<time>); `optuna-dashboard sqlite:///DIR/study.db` shows it")
    p.add_argument("--overwrite", action="store_true", help="replace a previous sweep in --output-dir")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table "
                   "(progress still goes to standard error)")
    for flag, (_, kind, help_text) in PASS_THROUGH.items():
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.set_defaults(func=cmd_sweep)
    return p


def _prepare_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    from .sweep_study import lock_folder

    held = [n for n in ("sweep.json", "sweep.png", "trials", "study.db") if (path / n).exists()]
    if resume or not held:
        return
    if not overwrite:
        raise ValueError(f"--output-dir {path} already holds a sweep ({', '.join(held)}); pass --resume to "
                         "continue it, --overwrite to replace it, or choose another --output-dir")
    lock_folder(path).close()  # refuses while another sweep runs there
    for n in held:
        shutil.rmtree(path / n) if (path / n).is_dir() else (path / n).unlink()


def settings_from_args(args: argparse.Namespace):
    """(SweepSettings, base TrainOptions) from the parsed flags, every value checked; with --resume, the flags
    not given come from the sweep's study."""
    from ..train import options as opts
    from .sweep import SweepSettings, parse_duration, parse_memory, parse_methods, parse_ranks
    from .sweep_space import MAX_TRIALS, parse_lr_range, parse_rank_range
    from .sweep_study import stored_sweep

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if args.max_step_time is not None and args.max_step_time <= 0:
        raise ValueError(f"--max-step-time must be positive seconds (got {args.max_step_time})")
    if args.data and not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or directory")
    if args.resume and (args.overwrite or not args.output_dir):
        raise ValueError("--resume continues the sweep in --output-dir: give --output-dir, and not --overwrite")
    out = Path(args.output_dir or Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    stored = stored_sweep(out) if args.resume else None
    given = {k: getattr(args, k) for k in ("methods", "ranks", "search", "trials", "lr_range", "steps")}
    flags = {**DEFAULTS, **(_flags_of(stored) if stored else {}), **{k: v for k, v in given.items() if v is not None}}
    rank_range = parse_rank_range(flags["ranks"])
    tpe = flags["search"] == "tpe"
    if not tpe and (rank_range or given["trials"] is not None or given["lr_range"] is not None):
        raise ValueError("--trials, --lr-range and a range of --ranks are for --search tpe; the grid runs every "
                         "listed rank (write them like 4,16,64)")
    if tpe and not 1 <= flags["trials"] <= MAX_TRIALS:
        raise ValueError(f"--trials must be from 1 to {MAX_TRIALS} (got {flags['trials']})")
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in PASS_THROUGH.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if stored:
        base = opts.TrainOptions(**stored["train_options"])
        differ = [f"{k}: the sweep has {getattr(base, k)!r}, not {v!r}" for k, v in overrides.items()
                  if getattr(base, k) != v]
        if differ:
            raise ValueError(f"--resume: {'; '.join(differ)}; leave these flags out to resume the sweep as it was")
    else:
        overrides.setdefault("eval_examples", SWEEP_EVAL_EXAMPLES)
        base = opts.build(overrides)
    settings = SweepSettings(
        methods=parse_methods(flags["methods"]), ranks=rank_range or parse_ranks(flags["ranks"]),
        budget_s=parse_duration(args.budget), output_dir=out, steps=flags["steps"],
        max_memory_mb=parse_memory(args.max_memory) if args.max_memory else None, max_step_s=args.max_step_time,
        suggest_rank=args.suggest_rank, search=flags["search"], trials=flags["trials"] if tpe else None,
        rank_range=rank_range, lr_range=parse_lr_range(flags["lr_range"]) if flags["lr_range"] else None,
        pruner=args.pruner, resume=args.resume)
    return settings, base


def _flags_of(stored: dict) -> dict:
    """The trial-defining flags a sweep was started with, from its study's record of them."""
    ranks = "-".join(map(str, stored["rank_range"])) if stored["rank_range"] else ",".join(map(str, stored["ranks"]))
    return {"methods": ",".join(stored["methods"]), "ranks": ranks, "search": stored["search"],
            "trials": stored["trials"] or DEFAULTS["trials"], "steps": stored["steps_requested"],
            "lr_range": ",".join(map(repr, stored["lr_range"])) if stored["lr_range"] else None}


def cmd_sweep(args: argparse.Namespace) -> int:
    import optuna

    from . import sweep_report as report
    from .sweep import run_sweep

    settings, base = settings_from_args(args)
    _prepare_output_dir(settings.output_dir, args.overwrite, args.resume)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what each trial did
    ranks = "-".join(map(str, settings.rank_range)) if settings.rank_range else ",".join(map(str, settings.ranks))
    search = f"TPE, {settings.trials} trials" if settings.search == "tpe" else "grid"
    print(f"peftkit sweep: {'resuming; ' if settings.resume else ''}{len(settings.methods)} method(s), ranks "
          f"{ranks}, {search}, pruner {settings.pruner}, budget {settings.budget_s:.0f} s; writing to "
          f"{settings.output_dir}", file=sys.stderr, flush=True)
    record = run_sweep(settings, base, say=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        pruned = sum(t["status"] == "pruned" for t in record["trials"])
        print(f"\nquality: {record['quality']}; {record['steps_per_trial'] or 'no'} steps per trial; "
              f"{record['elapsed_s']:.0f} s of the {settings.budget_s:.0f} s budget"
              + (f"; {pruned} trial(s) pruned" if pruned else ""))
        print(report.format_table(record))
        print()
        print(record["recommendation"]["text"])
        if record["rank_suggestion"] is not None:
            print(report.rank_suggestion_text(record["rank_suggestion"]))
        if (command := report.next_command(record)) is not None:
            print(f"Train it: {command}")
        print(f"files: {record['files']['json']}, {record['files']['plot']}, {record['files']['trials']}/")
        print(f"Optuna study: optuna-dashboard {record['study']}")
    return 0 if record["recommendation"]["name"] is not None else 1
