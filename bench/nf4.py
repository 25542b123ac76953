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
  6. ('fused', bench/nf4_fused.py) a QLoRA step with bf16 compute through peftkit's training loss: the fused
     NF4 nodes / the module path, and / bf16 LoRA; step time and memory kept for backward (CUDA: peak growth)
The two sides of each row are timed round-robin (the order alternating every round) after a warmup,
and MEDIANS are compared. Threads default to 1: on the 2-core shared VMs two threads are very noisy.
On CPU these ops are bound by memory and page faults on their large temporaries, so a process can settle
into a faster or slower regime; the notes give the median of per-round ratios and the ratio of the
fastest runs as cross-checks, and --json keeps every raw time.
bitsandbytes on CPU: quantize_4bit is pure torch, dequantize_4bit is a C kernel, matmul_4bit is that
dequantize followed by F.linear.

Run:  python bench/nf4.py [--size 4096] [--linear-size 4096] [--repeats 7] [--train-repeats 3]
                          [--threads 1] [--skip-train | --rows quant,linear,train,fused] [--device cuda]
                          [--fused-shape smollm2|tiny] [--fused-batch 4] [--fused-seq 256] [--fused-repeats 5]
                          [--json out.json]
(about 2.5 minutes on 2 CPU cores, 45 s with --skip-train)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # the model loaders' progress bars would garble the output

try:  # the quant and linear rows compare against bitsandbytes; the fused rows run without it
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:
    bnb = bnbF = None
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import peftkit  # noqa: E402
from peftkit.quant import nf4 as pk_nf4  # noqa: E402

