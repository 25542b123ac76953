"""The training loop behind `peftkit train` (and `peftkit.train.train(options)` from Python).

One optimizer step takes the global batch `BatchOrder.indices(step)`: a pure function of (seed, step),
so resuming needs only the step number. Each process takes its share, splits it into `grad_accum`
micro-batches, and divides each micro-batch's summed token loss by the token count of the WHOLE global
batch; after the gradient all-reduce every process holds exactly the gradient of one big batch, so
1 process and N processes follow the same loss curve. Rank 0 writes everything.
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime
from pathlib import Path

import torch

from .. import adapters as adapter_api
from ..checkpoint import adapter_state_dict, save_adapter
from ..config import LoraConfig
from ..inject import inject
from . import allocator, report, task
from . import checkpoints as ckpt
from . import data as data_mod
from . import distributed as dist_mod
from .loss import sum_token_loss
from .options import TrainOptions


def _output_dir(o: TrainOptions) -> Path:
    if o.output_dir:
        return Path(o.output_dir)
    if o.resume:
        checkpoint = Path(o.resume)
        if checkpoint.parent.name == "checkpoints":  # a checkpoint path names its run
            return checkpoint.parent.parent
        raise ValueError("--resume latest needs --output-dir naming the run to continue")
    name = "tickets" if o.builtin else Path(o.data).stem
    return Path("runs") / f"{name}-{o.method}-{datetime.now():%Y%m%d-%H%M%S}"


def _targets(spec: str):
    if spec == "all-linear" or any(c in spec for c in "*[]()\\|^$+?"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def inject_method(model, o: TrainOptions) -> None:
    """Put the adapter that --method names into the model (trainable, everything else frozen)."""
    if o.method in ("lora", "qlora", "dora"):
        inject(model, LoraConfig(r=o.r, lora_alpha=o.lora_alpha, lora_dropout=o.lora_dropout,
                                 target_modules=_targets(o.target_modules), use_rslora=o.use_rslora,
                                 use_dora=o.method == "dora"))
    elif o.method == "bottleneck":
        from ..methods.bottleneck import BottleneckConfig

        targets = None if o.target_modules == "all-linear" else _targets(o.target_modules)
        inject(model, BottleneckConfig(variant=o.variant, reduction_factor=o.reduction_factor,
                                       non_linearity=o.non_linearity, target_modules=targets))
    elif o.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif o.method == "prefix":
        from ..methods.prefix import PrefixConfig

        inject(model, PrefixConfig(num_virtual_tokens=o.num_virtual_tokens, projection_dim=o.prefix_projection))
    else:
        raise ValueError(f"method {o.method!r} is not available")


def make_optimizer(params: list, lr: float, weight_decay: float, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for the parameters' device (CPU, CUDA):
    on a CPU with the 420 LoRA tensors of SmolLM2 that is 13 ms a step instead of 59. FSDP's sharded
    parameters keep the default implementation."""
    fused = not sharded and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def describe_method(o: TrainOptions) -> str:
    if o.method == "bottleneck":
        return f"bottleneck ({o.variant}, reduction {o.reduction_factor}, {o.non_linearity})"
    if o.method == "prefix":
        return f"prefix tuning ({o.num_virtual_tokens} virtual tokens)"
    if o.method == "full":
        return "full fine-tuning"
    return f"{o.method} r={o.r} on {o.target_modules}"


def lr_lambda(o: TrainOptions, total: int):
    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _load_data(o: TrainOptions, tokenizer):
    """(train examples, validation examples, eval tickets or None, stats text)."""
    if o.builtin:
        n = o.train_examples or o.batch_size * (o.max_steps or 40)
        records = task.train_records(n, seed=o.seed)
        val_records = task.train_records(max(8, o.batch_size), seed=o.seed + 10_000)
        train, stats = data_mod.build_examples(records, tokenizer, o.max_length, o.overflow, "built-in tickets")
        val, _ = data_mod.build_examples(val_records, tokenizer, o.max_length, o.overflow, "built-in validation")
        return train, val, task.eval_set(o.eval_examples), stats
    records = data_mod.read_records(o.data)
    train, stats = data_mod.build_examples(records, tokenizer, o.max_length, o.overflow, str(o.data))
    if not train:
        raise data_mod.DataError(f"{o.data}: no usable example ({stats.describe()}); raise --max-length or "
                                 "use --overflow truncate")
    if o.val_data:
        val, _ = data_mod.build_examples(data_mod.read_records(o.val_data), tokenizer, o.max_length, o.overflow,
                                         str(o.val_data))
    else:
        train, val = data_mod.split_validation(train, o.val_fraction, o.seed) if len(train) > 1 else (train, [])
    return train, val, None, stats


