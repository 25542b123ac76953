"""NF4 speed and size: peftkit's pure-PyTorch NF4 vs bitsandbytes, in the same process.

Rows (each a ratio peftkit / bitsandbytes unless said otherwise; absolute times on a shared VM are noise):
  1. quantize an N x N fp32 matrix (blocksize 64), with and without double quantization
  2. dequantize it back to fp32
  3. a 4-bit linear forward, x of shape (1, T, N) for T = 1 and T = 512, under torch.inference_mode():
     peftkit.NF4Linear.from_linear(...) vs bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state);
     the outputs are checked to agree (max|diff| <= 1e-4 * max|out|) before anything is timed
  4. bytes of the quantized weight / fp32 bytes (and bits per parameter), with and without double quant
  5. a training step on SmolLM2-135M, QLoRA (peftkit NF4 base) / fp32 LoRA, same LoRA config (r=16,
     all-linear), batch 4 x 128 random ids, AdamW lr 1e-4; plus the weight memory of both models
The two sides of each row are timed round-robin (the order alternating every round) after a warmup,
and MEDIANS are compared. Threads default to 1: on the 2-core shared VMs two threads are very noisy.
bitsandbytes on CPU: quantize_4bit is pure torch, dequantize_4bit is a C kernel, matmul_4bit is that
dequantize followed by F.linear.

Run:  python bench/nf4.py [--size 4096] [--repeats N] [--threads 1] [--skip-train] [--device cuda]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import peft
import torch
import transformers
from torch import nn

import peftkit
from peftkit.quant import nf4 as pk_nf4

ROWS: list[dict] = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin with the order alternating."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            fns[k]()
    sync(device)
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats):
            for k in names if i % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                fns[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {k: statistics.median(v) for k, v in times.items()}


def add(row: str, pk: float, ref: float, ref_name: str, unit: str, value: float, target: float | None,
        note: str = "") -> None:
    ROWS.append({"row": row, "peftkit": pk, "reference": ref, "reference_name": ref_name, "unit": unit,
                 "value": value, "target": target, "met": None if target is None else value <= target,
                 "note": note})


def time_row(row: str, pk_fn: Callable[[], object], bnb_fn: Callable[[], object], args: argparse.Namespace,
             device: torch.device, repeats: int | None = None) -> None:
    med = race({"pk": pk_fn, "bnb": bnb_fn}, repeats or args.repeats, args.warmup, device)
    add(row, 1e3 * med["pk"], 1e3 * med["bnb"], "bnb", "ms", med["pk"] / med["bnb"], 1.0)


def bnb_nbytes(packed: torch.Tensor, state: bnbF.QuantState) -> int:
    """What bitsandbytes stores for a 4-bit weight: codes, absmax (8-bit when nested) and its statistics."""
    tensors = [packed, state.absmax]
    if state.nested:
        tensors += [state.state2.absmax, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def quant_rows(args: argparse.Namespace, device: torch.device) -> None:
    n = args.size
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen).to(device)
    for dq in (True, False):
        label = "double quant" if dq else "no double quant"
        q = pk_nf4.quantize(w, blocksize=64, double_quant=dq)
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        same = torch.equal(q.packed, packed.view(-1)) and torch.equal(
            pk_nf4.dequantize(q, dtype=torch.float32), bnbF.dequantize_4bit(packed, state))
        print(f"  {label}: peftkit and bitsandbytes codes+dequantized values identical: {same}")
        time_row(f"quantize {n}x{n} ({label})",
                 lambda: pk_nf4.quantize(w, blocksize=64, double_quant=dq),
                 lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq), args, device)
        time_row(f"dequantize {n}x{n} ({label})",
                 lambda: pk_nf4.dequantize(q, dtype=torch.float32),
                 lambda: bnbF.dequantize_4bit(packed, state), args, device)
        ROWS[-1]["note"] = f"bit-identical: {same}"
        fp32 = q.numel * 4
        add(f"bytes / fp32 bytes ({label})", q.nbytes() / fp32, bnb_nbytes(packed, state) / fp32, "bnb", "x",
            q.nbytes() / fp32, 0.135 if dq else None,
            f"{pk_nf4.bits_per_parameter(q):.3f} bits/param (bnb {8 * bnb_nbytes(packed, state) / q.numel:.3f})")
        del q, packed, state


def linear_rows(args: argparse.Namespace, device: torch.device) -> None:
    n = args.linear_size
    torch.manual_seed(0)
    lin = nn.Linear(n, n).to(device)
    pk = peftkit.NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    packed, state = bnbF.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    bias = lin.bias.detach()
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 512):
        x = torch.randn(1, tokens, n, generator=gen).to(device)
        pk_fn = lambda: pk(x)  # noqa: E731
        bnb_fn = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state, bias=bias)  # noqa: E731
        a, b = pk_fn(), bnb_fn()
        diff, tol = (a - b).abs().max().item(), 1e-4 * b.abs().max().item()
        print(f"  linear {n}x{n}, {tokens} token(s): max|diff| = {diff:.2e} (tol {tol:.1e})")
        if a.shape != b.shape or diff > tol:
            raise SystemExit(f"peftkit and bitsandbytes 4-bit linear disagree ({diff:.3e} > {tol:.1e}); not timing")
        time_row(f"4-bit linear fwd {n}x{n}, T={tokens}", pk_fn, bnb_fn, args, device)


def weight_bytes(model: nn.Module) -> int:
    """Parameter + buffer bytes, each storage counted once (tied embeddings share one)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def train_rows(args: argparse.Namespace, device: torch.device) -> None:
    from peftkit.models import load_model

    models = {"lora": load_model("smollm2")[0], "qlora": load_model("smollm2", quantize="nf4")[0]}
    mem = {k: weight_bytes(m) for k, m in models.items()}
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear")
    steps = {}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["lora"].config.vocab_size, (4, 128), generator=gen).to(device)
    for k, m in models.items():
        torch.manual_seed(0)
        peftkit.inject(m.to(device), peftkit.LoraConfig(**cfg)).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

        def step(m: nn.Module = m, opt: torch.optim.Optimizer = opt) -> float:
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        steps[k] = step
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    print(f"  trainable params: LoRA {trainable['lora']:,}  QLoRA {trainable['qlora']:,}")
    print(f"  first-step loss: LoRA {steps['lora']():.4f}  QLoRA {steps['qlora']():.4f}")
    med = race(steps, args.train_repeats, max(args.warmup - 1, 0), device)
    add("train step SmolLM2 4x128, QLoRA / LoRA", 1e3 * med["qlora"], 1e3 * med["lora"], "LoRA fp32", "ms",
        med["qlora"] / med["lora"], 1.25)
    add("base weight memory, QLoRA / LoRA", mem["qlora"] / 2**20, mem["lora"] / 2**20, "LoRA fp32", "MiB",
        mem["qlora"] / mem["lora"], None, "params + buffers before inject, shared storage once")