ROWS: list[dict] = []


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when peftkit's sources differ from it), or '?'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=os.path.dirname(here),
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (commit or "?") + ("+dirty" if dirty else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
         device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin with the order alternating every round."""
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
    return times


def add(row: str, pk: float, ref: float, ref_name: str, unit: str, value: float, target: float | None,
        note: str = "", **extra: object) -> None:
    ROWS.append({"row": row, "peftkit": pk, "reference": ref, "reference_name": ref_name, "unit": unit,
                 "value": value, "target": target, "met": None if target is None else value <= target,
                 "note": note, **extra})


def add_times(row: str, times: dict[str, list[float]], pk: str, ref: str, ref_name: str, target: float) -> None:
    """A timing row: ratio of medians, plus two looks at the noise: the median of per-round ratios and the
    ratio of the fastest runs."""
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(a / b for a, b in zip(times[pk], times[ref]))
    note = f"paired {paired:.3f}, of minima {min(times[pk]) / min(times[ref]):.3f}"
    add(row, 1e3 * med[pk], 1e3 * med[ref], ref_name, "ms", med[pk] / med[ref], target, note,
        raw_ms={k: [round(1e3 * t, 3) for t in v] for k, v in times.items()})


def time_row(row: str, pk_fn: Callable[[], object], bnb_fn: Callable[[], object], args: argparse.Namespace,
             device: torch.device) -> None:
    times = race({"pk": pk_fn, "bnb": bnb_fn}, args.repeats, args.warmup, device)
    add_times(row, times, "pk", "bnb", "bnb", 1.0)


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
        ROWS[-1]["note"] += f"; bit-identical: {same}"
        fp32 = q.numel * 4
        add(f"bytes / fp32 ({label})", q.nbytes() / fp32, bnb_nbytes(packed, state) / fp32, "bnb", "x",
            q.nbytes() / fp32, 0.135 if dq else None,
            f"{pk_nf4.bits_per_parameter(q):.3f} bits/param (bnb {8 * bnb_nbytes(packed, state) / q.numel:.3f})")


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
        time_row(f"4-bit linear forward {n}x{n}, T={tokens}", pk_fn, bnb_fn, args, device)


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
    quantized = [n for n, m in models["qlora"].named_modules() if isinstance(m, peftkit.NF4Linear)]
    linear = {k: sum(weight_bytes(m.get_submodule(n)) for n in quantized) for k, m in models.items()}
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
    times = race(steps, args.train_repeats, max(args.warmup - 1, 0), device)
    add_times("train step SmolLM2 4x128, QLoRA / LoRA", times, "qlora", "lora", "LoRA", 1.25)
    add("weight memory SmolLM2, QLoRA / LoRA", mem["qlora"] / 2**20, mem["lora"] / 2**20, "LoRA", "MiB",
        mem["qlora"] / mem["lora"], None, f"params + buffers before inject, shared tensors once; the "
        f"{len(quantized)} quantized linears alone: {linear['qlora'] / 2**20:.1f} / {linear['lora'] / 2**20:.1f} MiB "
        f"= {linear['qlora'] / linear['lora']:.3f}")


def fmt(value: float, unit: str) -> str:
    return f"{value:.4f}" if unit == "x" else f"{value:.1f} {unit}"


def print_table() -> None:
    print(f"\n{'row':<40} | {'peftkit':>10} | {'reference':>16} | {'ratio':>6} | {'target':>8} | met | notes")
    print("-" * 124)
    for r in ROWS:
        ref = f"{fmt(r['reference'], r['unit'])} {r['reference_name']}"
        target = "-" if r["target"] is None else f"<= {r['target']:.3g}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['row']:<40} | {fmt(r['peftkit'], r['unit']):>10} | {ref:>16} | {r['value']:>6.3f} | {target:>8} "
              f"| {met:<3} | {r['note']}")
    print("ratio = peftkit / bitsandbytes (times: of the medians; 'paired' = median of per-round ratios), "
          "peftkit bytes / fp32 bytes,\n        QLoRA / LoRA (training rows)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="N of the N x N matrix for quantize/dequantize")
    p.add_argument("--linear-size", type=int, default=4096, help="N of the N x N linear layer")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per micro-benchmark row")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--skip-train", action="store_true", help="skip the SmolLM2 QLoRA vs LoRA training rows")
    p.add_argument("--rows", default="quant,linear,train,fused", help="sections: quant, linear, train, fused")
    p.add_argument("--fused-shape", default="smollm2", choices=["smollm2", "tiny"],
                   help="the fused rows' random Llama body: SmolLM2-135M's shape, or a 2-layer one")
    p.add_argument("--fused-batch", type=int, default=4)
    p.add_argument("--fused-seq", type=int, default=256)
    p.add_argument("--fused-repeats", type=int, default=5, help="timed steps per side in the fused rows")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    device = torch.device(args.device)

    print(f"peftkit {peftkit.__version__} (git {git_commit()}) | bitsandbytes {bnb and bnb.__version__} | "
          f"peft {peft.__version__} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"{platform.platform()} | {platform.processor() or platform.machine()} | cpu_count={os.cpu_count()} | "
          f"torch threads={torch.get_num_threads()} | cpu capability={torch.backends.cpu.get_cpu_capability()} | "
          f"device={device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"repeats={args.repeats} train_repeats={args.train_repeats} warmup={args.warmup}")
    rows = set(args.rows.split(",")) - ({"train"} if args.skip_train else set())
    if rows - {"quant", "linear", "train", "fused"}:
        raise SystemExit(f"unknown --rows {sorted(rows - {'quant', 'linear', 'train', 'fused'})}; "
                         "use quant, linear, train, fused")
    if bnb is None and rows & {"quant", "linear"}:
        print("bitsandbytes is not installed: skipping the quant and linear rows (they compare against it)")
        rows -= {"quant", "linear"}
    t_start = time.perf_counter()
    with torch.inference_mode():
        if "quant" in rows:
            print("\n== quantize / dequantize / bytes ==")
            quant_rows(args, device)
        if "linear" in rows:
            print("\n== 4-bit linear forward ==")
            linear_rows(args, device)
    failed = None
    if "train" in rows:
        print("\n== training step, SmolLM2-135M ==")
        try:
            train_rows(args, device)
        except Exception as exc:  # keep the rows measured so far; report the failure and exit non-zero
            traceback.print_exc()
            failed = f"training rows failed: {type(exc).__name__}: {exc}"
    if "fused" in rows and not failed:
        print("\n== QLoRA training step: fused NF4 nodes / module path / bf16 LoRA ==")
        from nf4_fused import fused_rows

        try:
            fused_rows(args, device, race, add_times, add)
        except Exception as exc:
            traceback.print_exc()
            failed = f"fused rows failed: {type(exc).__name__}: {exc}"
    print_table()
    if failed:
        print(f"\n{failed}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        meta = {"peftkit": peftkit.__version__, "git": git_commit(), "bitsandbytes": bnb and bnb.__version__,
                "peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": ROWS, "failed": failed}, f, indent=2)
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