def _answer_tokens(example: data_mod.Example) -> int:
    return sum(1 for y in example.labels[1:] if y != data_mod.IGNORE_INDEX)


def _micro_batches(examples: list, n: int) -> list[list]:
    size = math.ceil(len(examples) / n)
    return [examples[i:i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def validation_loss(model, examples: list, pad_id: int, device, batch_size: int, chunk: int) -> float | None:
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in data_mod.collate(examples[i:i + batch_size], pad_id).items()}
        loss, n = sum_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def exact_match(model, tokenizer, tickets: list[task.Ticket], progress: bool, label: str) -> float:
    from .evaluate import greedy_exact_match

    was_training = model.training
    model.eval()
    if progress:
        print(f"peftkit train: scoring {len(tickets)} held-out tickets ({label}) ...", flush=True)
    score, _ = greedy_exact_match(model, tokenizer, [t.messages(with_answer=False) for t in tickets],
                                  [t.answer for t in tickets], progress=progress)
    model.train(was_training)
    return score


def train(o: TrainOptions) -> dict:
    """Run training as the options say; returns the run summary (also written to summary.json)."""
    from ..models import load_model

    started = time.perf_counter()
    dist = dist_mod.init_distributed(o.device)
    if o.threads:
        torch.set_num_threads(o.threads)
    elif dist.enabled and dist.device.type == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    if dist.device.type == "cpu":  # resident memory then follows the live tensors (allocator.py says why)
        allocator.release_freed_memory()
    out = _output_dir(o)
    main = dist.is_main
    if main:
        report.check_output_dir(out, resume=o.resume is not None, overwrite=o.overwrite)
    resume_from = ckpt.resolve_resume(out, o.resume) if o.resume else None
    if o.resume and resume_from is None:
        raise ckpt.CheckpointError(f"--resume {o.resume}: no complete checkpoint in {out / 'checkpoints'}")
    if resume_from is not None:
        _check_same_run(out, o)

    dtype = getattr(torch, o.dtype)
    model, tokenizer = load_model(o.model, dtype=dtype, quantize="nf4" if o.method == "qlora" else None,
                                  compute_dtype=dtype if o.method == "qlora" else None)
    model.to(dist.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_ex, val_ex, tickets, stats = _load_data(o, tokenizer)
    global_batch = o.batch_size
    if global_batch % (dist.world_size * o.grad_accum):
        raise ValueError(f"--batch-size {global_batch} must divide by processes x --grad-accum "
                         f"({dist.world_size} x {o.grad_accum})")
    total_steps = o.max_steps or max(1, math.ceil(o.epochs * len(train_ex) / global_batch))
    order = data_mod.BatchOrder(len(train_ex), global_batch, o.seed)

    torch.manual_seed(o.seed)
    inject_method(model, o)
    if o.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained, total = adapter_api.trainable_parameters(model)
    dist_mod.broadcast_trainable(model, dist)
    if o.fsdp and dist.enabled:
        dist_mod.shard_frozen_base(model, dist)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(params, o.lr, o.weight_decay, sharded=o.fsdp and dist.enabled)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_steps))

    start_step, before = 0, None
    if resume_from is not None:
        start_step, before = _restore(resume_from, model, named, optimizer, scheduler, o)
        if main:
            print(f"peftkit train: resuming {out} from {resume_from.name} (step {start_step})", flush=True)
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(out / "run_options.json", o.to_dict())
    if main:
        print(f"peftkit train: {o.model}, {describe_method(o)}; "
              f"data: {stats.describe()}; {len(val_ex)} validation examples; {total_steps} steps of "
              f"{global_batch} on {dist.world_size} process(es), {dist.device}", flush=True)
        print(f"peftkit train: trainable {trained:,} of {total:,} parameters ({100 * trained / total:.3f}%)",
              flush=True)
    if tickets is not None and o.score_base and before is None and (main or (o.fsdp and dist.enabled)):
        with adapter_api.disable_adapters(model):
            before = exact_match(model, tokenizer, tickets, o.progress and main, "base model")
        if main:
            print(f"peftkit train: base model exact match {100 * before:.0f}%", flush=True)
    metrics = report.Metrics(out / "metrics.jsonl", main, start_step if resume_from else None)

    model.train()
    bar = _progress(o, main, start_step, total_steps)
    t_train, tokens_seen = time.perf_counter(), 0
    train_seconds_before = _prior_seconds(metrics) if resume_from else 0.0
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        chosen = [train_ex[i] for i in order.indices(step)]
        norm = sum(_answer_tokens(e) for e in chosen)
        mine = data_mod.BatchOrder.shard(chosen, dist.rank, dist.world_size)
        loss_sum, step_tokens = 0.0, 0
        for micro in _micro_batches(mine, o.grad_accum):
            batch = {k: v.to(dist.device) for k, v in data_mod.collate(micro, pad_id).items()}
            loss, _ = sum_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     o.loss_chunk)
            (loss * (dist.world_size / max(norm, 1))).backward()
            loss_sum += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if dist.enabled and not o.fsdp:
            dist_mod.all_reduce_gradients(params, dist)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)) if o.max_grad_norm > 0 else None
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = dist_mod.reduce_mean(loss_sum, dist) * dist.world_size / max(norm, 1)
        step_tokens = int(dist_mod.reduce_mean(float(step_tokens), dist) * dist.world_size)
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr, "tokens_per_s": round(step_tokens / dt, 1),
               "memory_mb": round(report.peak_memory_mb(dist.device), 1), "epoch": round(order.epoch_of(step), 4),
               "grad_norm": grad_norm, "seconds": round(train_seconds_before + time.perf_counter() - t_train, 2)}
        if o.eval_every and (step + 1) % o.eval_every == 0 and step + 1 < total_steps:
            row["val_loss"] = validation_loss(model, val_ex, pad_id, dist.device, o.batch_size, o.loss_chunk)
        metrics.log(**row)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{step_tokens / dt:.0f}", refresh=False)
            bar.update(1)
        if o.save_every and (step + 1) % o.save_every == 0 and step + 1 < total_steps:
            _save(out, step + 1, model, named, optimizer, scheduler, before, o, dist)
    if bar is not None:
        bar.close()
    train_seconds = train_seconds_before + time.perf_counter() - t_train

    val_loss = validation_loss(model, val_ex, pad_id, dist.device, o.batch_size, o.loss_chunk)
    adapter_dir = out / ("model" if o.method == "full" else "adapter")
    _save(out, total_steps, model, named, optimizer, scheduler, before, o, dist)
    sharded = o.fsdp and dist.enabled
    gathered = {k: _full(v) for k, v in adapter_state_dict(model).items()} if sharded else None
    if main:
        _write_result(model, tokenizer, adapter_dir, o, gathered)
    after = None
    if tickets and (main or sharded):  # a sharded model needs every process in each forward pass
        after = exact_match(model, tokenizer, tickets, o.progress and main, "trained adapter")
    summary = None
    if main:
        metrics.log(step=total_steps, val_loss=val_loss, **({"exact_match": after} if after is not None else {}))
        report.plot_loss(metrics.rows(), out / "loss_curve.png", f"{o.model}, {describe_method(o)}")
        rows = [r for r in metrics.rows() if "tokens_per_s" in r]
        summary = {
            "output_dir": str(out), "adapter_dir": str(adapter_dir), "model": o.model, "method": o.method,
            "task": "built-in tickets" if o.builtin else str(o.data), "steps": total_steps,
            "exact_match_before": before, "exact_match_after": after, "eval_examples": len(tickets or []),
            "val_loss": val_loss, "final_loss": rows[-1]["loss"] if rows else None,
            "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started,
            "tokens_per_second": sum(r["tokens_per_s"] for r in rows) / max(len(rows), 1),
            "trainable_params": trained, "total_params": total, "trainable_share": trained / total,
            "adapter_bytes": report.dir_bytes(adapter_dir), "peak_memory_mb": report.peak_memory_mb(dist.device),
            "memory_kind": "accelerator, allocated" if dist.device.type == "cuda" else "resident set size",
            "processes": dist.world_size, "data": stats.describe(),
        }
        report.write_json(out / "summary.json", summary)
    dist_mod.barrier(dist)
    dist_mod.cleanup(dist)
    return summary or {}


