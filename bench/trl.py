"""TRL's SFTTrainer with HF PEFT against peftkit (inside SFTTrainer, and its own trainer), in one run.

The built-in task (support tickets to JSON, peftkit.train.task) on the embedded SmolLM2-135M-Instruct, fp32,
the same tickets, LoRA config (r=16, lora_alpha=32, all linear layers), learning rate (2e-4, constant, no
warm-up), batch (8 tickets a step), steps, AdamW, answer-only loss and 1 thread on every side:
    trl+peft      trl.SFTTrainer(model, peft_config=peft.LoraConfig(...)): the usual recipe, TRL's own loss
                  (its fused LM head, which also skips the full logits)
    trl+peftkit   peftkit.inject(model, ...); SFTTrainer(model); use_peftkit(trainer, lean_loss=True)
    peftkit       peftkit's own trainer, `peftkit.train.train(options)` (what `peftkit train` runs), on the
                  same tickets written as a chat JSONL file
Each side runs in its own process, one after the other (peak memory is per process). Reported: the median
step time (the first step, a warm-up, left out) and the whole run's training time; the growth of the peak
resident memory (VmHWM, reset through /proc/self/clear_refs) over the memory after load + inject + trainer
setup, for the two SFTTrainer sides (peftkit's trainer loads the model inside `train`, so only its
process peak is known); and each process's peak. Ratios are peer / peftkit: above 1, peftkit is ahead.

Run:  python bench/trl.py [--steps 6] [--batch 8] [--sides trl+peft,trl+peftkit,peftkit] [--json out.json]
(about 4 minutes for --steps 6 on the project's 2-core machine; compare ratios, not times)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
# This file is named trl.py: its own folder must not stand first on sys.path, or `import trl` finds it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from peftkit.precision import describe_machine  # noqa: E402
SIDES = ("trl+peft", "trl+peftkit", "peftkit")
LR, R, ALPHA = 2e-4, 16, 32


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> float:
    """Hand freed heap back, reset VmHWM to the current RSS; the RSS (MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def tickets(n: int) -> list[list[dict]]:
    from peftkit.train.task import train_set

    return [t.messages() for t in train_set(n, seed=0)]


def run_sft(side: str, steps: int, batch: int, out: Path) -> dict:
    """One SFTTrainer side: times each step with a callback; returns step times and memory."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import peftkit
    from peftkit.models import load_model

    model, tokenizer = load_model("smollm2")
    rows = [{"prompt": m[:2], "completion": m[2:]} for m in tickets(steps * batch)]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, bf16=False, gradient_checkpointing=False,
                     save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                     dataloader_num_workers=0)
    kw = {}
    if side == "trl+peft":
        import peft

        kw["peft_config"] = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        torch.manual_seed(1)
        peftkit.inject(model, peftkit.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, **kw)
    if side == "trl+peftkit":
        from peftkit.integrations.transformers import use_peftkit

        use_peftkit(trainer, lean_loss=True)

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer.add_callback(timer)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    with torch.no_grad():  # page in weights still memory-mapped from the file: not training memory
        sum(float(p.sum()) for p in trainer.model.parameters())
    before = reset_peak()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"step_s": timer.times, "train_s": total, "growth_mib": _status_mib("VmHWM") - before,
            "peak_mib": _status_mib("VmHWM"), "trainable": trainable, "losses": losses}


def run_peftkit(steps: int, batch: int, out: Path) -> dict:
    """peftkit's own trainer on the same tickets; step times from its metrics.jsonl."""
    from peftkit.train import build_options, configure_process, init_distributed, train

    data = out / "tickets.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in tickets(steps * batch)))
    o = build_options({"data": str(data), "val_fraction": 0.0, "r": R, "lora_alpha": ALPHA, "lr": LR,
                       "warmup_steps": 0, "schedule": "constant", "batch_size": batch, "max_steps": steps,
                       "eval_examples": 0, "score_base": False, "save_every": 0, "progress": False, "threads": 1,
                       "output_dir": str(out / "run"), "overwrite": True, "seed": 0})
    configure_process(o, init_distributed(o.device))  # what `peftkit train` does first (threads, allocator)
    summary = train(o)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "seconds" in r]
    seconds = [r["seconds"] for r in rows]
    return {"step_s": [b - a for a, b in zip([0.0] + seconds, seconds)], "train_s": seconds[-1],
            "growth_mib": None, "peak_mib": _status_mib("VmHWM"), "trainable": summary.get("trainable_params"),
            "losses": [r["loss"] for r in rows]}


def child(side: str, steps: int, batch: int) -> None:
    import torch

    torch.set_num_threads(1)
    out = Path(tempfile.mkdtemp(prefix=f"bench-trl-{side.replace('+', '-')}-"))
    result = run_peftkit(steps, batch, out) if side == "peftkit" else run_sft(side, steps, batch, out)
    print("RESULT " + json.dumps({"side": side, **result}), flush=True)


def run_side(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_side", side, "--steps", str(args.steps),
           "--batch", str(args.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"side {side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def print_table(results: dict[str, dict]) -> None:
    print(f"\n{'side':<12} | {'step s (median)':>15} | {'train s':>8} | {'growth MiB':>10} | {'process peak MiB':>16} | "
          f"{'first loss':>10} | {'last loss':>9}")
    print("-" * 98)
    for side, r in results.items():
        growth = "-" if r["growth_mib"] is None else f"{r['growth_mib']:.0f}"
        print(f"{side:<12} | {r['median_step_s']:>15.2f} | {r['train_s']:>8.1f} | {growth:>10} | "
              f"{r['peak_mib']:>16.0f} | {r['losses'][0]:>10.4f} | {r['losses'][-1]:>9.4f}")
    peer = results.get("trl+peft")
    if peer is None:
        return
    print("\nratios, TRL + PEFT / peftkit (above 1: peftkit is ahead):")
    for side in (s for s in ("trl+peftkit", "peftkit") if s in results):
        r = results[side]
        growth = ("" if r["growth_mib"] is None or peer["growth_mib"] is None
                  else f", peak memory growth {peer['growth_mib'] / r['growth_mib']:.2f}x")
        print(f"  vs {side:<12} step time {peer['median_step_s'] / r['median_step_s']:.2f}x, training time "
              f"{peer['train_s'] / r['train_s']:.2f}x{growth}, process peak {peer['peak_mib'] / r['peak_mib']:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per side (default 6)")
    p.add_argument("--batch", type=int, default=8, help="tickets per step (default 8, as `peftkit train`)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--_side", dest="side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or not 1 <= args.batch <= 64:
        raise SystemExit("--steps must be at least 2 (the first is a warm-up) and --batch in 1..64")
    if args.side:
        return child(args.side, args.steps, args.batch)
    sides = [s.strip() for s in args.sides.split(",")]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    from importlib.metadata import version

    print(f"torch {version('torch')} | transformers {version('transformers')} | trl {version('trl')} | "
          f"peft {version('peft')} | peftkit {version('peftkit')} | {platform.platform()}")
    print(f"machine: {describe_machine()}; 1 thread per side; SmolLM2-135M fp32, batch {args.batch}, {args.steps} steps")
    results = {}
    for side in sides:
        t0 = time.perf_counter()
        r = run_side(side, args)
        r["median_step_s"] = statistics.median(r["step_s"][1:])
        results[side] = r
        print(f"  {side}: {time.perf_counter() - t0:.0f}s in all, trainable params {r['trainable']}", flush=True)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": describe_machine(), "results": results},
                                              indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
