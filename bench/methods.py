"""peftkit's methods side by side: size, forward latency and a short training run, one table per model.

For one model (SmolLM2-135M-Instruct by default; --models tiny: a small random Llama built from a config,
with SmolLM2's tokenizer) each variant is a deep copy of one loaded base with its adapter injected:
    base        the plain transformers model
    lora-merg   LoRA r=16, alpha=32, all-linear, merged into the base (peftkit.merge)
    lora        the same LoRA adapter, applied in the forward pass
    dora        LoRA with use_dora=True (unmerged)
    houlsby     bottleneck adapter after attention and feed-forward blocks, reduction_factor 16, relu
    pfeiffer    bottleneck adapter after the feed-forward block only
    prefix      prefix tuning, 20 virtual tokens per layer
Columns:
  trainable %  trainable / total parameters after injection (peftkit.trainable_parameters)
  file         bytes of the directory peftkit.save_adapter writes (adapter_config.json + safetensors)
  fwd ratio    forward latency, batch 1 x --seq tokens, torch.inference_mode(), relative to the base. For
               timing every adapter is made NON-zero (small Gaussian noise added to its trainable tensors,
               checked to change the logits; merged LoRA checked to equal unmerged), variants are timed
               round-robin with the order rotating each round so drift on a shared machine hits all alike,
               and MEDIANS are compared: absolute times are noise.
  eval loss    mean answer-token loss (peftkit.train.loss.sum_token_loss) on 16 held-out tickets of the
               built-in task, after --train-steps AdamW steps of batch 4 on train_records(...) from the
               standard (zero-delta) init, the same batches for every variant, at a per-method learning rate
               (LR below). The base's loss is the reference; lora-merg is the lora row's adapter (not retrained).
Threads default to 1: two OpenMP threads on the 2-core shared VMs are slower and far noisier.
The tiny model is a smoke test: its forward is dominated by the 49,152-token output head (it must share
SmolLM2's tokenizer to train on the task), which dilutes every adapter's latency ratio; its losses start
near ln(49152) = 10.8 because its weights are random.

Run:  python bench/methods.py [--models smollm2|tiny] [--seq 128] [--repeats N] [--train-steps 8]
                              [--threads 1] [--skip-train] [--json out.json]
(smollm2: about 10 minutes on the 2-core VM, most of it training; tiny: about a minute)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch import nn

import peftkit
from peftkit.train import task
from peftkit.train.data import build_examples, collate
from peftkit.train.loss import sum_token_loss

VARIANTS = ("base", "lora-merg", "lora", "dora", "houlsby", "pfeiffer", "prefix")
LR = {"lora": 2e-3, "dora": 2e-3, "houlsby": 1e-3, "pfeiffer": 1e-3, "prefix": 1e-2}
BATCH, EVAL_TICKETS, MAX_LENGTH, NOISE = 4, 16, 256, 0.02


def config_for(variant: str):
    if variant in ("lora", "lora-merg", "dora"):
        return peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=variant == "dora")
    if variant in ("houlsby", "pfeiffer"):
        return peftkit.BottleneckConfig(variant=variant, reduction_factor=16, non_linearity="relu")
    if variant == "prefix":
        return peftkit.PrefixConfig(num_virtual_tokens=20)
    raise ValueError(variant)


def load(name: str) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer). The tiny model shares SmolLM2's tokenizer, so the task data fits it."""
    from peftkit.models import load_model, resolve_model_dir

    if name == "smollm2":
        model, tokenizer = load_model("smollm2")
        return model.eval(), tokenizer
    if name == "tiny":
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir("smollm2"))
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=len(tokenizer),
                                       max_position_embeddings=1024, tie_word_embeddings=True)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).eval(), tokenizer
    raise SystemExit(f"unknown model {name!r}; choose from smollm2, tiny")


def injected(base: nn.Module, variant: str, seed: int = 1) -> nn.Module:
    """A deep copy of `base` with the variant's adapter at its standard init (the base itself for "base")."""
    model = copy.deepcopy(base)
    if variant != "base":
        torch.manual_seed(seed)
        peftkit.inject(model, config_for(variant))
    return model