def _progress(o: TrainOptions, main: bool, start: int, total: int):
    if not (main and o.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


def _prior_seconds(metrics: report.Metrics) -> float:
    rows = [r for r in metrics.rows() if "seconds" in r]
    return rows[-1]["seconds"] if rows else 0.0


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _save(out: Path, step: int, model, named, optimizer, scheduler, before, o: TrainOptions, dist) -> None:
    """A checkpoint: trainable params by name, optimizer, schedule, RNG, and a PEFT-format adapter copy."""
    params = {n: _full(p).detach() for n, p in named}
    if o.fsdp and dist.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opt_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                         cpu_offload=True))
    else:
        opt_state = optimizer.state_dict()
    if dist.is_main:
        state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(), "rng": ckpt.capture_rng(),
                 "exact_match_before": before, "world_size": dist.world_size}
        no_adapter_copy = (o.fsdp and dist.enabled) or o.method == "full"
        extra = None if no_adapter_copy else {"adapter": lambda p: save_adapter(model, p)}
        ckpt.save_checkpoint(out, step, params=params, trainer_state=state, extra_dirs=extra,
                             keep_last=o.keep_checkpoints)
    dist_mod.barrier(dist)


def _write_result(model, tokenizer, path: Path, o: TrainOptions, tensors: dict | None) -> None:
    """The adapter in PEFT format, or for --method full the whole model as a transformers directory."""
    if o.method != "full":
        save_adapter(model, path, tensors=tensors)
        return
    model.save_pretrained(path, state_dict=tensors)
    tokenizer.save_pretrained(path)


