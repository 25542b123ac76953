"""What `--report-to` costs a run: seconds added to the whole command, and the step time against no tracking.

Each configuration is a real `peftkit train` process on the built-in task (SmolLM2-135M-Instruct, LoRA r16,
batch --batch-size), --max-steps steps, no scoring; the configurations take turns, --repeats times. The MLflow store
(--tracking-dir, shared) is created by one untimed run first: a new SQLite store runs MLflow's schema
migrations once (seconds), which every later run skips. W&B runs offline (no key is set).

    command s     the whole process, start to exit (median)
    added s       command s minus the untracked run's
    step s        median of metrics.jsonl's per-step seconds after the first step
    step ratio    step s / the untracked run's step s (1.00 = the loop is not slowed)

Run:  python bench/tracking_overhead.py [--steps 6] [--repeats 2] [--batch-size 8] [--threads 1]
                                       [--configs none,tensorboard,mlflow,wandb,all]
Compare ratios, not times: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEFTKIT = str(Path(sys.executable).with_name("peftkit"))
REPORT_TO = {"none": "none", "tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb",
             "all": "tensorboard,mlflow,wandb"}


def run_once(report_to: str, out: Path, store: Path, steps: int, batch: int, threads: int) -> tuple[float, float]:
    """(the command's seconds, the median step seconds after the first) of one `peftkit train`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    env.update(WANDB_CACHE_DIR=str(store / "wandb-cache"), WANDB_CONFIG_DIR=str(store / "wandb-config"),
               WANDB_DATA_DIR=str(store / "wandb-data"))
    cmd = [PEFTKIT, "train", "--max-steps", str(steps), "--batch-size", str(batch), "--threads", str(threads),
           "--eval-examples", "0", "--no-score-base", "--no-progress", "--save-every", "0", "--output-dir", str(out),
           "--report-to", report_to, "--tracking-dir", str(store)]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    seconds = [r["seconds"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps_s = [b - a for a, b in zip(seconds, seconds[1:])]
    return wall, statistics.median(steps_s) if steps_s else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (smaller: a shorter step, so "
                        "any per-step cost of logging shows more)")
    parser.add_argument("--configs", default="none,tensorboard,mlflow,wandb,all")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every run (peftkit's "
                        "default follows the cores free at start, which differs from run to run on a busy machine)")
    args = parser.parse_args()
    configs = args.configs.split(",")
    if "none" not in configs:
        configs.insert(0, "none")
    with tempfile.TemporaryDirectory(prefix="peftkit-track-bench-") as tmp:
        root = Path(tmp)
        run_once("mlflow", root / "warm-up", root / "store", 2, 1, args.threads)  # creates the MLflow store once
        walls: dict[str, list[float]] = {c: [] for c in configs}
        steps: dict[str, list[float]] = {c: [] for c in configs}
        for i in range(args.repeats):
            for c in configs:
                wall, step = run_once(REPORT_TO[c], root / f"{c}-{i}", root / "store", args.steps, args.batch_size,
                                      args.threads)
                walls[c].append(wall)
                steps[c].append(step)
    base_wall, base_step = statistics.median(walls["none"]), statistics.median(steps["none"])
    print(f"peftkit train, built-in task, {args.steps} steps of {args.batch_size}, {args.threads} thread(s), "
          f"{args.repeats} runs each (medians)")
    print(f"{'report-to':<14}{'command s':>11}{'added s':>9}{'step s':>9}{'step ratio':>12}")
    for c in configs:
        wall, step = statistics.median(walls[c]), statistics.median(steps[c])
        print(f"{c:<14}{wall:>11.2f}{wall - base_wall:>+9.2f}{step:>9.3f}{step / base_step:>12.2f}")


if __name__ == "__main__":
    main()
