"""LoRA training step: peftkit vs HF PEFT, same model, config and batch, in one run.

For each model (a random 2-layer Llama with a 32,000-token vocabulary, so the output head's cost shows,
and the real SmolLM2-135M-Instruct) both sides train the same base (deep copies) with the same adapter,
LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), and AdamW (lr 1e-4) on the trainable
parameters (peftkit's side builds it as `peftkit train` does: fused, where torch has a fused kernel):
    peftkit   peftkit.inject; loss = sum_token_loss(model, ids, mask, labels, chunk=1024) / its token count
              (the head runs only on answer tokens, in chunks, under activation checkpointing)
    hf-peft   peft.get_peft_model; loss = model(input_ids, attention_mask, labels).loss (full logits)
The batch looks like instruction data: labels are -100 on the first 70% of each row (the prompt) and on
the right padding of every other row; both sides get the identical tensors. With B = 0 at init both must
start from the same loss (checked to 1e-4 before anything is timed).
Step time: warm-up steps, then steps timed round-robin (the order rotating every round) so drift on a
noisy, shared machine hits both alike; MEDIANS are compared as a ratio peftkit / HF PEFT (< 1: peftkit is
faster). Peak memory: each side runs again in its own child process (peak RSS is per process), and the
growth of the peak over the memory after load + inject + optimizer (weights paged in) is reported: on CPU
VmHWM after resetting it through /proc/self/clear_refs (ru_maxrss if that is not permitted), on CUDA
torch.cuda.max_memory_allocated; the whole process's peak too. peftkit's process sets glibc's mmap
threshold as `peftkit train` does on a CPU (src/peftkit/train/allocator.py); --same-allocator gives HF
PEFT's process the same setting, to see how much of the memory ratio that is. Threads default to 1:
two threads on the 2-core shared VMs are noisy.

16-bit and QLoRA rows: --dtype bfloat16 gives both sides a bf16 base with fp32 adapters (peftkit's default,
and PEFT's default autocast_adapter_dtype); the initial losses then agree to LOSS_TOL_16. --base nf4 quantizes
the linears (not the head) to NF4 with double quantization, blocksize 64, compute dtype --dtype: peftkit's
NF4Linear on the peftkit side, bitsandbytes' Linear4bit (its CPU backend on a CPU) under HF PEFT on the other,
plus a third side, 'peftkit-dense': peftkit's LoRA on the unquantized base in --dtype (QLoRA's cost against
plain 16-bit LoRA). The header lists the CPU's AVX/AMX flags: without avx512_bf16 or amx_bf16 a bf16 matmul
is converted to fp32 and back, so bf16 steps are slower than fp32 ones on such a CPU (see precision.py).

Run:  python bench/train.py [--models tiny,smollm2] [--batch B] [--smollm2-batch 4] [--seq 256] [--steps N]
                            [--warmup N] [--device cpu|cuda] [--threads 1] [--json out.json] [--quick]
                            [--dtype float32|bfloat16|float16] [--base dense|nf4]
(batch 8 x 256 for tiny, 4 x 256 for smollm2 by default: 12-15 minutes on the 2-core VM, where a SmolLM2
step at 8 x 256 takes about a minute; --quick: tiny model only, batch 4, a few steps, under a minute)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

import peftkit  # noqa: E402
from peftkit import precision  # noqa: E402
from peftkit.train.loop import make_optimizer  # noqa: E402
from peftkit.train.loss import sum_token_loss  # noqa: E402

SIDES = ("peftkit", "hf-peft")
LOSS_TOL, LOSS_TOL_16 = 1e-4, 2e-2  # fp32; a 16-bit base (both sides' logits rounded to the base dtype)
DTYPE, BASE = torch.float32, "dense"  # --dtype: the base's dtype on every side; --base: dense or nf4 (QLoRA)


def load(name: str) -> nn.Module:
    if name == "tiny":
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                       max_position_embeddings=1024, tie_word_embeddings=False)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg)
    if name == "smollm2":
        from peftkit.models import load_model

        return load_model("smollm2")[0]
    raise SystemExit(f"unknown model {name!r}; choose from tiny, smollm2")


def make_batch(vocab: int, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random ids; every other row right-padded by 10-30% of seq; labels -100 on padding and prompt
    (the first 70% of each row's real tokens). Deterministic, so a child process builds the same one."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i in range(batch):
        pad = int(seq * (0.1 + 0.2 * torch.rand((), generator=gen).item())) if i % 2 else 0
        length = seq - pad
        ids[i, length:], mask[i, length:], labels[i, length:] = 0, 0, -100
        labels[i, :int(0.7 * length)] = -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


GRADIENT_CHECKPOINTING = False  # --gradient-checkpointing: both sides recompute each block in backward


def sides() -> tuple[str, ...]:  # with --base nf4, also peftkit's LoRA on the dense base
    return (*SIDES, "peftkit-dense") if BASE == "nf4" else SIDES


def to_bnb_nf4(model: nn.Module) -> nn.Module:
    """The model's linears (not the head) as bitsandbytes Linear4bit, NF4 with double quantization, in place."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        assert module.bias is None, f"{name}: the bench's bnb swap handles bias-free linears (Llama's) only"
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, compute_dtype=DTYPE,
                              compress_statistics=True, quant_type="nf4")  # the bench's Llama has no biases
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(module.weight.device))
    return model