def _restore(path: Path, model, named, optimizer, scheduler, o: TrainOptions) -> tuple[int, float | None]:
    params, state = ckpt.load_checkpoint(path)
    missing = sorted({n for n, _ in named} - set(params))
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks parameters of this run: {', '.join(missing[:8])}; "
                                   "was it written with other --method/--r/--target-modules options?")
    with torch.no_grad():
        for n, p in named:
            src = params[n]
            if hasattr(p, "full_tensor"):  # FSDP: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements).to_local()
                p.to_local().copy_(src)
            else:
                p.copy_(src.to(p.device))
    if o.fsdp and hasattr(named[0][1], "full_tensor"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.restore_rng(state["rng"])
    return int(state["step"]), state.get("exact_match_before")


_SAME_RUN = ("model", "data", "method", "r", "lora_alpha", "target_modules", "use_rslora", "variant",
             "reduction_factor", "non_linearity", "num_virtual_tokens", "prefix_projection", "batch_size", "seed",
             "max_length", "lr", "schedule", "warmup_steps", "max_steps", "epochs", "grad_accum",
             "train_examples", "val_fraction", "val_data", "overflow", "weight_decay", "lora_dropout")


def _check_same_run(out: Path, o: TrainOptions) -> None:
    """Resuming with options that change the math would silently produce a different run: refuse it."""
    import json

    saved = json.loads((out / "run_options.json").read_text())
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(o, k)!r}" for k in _SAME_RUN if saved.get(k) != getattr(o, k)]
    if changed:
        raise ValueError(f"--resume: these options differ from the run in {out}: " + "; ".join(changed)
                         + ". Resume with the run's own options (see run_options.json) or start a new --output-dir")