def print_table() -> None:
    print(f"\n{'row':<42} | {'peftkit':>11} | {'reference':>17} | {'ratio':>6} | {'target':>7} | met")
    print("-" * 100)
    for r in ROWS:
        ref = f"{r['reference']:.4g} {r['unit']} {r['reference_name']}" if r["unit"] != "x" else \
            f"{r['reference']:.4f} {r['reference_name']}"
        pk = f"{r['peftkit']:.4g} {r['unit']}" if r["unit"] != "x" else f"{r['peftkit']:.4f}"
        target = "-" if r["target"] is None else f"<= {r['target']:.3g}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['row']:<42} | {pk:>11} | {ref:>17} | {r['value']:>6.3f} | {target:>7} | {met:<3} {r['note']}")
    print("ratio: peftkit / bitsandbytes for times, peftkit bytes / fp32 bytes for the bytes rows, "
          "QLoRA / LoRA for the training rows")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="N of the N x N matrix for quantize/dequantize")
    p.add_argument("--linear-size", type=int, default=4096, help="N of the N x N linear layer")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per micro-benchmark row")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--skip-train", action="store_true", help="skip the SmolLM2 QLoRA vs LoRA training row")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    device = torch.device(args.device)

    print(f"peftkit {peftkit.__version__} | bitsandbytes {bnb.__version__} | peft {peft.__version__} | "
          f"torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"{platform.platform()} | {platform.processor() or platform.machine()} | cpu_count={os.cpu_count()} | "
          f"torch threads={torch.get_num_threads()} | cpu capability={torch.backends.cpu.get_cpu_capability()} | "
          f"device={device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"repeats={args.repeats} train_repeats={args.train_repeats} warmup={args.warmup}")
    t_start = time.perf_counter()
    with torch.inference_mode():
        print("\n== quantize / dequantize / bytes ==")
        quant_rows(args, device)
        print("\n== 4-bit linear forward ==")
        linear_rows(args, device)
    if not args.skip_train:
        print("\n== training step, SmolLM2-135M ==")
        train_rows(args, device)
    print_table()
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        meta = {"peftkit": peftkit.__version__, "bitsandbytes": bnb.__version__, "peft": peft.__version__,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": ROWS}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
