"""Forward latency of LoRA: base model vs peftkit (merged, unmerged) vs HF PEFT (unmerged).

For each model (a tiny random Llama and the real SmolLM2-135M-Instruct) it times, on the same input ids,
under torch.inference_mode():
    base       the plain transformers model
    pk-merged  peftkit.inject + peftkit.merge (should cost nothing over the base)
    pk-unmerg  peftkit.inject, adapter applied in the forward pass
    hf-unmerg  the same adapter (saved by peftkit, loaded by peft.PeftModel.from_pretrained)
Every variant is a deep copy of one base model and all run one adapter (init_lora_weights=False, so it
really changes the output); logits are checked to agree before anything is timed. Variants are timed
round-robin (rotating the order each round) so drift on a noisy, shared machine hits all of them alike,
and the MEDIAN per variant is reported as a ratio to the base: absolute times are noise.
Threads default to 1: on the 2-core shared VMs, torch's default of 2 OpenMP threads ran these forwards
6-15x slower and with a spread as large as the median, which drowns any LoRA overhead.

Run:  python bench/lora_forward.py [--models tiny,smollm2] [--seq 128] [--repeats N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
import warnings

import peft
import torch
import transformers
from torch import nn

import peftkit

VARIANTS = ("base", "pk-merged", "pk-unmerg", "hf-unmerg")
ATOL, RTOL = 1e-4, 2e-5  # correctness tolerance on logits: see check()


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                                   max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def load(name: str) -> nn.Module:
    if name == "tiny":
        return tiny_llama()
    if name == "smollm2":
        from peftkit.models import load_model

        return load_model("smollm2")[0].eval()
    raise SystemExit(f"unknown model {name!r}; choose from tiny, smollm2")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def check(label: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| <= ATOL, loosened in proportion to the logits' scale past max|b| = 1/RTOL * ATOL: with
    init_lora_weights=False the adapter is as large as the weights, and fp32 rounding of W + BA alone
    moves SmolLM2's logits (max ~36) by ~2e-4 (HF PEFT's own merge moves them by exactly as much)."""
    diff, tol = (a - b).abs().max().item(), max(ATOL, RTOL * b.abs().max().item())
    print(f"  check {label:<36} max|diff| = {diff:.2e}  (tol {tol:.1e})")
    if diff > tol:
        raise SystemExit(f"correctness check failed: {label}: {diff:.3e} > {tol:.1e}; not timing")
    return diff


def build_variants(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, nn.Module]:
    """Four deep copies of `base` carrying the same adapter, checked to agree before timing."""
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    torch.manual_seed(1)
    unmerged = peftkit.inject(copy.deepcopy(base), peftkit.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False))
    merged = peftkit.merge(copy.deepcopy(unmerged))
    with tempfile.TemporaryDirectory() as tmp:
        peftkit.save_adapter(unmerged, tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp)
    # the base is timed as a deep copy too: a freshly loaded model may still read mmapped weight files
    variants = {"base": copy.deepcopy(base), "pk-merged": merged, "pk-unmerg": unmerged, "hf-unmerg": hf.eval()}
    n_layers = sum(isinstance(m, peftkit.LoraLayer) for m in unmerged.modules())
    print(f"  adapter: r={args.rank} alpha={2 * args.rank} targets={args.targets} -> {n_layers} LoRA layers")
    with torch.inference_mode():
        out = {k: logits(m, ids) for k, m in variants.items()}
        change = (out["pk-unmerg"] - out["base"]).abs().max().item()
        print(f"  adapter changes logits by max {change:.2e}")
        if change < 1e-3:
            raise SystemExit("the adapter does not change the output; the comparison would be meaningless")
        check("peftkit merged vs unmerged", out["pk-merged"], out["pk-unmerg"])
        check("peftkit unmerged vs HF PEFT unmerged", out["pk-unmerg"], out["hf-unmerg"])
        with peftkit.disable_adapters(unmerged):
            check("peftkit disabled vs base", logits(unmerged, ids), out["base"])
    return variants


