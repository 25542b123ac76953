"""The `peftkit sweep` subcommand: its flags, and the handler that runs the sweep and prints what it found."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

SWEEP_EVAL_EXAMPLES = 20  # built-in task: tickets scored per trial (each trial scores them twice: base and adapter)

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
    "--dtype": ("dtype", str, "compute dtype of the frozen base: float32, bfloat16 or float16"),
    "--device": ("device", str, "cpu, cuda or cuda:N (default: cuda if available)"),
    "--threads": ("threads", int, "torch CPU threads per trial"),
    "--eval-examples": ("eval_examples", int, (f"held-out examples scored by generation per trial "
                                                    f"(default {SWEEP_EVAL_EXAMPLES} here)")),
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
    p.add_argument("--methods", default="lora,qlora,bottleneck",
                   help="comma-separated methods (default lora,qlora,bottleneck); bottleneck and prefix are one "
                   "trial each, the others one per rank")
    p.add_argument("--ranks", default="4,16,64", help="comma-separated LoRA ranks (default 4,16,64)")
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
    p.add_argument("--output-dir", default=None, help="where sweep.json, sweep.png and trials/ go "
                   "(default runs/sweep-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous sweep in --output-dir")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table "
                   "(progress still goes to standard error)")
    for flag, (_, kind, help_text) in PASS_THROUGH.items():
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.set_defaults(func=cmd_sweep)
    return p


def _prepare_output_dir(path: Path, overwrite: bool) -> None:
    held = [n for n in ("sweep.json", "sweep.png", "trials") if (path / n).exists()]
    if held and not overwrite:
        raise ValueError(f"--output-dir {path} already holds a sweep ({', '.join(held)}); pass --overwrite to "
                         "replace it or choose another --output-dir")
    for n in held:
        shutil.rmtree(path / n) if (path / n).is_dir() else (path / n).unlink()


def settings_from_args(args: argparse.Namespace):
    """(SweepSettings, base TrainOptions) from the parsed flags, every value checked."""
    from ..train import options as opts
    from .sweep import SweepSettings, parse_duration, parse_memory, parse_methods, parse_ranks

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {args.steps})")
    if args.max_step_time is not None and args.max_step_time <= 0:
        raise ValueError(f"--max-step-time must be positive seconds (got {args.max_step_time})")
    if args.data and not Path(args.data).exists():
        raise ValueError(f"--data {args.data}: no such file or directory")
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in PASS_THROUGH.items()}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.setdefault("eval_examples", SWEEP_EVAL_EXAMPLES)
    base = opts.build(overrides)
    out = Path(args.output_dir or Path("runs") / f"sweep-{datetime.now():%Y%m%d-%H%M%S}")
    settings = SweepSettings(methods=parse_methods(args.methods), ranks=parse_ranks(args.ranks),
                             budget_s=parse_duration(args.budget), output_dir=out, steps=args.steps,
                             max_memory_mb=parse_memory(args.max_memory) if args.max_memory else None,
                             max_step_s=args.max_step_time, suggest_rank=args.suggest_rank)
    return settings, base


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep_report as report
    from .sweep import run_sweep

    settings, base = settings_from_args(args)
    _prepare_output_dir(settings.output_dir, args.overwrite)
    print(f"peftkit sweep: {len(settings.methods)} method(s), ranks {','.join(map(str, settings.ranks))}, "
          f"budget {settings.budget_s:.0f} s; writing to {settings.output_dir}", file=sys.stderr, flush=True)
    record = run_sweep(settings, base, say=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"\nquality: {record['quality']}; {record['steps_per_trial'] or 'no'} steps per trial; "
              f"{record['elapsed_s']:.0f} s of the {settings.budget_s:.0f} s budget")
        print(report.format_table(record))
        print()
        print(record["recommendation"]["text"])
        if record["rank_suggestion"] is not None:
            print(report.rank_suggestion_text(record["rank_suggestion"]))
        if (command := report.next_command(record)) is not None:
            print(f"Train it: {command}")
        print(f"files: {record['files']['json']}, {record['files']['plot']}, {record['files']['trials']}/")
    return 0 if record["recommendation"]["name"] is not None else 1