def adapter_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        peftkit.save_adapter(model, tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def build_variants(base: nn.Module, ids: torch.Tensor) -> tuple[dict[str, nn.Module], dict[str, dict]]:
    """The timed models (adapters perturbed to be non-zero) and each variant's size figures."""
    models: dict[str, nn.Module] = {}
    sizes: dict[str, dict] = {}
    for variant in VARIANTS:
        if variant == "lora-merg":
            continue  # made from the perturbed "lora" below, so both carry the identical adapter
        model = injected(base, variant)
        trainable, total = peftkit.trainable_parameters(model)
        sizes[variant] = {"trainable": trainable, "total": total,
                          "share_pct": 100 * trainable / total if variant != "base" else 0.0,
                          "file_bytes": adapter_bytes(model) if variant != "base" else None}
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(NOISE * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        models[variant] = model.eval()
    models["lora-merg"] = peftkit.merge(copy.deepcopy(models["lora"]))
    sizes["lora-merg"] = dict(sizes["lora"])
    models = {k: models[k] for k in VARIANTS}
    with torch.inference_mode():
        out = {k: logits(m, ids) for k, m in models.items()}
    for k in VARIANTS[1:]:
        change = (out[k] - out["base"]).abs().max().item()
        print(f"  {k:<9} changes logits by max {change:.2e}")
        if change < 1e-3:
            raise SystemExit(f"the {k} adapter does not change the output; timing it would prove nothing")
    diff = (out["lora-merg"] - out["lora"]).abs().max().item()
    tol = max(1e-4, 2e-5 * out["lora"].abs().max().item())
    print(f"  lora merged vs unmerged: max|diff| = {diff:.2e} (tol {tol:.1e})")
    if diff > tol:
        raise SystemExit("merged LoRA does not match unmerged LoRA; not timing")
    return models, sizes


def time_variants(models: dict[str, nn.Module], ids: torch.Tensor, repeats: int, warmup: int) -> dict[str, list]:
    """Seconds per forward, per variant, round-robin with the starting variant rotating every round."""
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for k in names:
                logits(models[k], ids)
        gc.collect()
        gc.disable()
        try:
            for i in range(repeats):
                for k in names[i % len(names):] + names[:i % len(names)]:
                    t0 = time.perf_counter()
                    logits(models[k], ids)
                    times[k].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return times


def mean_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean next-token loss over all answer tokens of `batches`."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            s, n = sum_token_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
            total, count = total + s.item(), count + n
    return total / count


def train(model: nn.Module, batches: list[dict], lr: float) -> tuple[list[float], list[float]]:
    """AdamW steps on the trainable parameters, one per batch: (per-step losses, per-step seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, seconds = [], []
    for b in batches:
        t0 = time.perf_counter()
        s, n = sum_token_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    model.eval()
    return losses, seconds


def batches_of(records: list[dict], tokenizer) -> list[dict]:
    examples, stats = build_examples(records, tokenizer, MAX_LENGTH)
    if stats.kept != len(records):
        raise SystemExit(f"task data did not tokenize cleanly: {stats.describe()}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [collate(examples[i:i + BATCH], pad) for i in range(0, len(examples), BATCH)]


def run_training(base: nn.Module, tokenizer, steps: int) -> dict[str, dict]:
    train_batches = batches_of(task.train_records(steps * BATCH, seed=0), tokenizer)
    eval_batches = batches_of([{"messages": t.messages()} for t in task.eval_set(EVAL_TICKETS)], tokenizer)
    tokens = sum(int(b["attention_mask"].sum()) for b in train_batches) / (steps * BATCH)
    print(f"  training: {steps} steps x batch {BATCH} (mean {tokens:.0f} tokens/example); "
          f"eval: {EVAL_TICKETS} held-out tickets")
    results = {"base": {"eval_loss": mean_loss(copy.deepcopy(base), eval_batches)}}
    for variant in ("lora", "dora", "houlsby", "pfeiffer", "prefix"):
        model = injected(base, variant)
        t0 = time.perf_counter()
        losses, seconds = train(model, train_batches, LR[variant])
        results[variant] = {"eval_loss": mean_loss(model, eval_batches), "lr": LR[variant], "train_losses": losses,
                            "median_step_s": statistics.median(seconds)}
        print(f"  {variant:<9} lr {LR[variant]:.0e}: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
              f"eval loss {results[variant]['eval_loss']:.3f} ({time.perf_counter() - t0:.0f}s)")
        del model
        gc.collect()
    return results


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def print_table(r: dict) -> None:
    head = (f"{'variant':<10} | {'trainable %':>11} | {'file':>10} | {'fwd ms':>8} | {'fwd ratio':>9} | "
            f"{'paired':>6} | {'lr':>5} | {'eval loss':>9}")
    print(f"\n[{r['model']}] forward batch 1 x {r['seq']} tokens, {r['repeats']} round-robin rounds; "
          f"training {r['train_steps']} steps x batch {BATCH}")
    print(head)
    print("-" * len(head))
    for k in VARIANTS:
        s, t, tr = r["sizes"][k], r["timing"][k], r["training"].get(k, {})
        share = "-" if k == "base" else f"{s['share_pct']:.3f}"
        lr = f"{tr['lr']:.0e}" if "lr" in tr else "-"
        loss = f"{tr['eval_loss']:.3f}" if "eval_loss" in tr else "-"
        if k == "lora-merg" and r["training"]:
            loss = "= lora"
        print(f"{k:<10} | {share:>11} | {fmt_bytes(s['file_bytes']):>10} | {t['median_ms']:>8.2f} | "
              f"{t['ratio']:>9.3f} | {t['paired']:>6.3f} | {lr:>5} | {loss:>9}")
    print("notes: trainable % = trainable / all parameters after injection; file = bytes written by save_adapter;"
          "\n       fwd ratio = median variant time / median base time; paired = median over rounds of the same"
          "\n       ratio within one round; lr = AdamW learning rate (LoRA/DoRA 2e-3, bottleneck 1e-3, prefix 1e-2),"
          "\n       weight decay 0; eval loss = mean answer-token cross-entropy on 16 held-out tickets, from the"
          "\n       standard init (base: no adapter, no training). lora-merg carries the lora row's adapter.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2", help="smollm2 or tiny (comma-separated for both)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 30 for tiny, 15 for smollm2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--skip-train", action="store_true", help="sizes and latency only")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"peftkit {peftkit.__version__} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"{platform.platform()} | cpu_count={os.cpu_count()} | torch threads={torch.get_num_threads()}")

    results = []
    for name in (n.strip() for n in args.models.split(",")):
        print(f"\n== {name} ==")
        base, tokenizer = load(name)
        print(f"  {sum(q.numel() for q in base.parameters()) / 1e6:.1f}M parameters")
        ids = torch.randint(0, base.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
        models, sizes = build_variants(base, ids)
        repeats = args.repeats or (30 if name == "tiny" else 15)
        t0 = time.perf_counter()
        times = time_variants(models, ids, repeats, args.warmup)
        print(f"  timed {repeats} rounds x {len(models)} variants in {time.perf_counter() - t0:.1f}s")
        del models
        gc.collect()
        med = {k: statistics.median(v) for k, v in times.items()}
        timing = {k: {"median_ms": 1e3 * med[k], "ratio": med[k] / med["base"],
                      "paired": statistics.median(t / b for t, b in zip(times[k], times["base"])),
                      "raw_ms": [round(1e3 * t, 4) for t in times[k]]} for k in VARIANTS}
        training = {} if args.skip_train else run_training(base, tokenizer, args.train_steps)
        results.append({"model": name, "seq": args.seq, "repeats": repeats, "train_steps": args.train_steps,
                        "sizes": sizes, "timing": timing, "training": training})
        print_table(results[-1])
        del base
        gc.collect()
    if args.json:
        meta = {"torch": torch.__version__, "transformers": transformers.__version__, "peftkit": peftkit.__version__,
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                "lr": LR, "batch": BATCH, "eval_tickets": EVAL_TICKETS, "noise_std": NOISE,
                **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
