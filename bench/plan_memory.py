"""The planner's memory model against measurement: predicted vs measured peak memory of `peftkit train`
on SmolLM2-135M (CPU, fp32), for full fine-tuning, LoRA and QLoRA, with and without gradient checkpointing.

Each run is its own `peftkit train` process (peak RSS is a per-process high-water mark) on a synthetic
dataset whose every example is exactly --seq-len tokens (a short prompt, a long answer cut at the limit),
so the batch shape is what the planner is told. The prediction uses the same settings, with the share of
labelled tokens counted from the data. Ratio = measured / predicted; the target is 0.8-1.2.

Run:  python bench/plan_memory.py [--batch-size 4] [--seq-len 256] [--steps 3] [--only lora,qlora-gc]
(about 10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from peftkit.plan import memory, presets

CONFIGS = ("full", "full-gc", "lora", "lora-gc", "qlora", "qlora-gc")
WORDS = ("order ticket refund shipping broken screen battery charger delivery package label address invoice "
         "customer support replacement warranty").split()


def write_data(path: Path, n: int = 64) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Summarise ticket {i}: " + " ".join(rng.choice(WORDS) for _ in range(12))
            answer = " ".join(rng.choice(WORDS) for _ in range(600))  # far longer than any --seq-len
            f.write(json.dumps({"prompt": prompt, "completion": answer}) + "\n")


def answer_fraction(data: Path, seq_len: int) -> float:
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_dir
    from peftkit.train import data as data_mod

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
    examples, _ = data_mod.build_examples(data_mod.read_records(data), tokenizer, seq_len)
    labelled = sum(sum(1 for y in e.labels[1:] if y != data_mod.IGNORE_INDEX) for e in examples)
    return labelled / sum(len(e.input_ids) for e in examples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    shape = presets.resolve("smollm2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fixed.jsonl"
        write_data(data)
        fraction = answer_fraction(data, args.seq_len)
        print(f"SmolLM2-135M, batch {args.batch_size} x {args.seq_len} tokens ({100 * fraction:.0f}% labelled), "
              f"r={args.r} all-linear, fp32, AdamW, {args.steps} steps, CPU", flush=True)
        print(f"{'config':<10} {'predicted MB':>13} {'measured MB':>12} {'ratio':>6}", flush=True)
        for name in args.only.split(","):
            method, gc = name.split("-")[0], name.endswith("-gc")
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "peftkit.cli", "train", "--data", str(data), "--val-fraction", "0.0625",
                   "--method", method, "--r", str(args.r), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.seq_len), "--max-steps", str(args.steps), "--save-every", "0", "--threads",
                   str(args.threads), "--no-progress", "--output-dir", str(out)]
            if gc:
                cmd.append("--gradient-checkpointing")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: peftkit train failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            measured = json.loads((out / "summary.json").read_text())["peak_memory_mb"] * 2**20
            est = memory.estimate(shape, memory.Settings(
                method=method, r=args.r, batch_size=args.batch_size, seq_len=args.seq_len, gradient_checkpointing=gc,
                dtype="float32", device="cpu", answer_fraction=fraction))
            rows.append({"config": name, "predicted_mb": est.total / 2**20, "measured_mb": measured / 2**20,
                         "ratio": measured / est.total, "parts_mb": {k: v / 2**20 for k, v in est.parts.items()}})
            r = rows[-1]
            print(f"{name:<10} {r['predicted_mb']:>13.0f} {r['measured_mb']:>12.0f} {r['ratio']:>6.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(0.8 <= r["ratio"] <= 1.2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