def build(side: str, base: nn.Module) -> nn.Module:
    """`base` (consumed) with a fresh LoRA adapter, B = 0, in training mode; in --dtype, NF4 with --base nf4."""
    torch.manual_seed(1)
    base = base.to(DTYPE)
    if BASE == "nf4" and side == "peftkit":
        peftkit.quantize(base, "nf4", compute_dtype=DTYPE)
    elif BASE == "nf4" and side == "hf-peft":
        to_bnb_nf4(base)
    side = "peftkit" if side == "peftkit-dense" else side
    if GRADIENT_CHECKPOINTING:  # transformers' own, non-reentrant, on both sides
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if side == "peftkit":
        model = peftkit.inject(base, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                              task_type="CAUSAL_LM"))
    return model.train()


def loss_fn(side: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if side.startswith("peftkit"):
        total, n = sum_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk=1024)
        return total / n
    return model(**batch, use_cache=False).loss


def stepper(side: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    if side.startswith("peftkit"):  # the optimizer `peftkit train` builds (fused AdamW where torch has it)
        opt = make_optimizer(params, lr=1e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss_fn(side, model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per training step of each side, timed round-robin with the order rotating every round."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            fns[k]()
    sync(device)
    gc.collect()
    gc.disable()
    try:
        for i in range(steps):
            for k in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                fns[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: peak memory growth (MiB) of `args.mem_steps` training steps of one side; prints JSON."""
    device = torch.device(args.device)
    if args.side.startswith("peftkit") or args.same_allocator:  # what `peftkit train` does on a CPU (allocator.py)
        from peftkit.train.allocator import release_freed_memory

        release_freed_memory()
    model = build(args.side, load(args.models).to(device))
    batch = make_batch(model.config.vocab_size, args.batch, args.seq, device)
    step = stepper(args.side, model, batch)
    with torch.no_grad():  # page in weights that are still memory-mapped from the file: not training memory
        sum(float(p.sum()) for p in model.parameters())
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, how = torch.cuda.memory_allocated(device), "cuda max_memory_allocated"
    else:
        try:  # hand freed heap back to the OS, so that the baseline is what is really held
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before, how = _status_kib("VmRSS") * 1024, "VmHWM after clear_refs"
        except OSError:
            before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss delta"
    for _ in range(args.mem_steps):
        step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif how.startswith("VmHWM"):
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"side": args.side, "how": how, "before_mib": before / 2**20,
                      "growth_mib": (peak - before) / 2**20, "peak_mib": peak / 2**20}))


def child_memory(name: str, batch: int, seq: int, args: argparse.Namespace) -> dict[str, dict]:
    """Both sides' measure_memory, each in its own process: at once on CPU (peak RSS is per process),
    one after the other on CUDA (where they would share the device)."""
    procs: dict[str, subprocess.Popen] = {}
    outs: dict[str, tuple[str, str]] = {}
    for side in sides():
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-side", side, "--models", name,
               "--dtype", str(DTYPE).removeprefix("torch."), "--base", BASE,
               "--batch", str(batch), "--seq", str(seq), "--device", args.device, "--threads", str(args.threads),
               "--mem-steps", str(args.mem_steps)] + (["--same-allocator"] if args.same_allocator else []) + (
                   ["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        procs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if args.device != "cpu":
            outs[side] = procs[side].communicate()
    result = {}
    for side, proc in procs.items():
        stdout, stderr = outs[side] if side in outs else proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {side} / {name} failed:\n{stderr[-3000:]}")
        result[side] = json.loads(stdout.strip().splitlines()[-1])
    return result


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    t0 = time.perf_counter()
    base = load(name).to(device)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s; {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M "
          f"parameters, vocab {base.config.vocab_size}")
    bsz = args.batch or (8 if name == "tiny" else args.smollm2_batch)
    batch = make_batch(base.config.vocab_size, bsz, args.seq, device)
    n_labels = int((batch["labels"][:, 1:] != -100).sum())
    print(f"  batch {bsz} x {args.seq}: {int(batch['attention_mask'].sum())} real tokens, {n_labels} labelled")
    models = {side: build(side, copy.deepcopy(base)) for side in sides()}
    del base
    trainable = {s: sum(p.numel() for p in m.parameters() if p.requires_grad) for s, m in models.items()}
    adapter_dtype = next(p.dtype for p in models["peftkit"].parameters() if p.requires_grad)
    print(f"  trainable params: peftkit {trainable['peftkit']:,}  HF PEFT {trainable['hf-peft']:,}; base "
          f"{str(DTYPE).removeprefix('torch.')} {BASE}, adapters {adapter_dtype}")
    with torch.no_grad():
        loss0 = {s: loss_fn(s, m, batch).item() for s, m in models.items()}
    diff = abs(loss0["peftkit"] - loss0["hf-peft"])
    tol = LOSS_TOL if DTYPE == torch.float32 else LOSS_TOL_16
    print(f"  initial loss: peftkit {loss0['peftkit']:.6f}  HF PEFT {loss0['hf-peft']:.6f}  |diff| {diff:.2e} "
          f"(tol {tol:.0e})" + (f"; peftkit on the dense base {loss0['peftkit-dense']:.6f}" if BASE == "nf4" else ""))
    if diff > tol or trainable["peftkit"] != trainable["hf-peft"]:
        raise SystemExit("the two sides do not train the same thing; not timing")
    steps = args.steps or (20 if name == "tiny" else 5)
    warmup = args.warmup if args.warmup is not None else (2 if name == "tiny" else 1)
    fns = {s: stepper(s, m, batch) for s, m in models.items()}
    t0 = time.perf_counter()
    times = race(fns, steps, warmup, device)
    print(f"  timed {steps} steps x {len(fns)} sides (+{warmup} warm-up) in {time.perf_counter() - t0:.1f}s")
    del fns, models
    gc.collect()
    mem = child_memory(name, bsz, args.seq, args)
    print(f"  memory ({mem['peftkit']['how']}, {args.mem_steps} steps): baseline peftkit "
          f"{mem['peftkit']['before_mib']:.0f} MiB, HF PEFT {mem['hf-peft']['before_mib']:.0f} MiB")
    med = {s: statistics.median(v) for s, v in times.items()}
    return {
        "model": name, "batch": bsz, "seq": args.seq, "labelled_tokens": n_labels, "steps": steps,
        "warmup": warmup, "initial_loss": loss0, "median_ms": {s: 1e3 * v for s, v in med.items()},
        "time_ratio": med["peftkit"] / med["hf-peft"],
        "paired_time_ratio": statistics.median(a / b for a, b in zip(times["peftkit"], times["hf-peft"])),
        "peak_growth_mib": {s: m["growth_mib"] for s, m in mem.items()},
        "memory_ratio": mem["peftkit"]["growth_mib"] / mem["hf-peft"]["growth_mib"],
        "peak_mib": {s: m["peak_mib"] for s, m in mem.items()},
        "process_peak_ratio": mem["peftkit"]["peak_mib"] / mem["hf-peft"]["peak_mib"],
        "memory_how": mem["peftkit"]["how"], "raw_ms": {s: [round(1e3 * t, 2) for t in v] for s, v in times.items()},
        "dtype": str(DTYPE).removeprefix("torch."), "base": BASE,
        **({"vs_dense_time_ratio": med["peftkit"] / med["peftkit-dense"],
            "vs_dense_memory_ratio": mem["peftkit"]["growth_mib"] / mem["peftkit-dense"]["growth_mib"]}
           if "peftkit-dense" in med else {}),
    }


def print_table(results: list[dict]) -> None:
    print(f"\n{'model':<8} | {'batch':>9} | {'step ms peftkit':>15} | {'step ms HF':>10} | {'time ratio':>10} | "
          f"{'paired':>6} | {'peak MiB peftkit':>16} | {'peak MiB HF':>11} | {'mem ratio':>9} | "
          f"{'process peak ratio':>18}")
    print("-" * 140)
    for r in results:
        ms, mem = r["median_ms"], r["peak_growth_mib"]
        shape = f"{r['batch']} x {r['seq']}"
        print(f"{r['model']:<8} | {shape:>9} | {ms['peftkit']:>15.1f} | {ms['hf-peft']:>10.1f} | "
              f"{r['time_ratio']:>10.3f} | {r['paired_time_ratio']:>6.3f} | {mem['peftkit']:>16.1f} | "
              f"{mem['hf-peft']:>11.1f} | {r['memory_ratio']:>9.3f} | {r['process_peak_ratio']:>18.3f}")
    for r in results:
        if "vs_dense_time_ratio" in r:
            print(f"{r['model']}: peftkit NF4 / peftkit {r['dtype']} LoRA on the dense base: step time "
                  f"{r['vs_dense_time_ratio']:.3f}, peak growth {r['vs_dense_memory_ratio']:.3f}")
    print("ratios = peftkit / HF PEFT (< 1: peftkit is better); time: of the medians, 'paired': median of "
          "per-round ratios;\npeak MiB: growth of the peak over the memory after load + inject + optimizer, "
          "each side in its own process;\nprocess peak ratio: the whole process's peak resident memory "
          "(weights, runtime and all), peftkit / HF PEFT")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 8; smollm2: --smollm2-batch)")
    p.add_argument("--smollm2-batch", type=int, default=4,
                   help="smollm2's batch when --batch is not given (default 4: 8 x 256 takes ~1 min/step on 1 thread)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20 tiny, 5 smollm2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 2 tiny, 1 smollm2)")
    p.add_argument("--mem-steps", type=int, default=2, help="training steps in each memory child process")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny model only, batch 4, 3 steps, 1 warm-up, 1 memory step")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="both sides recompute each decoder block in backward (transformers' checkpointing)")
    p.add_argument("--same-allocator", action="store_true",
                   help="give HF PEFT's process peftkit's CPU allocator setting too (a sensitivity check)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base's dtype on every side (adapters stay fp32 over a 16-bit base; default float32)")
    p.add_argument("--base", default="dense", choices=["dense", "nf4"], help="nf4: QLoRA rows, peftkit's NF4 "
                   "against HF PEFT + bitsandbytes NF4, and against peftkit's LoRA on the dense --dtype base")
    p.add_argument("--_memory-side", dest="side", choices=(*SIDES, "peftkit-dense"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global GRADIENT_CHECKPOINTING, DTYPE, BASE
    GRADIENT_CHECKPOINTING, DTYPE, BASE = args.gradient_checkpointing, getattr(torch, args.dtype), args.base
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    if args.side:
        return measure_memory(args)
    if args.quick:
        args.models, args.steps, args.warmup, args.mem_steps = "tiny", args.steps or 3, 1, 1
        args.batch = args.batch or 4
    device = torch.device(args.device)

    print(f"peftkit {peftkit.__version__} | peft {peft.__version__} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"{platform.platform()} | {platform.processor() or platform.machine()} | cpu_count={os.cpu_count()} | "
          f"torch threads={torch.get_num_threads()} | device={device}")
    facts = precision.machine_facts()
    print(f"CPU {facts['cpu']} | flags {' '.join(facts['cpu_flags']) or 'none'} | bf16 flags "
          f"{' '.join(facts['bf16_flags']) or 'none'} | CUDA {facts['cuda']} | --dtype auto here: "
          f"{facts['auto']['dtype']} | base {args.dtype} {args.base}")
    results = []
    for name in args.models.split(","):
        print(f"\n== {name.strip()} ==")
        results.append(run_model(name.strip(), args, device))
        gc.collect()
    print_table(results)
    if args.json:
        meta = {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "peftkit": peftkit.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(), "machine": facts,
                **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
