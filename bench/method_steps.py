"""One training step of each `peftkit train --method X`, side by side on the main job's model and batch.

Every method gets the adapter `peftkit train --method X` builds with its default options (through the method
registry: Method.config_from_options), on its own deep copy of the loaded SmolLM2-135M-Instruct, and the same
batch of 8 built-in-task tickets (max_length 256, as the main job). One step is what the trainer does: the
answer-only token loss (plus the method's extra loss term, e.g. AdaLoRA's orthogonality regularizer),
backward, the fused AdamW step, the method's after-step hook (AdaLoRA's rank allocator). Methods are timed
round-robin with the order rotating each round and compared by MEDIAN, relative to LoRA: on a shared machine
absolute seconds are noise, ratios are not.

Run:  python bench/method_steps.py [--methods lora,dora,...] [--steps 6] [--warmup 1] [--threads 1]
                                   [--model smollm2|tiny]
(the default: every registered method except qlora and full; about 10 minutes on the 2-core VM)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from peftkit import registry
from peftkit.precision import describe_machine
from peftkit.train import options as opts
from peftkit.train import task
from peftkit.train.data import build_examples, collate
from peftkit.train.loss import sum_token_loss
from peftkit.train.method import after_optimizer_step, inject_method, loss_extra
from peftkit.train.recipe import make_optimizer


def load(name: str):
    from peftkit.models import load_model

    if name == "smollm2":
        return load_model("smollm2")
    import transformers

    model, tokenizer = load_model("smollm2")  # the tiny model shares its tokenizer, so the task data fits
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), tokenizer


def the_batch(tokenizer, o: opts.TrainOptions) -> dict[str, torch.Tensor]:
    examples, stats = build_examples(task.train_records(o.batch_size, seed=o.seed), tokenizer, o.max_length)
    if stats.kept != o.batch_size:
        raise SystemExit(f"task data did not tokenize cleanly: {stats.describe()}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(examples, pad)


def stepper(base, o: opts.TrainOptions, batch: dict[str, torch.Tensor], total_steps: int):
    """(trainable share, one training step) for `o.method` on a deep copy of `base`."""
    model = copy.deepcopy(base)
    torch.manual_seed(o.seed)
    inject_method(model, o)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    share = sum(p.numel() for p in params) / sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(params, lr=o.lr, weight_decay=o.weight_decay)
    count = {"step": 0}

    def step() -> None:
        loss, n = sum_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], o.loss_chunk)
        extra = loss_extra(model, o)
        ((loss if extra is None else loss + extra * n) / n).backward()
        optimizer.step()
        after_optimizer_step(model, o, count["step"], total_steps)
        optimizer.zero_grad(set_to_none=True)
        count["step"] += 1

    return share, step


def race(steps: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            steps[k]()
    gc.collect()
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    default = [n for n in registry.train_names() if n not in registry.nf4_train_names()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(default), help=f"comma-separated (default: {','.join(default)})")
    p.add_argument("--steps", type=int, default=6, help="timed rounds (each method steps once per round)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "lora" not in methods:
        methods.insert(0, "lora")
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine()}; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    base, tokenizer = load(args.model)
    base.requires_grad_(False)
    total = args.warmup + args.steps
    steps, shares = {}, {}
    for name in methods:
        o = opts.build({**opts.BUILTIN_PRESET, "method": name})
        batch = the_batch(tokenizer, o)
        shares[name], steps[name] = stepper(base, o, batch, total)
    print(f"batch: {batch['input_ids'].shape[0]} tickets x {batch['input_ids'].shape[1]} tokens; "
          f"{args.steps} rounds after {args.warmup} warm-up, order rotating", flush=True)
    times = race(steps, args.steps, args.warmup)
    lora = statistics.median(times["lora"])
    print(f"\n{'method':<12}{'trainable':>11}{'median s/step':>15}{'vs lora':>9}")
    for name in methods:
        med = statistics.median(times[name])
        print(f"{name:<12}{100 * shares[name]:>10.3f}%{med:>15.2f}{med / lora:>8.2f}x")


if __name__ == "__main__":
    main()
