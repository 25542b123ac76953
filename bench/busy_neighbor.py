"""The main job's step time with one busy process beside it: torch's default threads (before) against
peftkit's choice from the free cores with passive OpenMP waits (after, the `peftkit train` default).

Each configuration is a real `peftkit train` process on the built-in task (SmolLM2-135M-Instruct, LoRA r16,
batch 8), --max-steps steps, no scoring; the step time is the median of metrics.jsonl's per-step seconds
after the first step. The neighbour is a Python process spinning on one core (`while True: pass`), started
before the run and killed after it; "idle" rows run without it.

    before        torch's default threads (every core) and OpenMP's default spin-then-sleep waits: the run
                  is started through `python -c` so that peftkit leaves OMP_WAIT_POLICY unset, and
                  --threads is the core count (what torch picks)
    after         the `peftkit` command as users run it: threads from the free cores, passive waits
    after-late    passive waits with every core's thread, the neighbour arriving after the start (the
                  thread count is chosen once, at start): what passive waits save when load comes later

Run:  python bench/busy_neighbor.py [--steps 4] [--configs before,after,after-late] [--idle]
Prints the CPU flags that matter and one table; compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from peftkit.precision import describe_machine

PEFTKIT = str(Path(sys.executable).with_name("peftkit"))
OLD_ENTRY = "import sys; from peftkit.cli import main; sys.exit(main(sys.argv[1:]))"


def spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(config: str, steps: int, busy: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"busy-{config}-"))
    args = ["train", "--max-steps", str(steps), "--no-score-base", "--eval-examples", "1", "--save-every", "0",
            "--no-progress", "--output-dir", str(out / "run"), "--overwrite"]
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if config == "before":
        cmd = [sys.executable, "-c", OLD_ENTRY, *args, "--threads", str(os.cpu_count())]
    elif config == "after":
        cmd = [PEFTKIT, *args]
    else:  # after-late
        cmd = [PEFTKIT, *args, "--threads", str(os.cpu_count())]
    neighbour = spinner() if busy and config != "after-late" else None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    header = ""
    for line in proc.stdout:
        if "CPU thread" in line:
            header = line.strip().removeprefix("peftkit train: ")
        if busy and neighbour is None and "trainable" in line:  # after-late: load arrives once training starts
            neighbour = spinner()
    proc.wait()
    if neighbour is not None:
        neighbour.kill()
        neighbour.wait()
    if proc.returncode:
        raise SystemExit(f"{config}: peftkit train exited {proc.returncode}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    per_step = [b - a for a, b in zip(seconds, seconds[1:])] or seconds
    return {"config": config, "busy": busy, "step_s": statistics.median(per_step),
            "threads": header or "torch default (every core), default waits"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    p.add_argument("--configs", default="before,after,after-late")
    p.add_argument("--idle", action="store_true", help="also run each configuration without the neighbour")
    a = p.parse_args()
    print(f"machine: {describe_machine()}", flush=True)
    results = []
    for busy in ([True, False] if a.idle else [True]):
        for config in a.configs.split(","):
            results.append(run(config, a.steps, busy))
            r = results[-1]
            print(f"  {config:<11} {'busy' if busy else 'idle'}: {r['step_s']:.2f} s/step  ({r['threads']})",
                  flush=True)
    print("\n| neighbour | configuration | s/step | vs before | threads |\n|---|---|---|---|---|")
    for r in results:
        ref = next(x for x in results if x["config"] == "before" and x["busy"] == r["busy"])
        print(f"| {'one busy process' if r['busy'] else 'none'} | {r['config']} | {r['step_s']:.2f} | "
              f"{r['step_s'] / ref['step_s']:.2f}x | {r['threads']} |")


if __name__ == "__main__":
    main()