def time_variants(variants: dict[str, nn.Module], ids: torch.Tensor, repeats: int,
                  warmup: int) -> dict[str, list[float]]:
    """Seconds per forward, per variant, measured round-robin with the start rotating every round."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for k in names:
                logits(variants[k], ids)
        gc.collect()
        gc.disable()
        try:
            for i in range(repeats):
                for k in names[i % len(names):] + names[:i % len(names)]:
                    t0 = time.perf_counter()
                    logits(variants[k], ids)
                    times[k].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return times


def overhead_ratio(times: dict[str, list[float]]) -> float | None:
    base = statistics.median(times["base"])
    d_pk, d_hf = statistics.median(times["pk-unmerg"]) - base, statistics.median(times["hf-unmerg"]) - base
    return d_pk / d_hf if d_hf > 0 else None


def bootstrap_overhead(times: dict[str, list[float]], n: int = 1000) -> tuple[float, float] | None:
    """5th-95th percentile of overhead_ratio over rounds resampled with replacement: how much is noise."""
    rng, rounds = random.Random(0), len(times["base"])
    stats = []
    for _ in range(n):
        pick = [rng.randrange(rounds) for _ in range(rounds)]
        stats.append(overhead_ratio({k: [v[i] for i in pick] for k, v in times.items()}))
    stats = sorted(x if x is not None else math.inf for x in stats)
    return (stats[n // 20], stats[n - n // 20 - 1]) if rounds >= 5 else None


def summarize(model: str, times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["base"]
    # paired: the median over rounds of (variant time / base time in that round), a second noise check
    paired = {k: statistics.median(t / b for t, b in zip(v, times["base"])) for k, v in times.items()}
    d_pk, d_hf = med["pk-unmerg"] - base, med["hf-unmerg"] - base
    return {
        "model": model,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratio_to_base": {k: v / base for k, v in med.items()},
        "paired_ratio_to_base": paired,
        "iqr_ms": {k: 1e3 * (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0])
                   for k, v in times.items()} if len(times["base"]) >= 2 else {},
        "merged_over_base": med["pk-merged"] / base,
        "pk_over_hf_unmerged": med["pk-unmerg"] / med["hf-unmerg"],
        "pk_overhead_over_hf_overhead": overhead_ratio(times),
        "pk_overhead_over_hf_overhead_90ci": bootstrap_overhead(times),
        "overhead_ms": {"peftkit": 1e3 * d_pk, "hf_peft": 1e3 * d_hf},
        "raw_ms": {k: [round(1e3 * t, 4) for t in v] for k, v in times.items()},
    }


def print_table(results: list[dict]) -> None:
    print(f"\n{'model':<8} | {'variant':<10} | {'median ms':>10} | {'IQR ms':>8} | {'ratio to base':>13} | "
          f"{'paired ratio':>12}")
    print("-" * 78)
    for r in results:
        for k in VARIANTS:
            print(f"{r['model']:<8} | {k:<10} | {r['median_ms'][k]:>10.3f} | {r['iqr_ms'].get(k, 0.0):>8.3f} | "
                  f"{r['ratio_to_base'][k]:>13.3f} | {r['paired_ratio_to_base'][k]:>12.3f}")
        print("-" * 78)
    for r in results:
        ovh = r["pk_overhead_over_hf_overhead"]
        ovh_s = "n/a (HF PEFT overhead <= 0, below noise)" if ovh is None else f"{ovh:.3f}"
        if ovh is not None and r["pk_overhead_over_hf_overhead_90ci"]:
            ovh_s += " (bootstrap 90%% interval %.2f-%.2f)" % r["pk_overhead_over_hf_overhead_90ci"]
        print(f"[{r['model']}] merged/base = {r['merged_over_base']:.3f} (target <= 1.02)")
        print(f"[{r['model']}] peftkit unmerged overhead / HF PEFT unmerged overhead = {ovh_s} (target <= 1.0)"
              f"   [overheads: peftkit {r['overhead_ms']['peftkit']:+.3f} ms, "
              f"HF PEFT {r['overhead_ms']['hf_peft']:+.3f} ms]")
        print(f"[{r['model']}] peftkit unmerged / HF PEFT unmerged = {r['pk_over_hf_unmerged']:.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated module names')
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per model (default: 60 for tiny, 15 for smollm2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 keeps torch's default (default 1: see the docstring)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"peftkit {peftkit.__version__} | peft {peft.__version__} | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"{platform.platform()} | {platform.processor() or platform.machine()} | "
          f"cpu_count={os.cpu_count()} | torch threads={torch.get_num_threads()}")
    print(f"batch={args.batch} seq={args.seq} rank={args.rank} targets={args.targets} warmup={args.warmup}")

    results = []
    for name in args.models.split(","):
        name = name.strip()
        print(f"\n== {name} ==")
        t0 = time.perf_counter()
        base = load(name)
        print(f"  loaded in {time.perf_counter() - t0:.1f}s; "
              f"{sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)
        variants = build_variants(base, ids, args)
        repeats = args.repeats or (60 if name == "tiny" else 15)
        t0 = time.perf_counter()
        times = time_variants(variants, ids, repeats, args.warmup)
        print(f"  timed {repeats} rounds x {len(variants)} variants in {time.perf_counter() - t0:.1f}s")
        results.append(summarize(name, times))
        del variants, base
        gc.collect()

    print_table(results)
    if args.json:
        meta = {"peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "peftkit": peftkit.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(), **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
