"""The training recipe's stages, in the order `loop.train` runs them (as torchtune's single-device recipe):

    setup:  run directory (and the resume guard) -> data files read and checked -> base model -> data
            tokenized -> adapter -> optimizer -> scorer -> resume or start
    loop:   (loop.py) one optimizer step per global batch; metrics, validation and checkpoints on schedule
    finish: final validation -> last checkpoint -> result (adapter or model) -> score -> summary

Each stage is a function of the options and what earlier stages built; `setup` runs them all and returns
the `Run`. The task's own score is a plug-in chosen at setup (scoring.py), and everything that depends on
the method is in method.py. Nothing here changes process-wide settings (process.py does, for the CLI).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from .. import adapters as adapter_api
from .. import precision, tracking
from . import checkpoints as ckpt
from . import data as data_mod
from . import distributed as dist_mod
from . import report, state, task
from .distributed import Dist
from .method import base_quantization, describe_method, inject_method
from .options import TrainOptions, effective_warmup
from .run import Run, TrainData
from .scoring import choose_scorer, validation_loss


def make_optimizer(params: list, lr: float, weight_decay: float, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for the parameters' device (CPU, CUDA):
    on a CPU with the 420 LoRA tensors of SmolLM2 that is 13 ms a step instead of 59. FSDP's sharded
    parameters keep the default implementation."""
    fused = not sharded and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_lambda(o: TrainOptions, total: int):
    """The learning-rate factor of each step: linear warm-up (`effective_warmup`'s length), then constant,
    linear or cosine decay."""
    warmup = effective_warmup(o, total)[0]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# --- setup ---------------------------------------------------------------------------------------------------------
def setup_run_dir(o: TrainOptions, dist: Dist) -> tuple[TrainOptions, Path, Path | None]:
    """(the options, with a resume's own lr when --lr was not chosen; the run directory; the checkpoint to resume
    from or None); refuses another run's directory, a resume without a checkpoint, and a resume with options that
    change the math."""
    out = state.output_dir(o)
    if dist.is_main:
        report.check_output_dir(out, resume=o.resume is not None, overwrite=o.overwrite)
    resume_from = ckpt.resolve_resume(out, o.resume) if o.resume else None
    if o.resume and resume_from is None:
        raise ckpt.CheckpointError(
            f"--resume {o.resume}: {out} holds no complete checkpoint (the run stopped before writing its first "
            f"one, which comes after --save-every steps), so there is nothing to continue from: rerun with "
            f"--overwrite instead of --resume to start it over ({out / 'checkpoints'} is empty or incomplete)")
    if resume_from is not None:
        o = state.with_run_lr(out, o)
        state.check_same_run(out, o)
        if dist.is_main and (out / "metrics.jsonl").is_file():  # a damaged log is refused now, not after loading
            report.read_metrics(out / "metrics.jsonl", warn=False)
    return o, out, resume_from


def setup_records(o: TrainOptions, dist: Dist) -> tuple[list, list | None]:
    """(the training chats, --val-data's or None), read and checked with the other things that need no model
    (the model's name, the batch split), so that a missing or malformed file stops the run in a second, not
    after the model has loaded. ([], None) for the built-in task, whose records need no file."""
    from ..models import ALIASES, resolve_model_dir

    if dist.is_main:
        tracking.check_installed(o.report_to)  # --report-to's libraries, before seconds of loading a model
    if o.model not in ALIASES and not (Path(o.model).is_file() and Path(o.model).suffix == ".gguf"):
        resolve_model_dir(o.model)  # a transformers directory, else an error saying which models are accepted
    if o.batch_size % (dist.world_size * o.grad_accum):
        raise ValueError(f"--batch-size {o.batch_size} must divide by processes x --grad-accum "
                         f"({dist.world_size} x {o.grad_accum})")
    if o.builtin:
        return [], None
    train = data_mod.to_chats(data_mod.read_records(o.data), str(o.data))
    val = data_mod.to_chats(data_mod.read_records(o.val_data), str(o.val_data)) if o.val_data else None
    return train, val


def resolve_precision(o: TrainOptions, dist: Dist) -> tuple[TrainOptions, precision.DtypeChoice]:
    """(the options with --dtype auto made the dtype it means on this process's device, the choice and why):
    run_options.json records the real dtype, so a resume on a machine where auto means another one is refused."""
    choice = precision.resolve_dtype(o.dtype, dist.device)
    return o.replace(dtype=choice.dtype), choice


def setup_model(o: TrainOptions, dist: Dist):
    """(the frozen base model on this process's device, its tokenizer)."""
    from ..models import load_model

    dtype = getattr(torch, o.dtype)
    quantize = base_quantization(o)
    model, tokenizer = load_model(o.model, dtype=dtype, quantize=quantize,
                                  compute_dtype=dtype if quantize else None)
    model.to(dist.device)
    return model, tokenizer


def _examples(o: TrainOptions, tokenizer, chats: tuple[list, list | None]
              ) -> tuple[list, list, data_mod.DataStats, list]:
    """(training examples, validation examples, statistics of the training data, the validation examples'
    chats: what the scorer asks the model, [] for the built-in task, whose scorer has its own tickets)."""
    if o.builtin:
        n = o.train_examples or o.batch_size * (o.max_steps or 40)
        records = task.train_records(n, seed=o.seed)
        val_records = task.train_records(max(8, o.batch_size), seed=o.seed + 10_000)
        train, stats = data_mod.build_examples(records, tokenizer, o.max_length, o.overflow, "built-in tickets")
        val, _ = data_mod.build_examples(val_records, tokenizer, o.max_length, o.overflow, "built-in validation")
        return train, val, stats, []
    train_chats, val_chats = chats
    train, stats = data_mod.tokenize_chats(train_chats, tokenizer, o.max_length, o.overflow, str(o.data))
    if not train:
        raise data_mod.DataError(f"{o.data}: no usable example ({stats.describe()}); raise --max-length or "
                                 "use --overflow truncate")
    if val_chats is not None:
        val, _ = data_mod.tokenize_chats(val_chats, tokenizer, o.max_length, o.overflow, str(o.val_data))
    else:
        train, val = data_mod.split_validation(train, o.val_fraction, o.seed) if len(train) > 1 else (train, [])
        val_chats = train_chats
    return train, val, stats, [val_chats[e.chat] for e in val]


def setup_data(o: TrainOptions, tokenizer, dist: Dist, chats: tuple[list, list | None]) -> TrainData:
    """Tokenized training and validation examples (from `setup_records`' chats) with the validation chats,
    and the global batch order."""
    train, val, stats, val_chats = _examples(o, tokenizer, chats)
    total_steps = o.max_steps or max(1, math.ceil(o.epochs * len(train) / o.batch_size))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TrainData(train, val, stats, pad_id, data_mod.BatchOrder(len(train), o.batch_size, o.seed), total_steps,
                     val_chats)


def setup_adapter(o: TrainOptions, model, dist: Dist) -> tuple[int, int]:
    """Inject the method's adapter from --seed, the same on every rank (sharded with --fsdp); the
    (trainable, total) parameter counts."""
    torch.manual_seed(o.seed)
    inject_method(model, o)
    if o.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable, total = adapter_api.trainable_parameters(model)
    dist_mod.broadcast_trainable(model, dist)
    if o.fsdp and dist.enabled:
        dist_mod.shard_frozen_base(model, dist)
    return trainable, total


def setup_optimizer(o: TrainOptions, model, dist: Dist, total_steps: int):
    """(the trainable parameters by name, AdamW over them, its learning-rate schedule); after sharding,
    which replaces the parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in named], o.lr, o.weight_decay, sharded=o.fsdp and dist.enabled)
    return named, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, total_steps))


def resume_or_start(run: Run) -> None:
    """Restore the checkpoint being resumed, or create the run directory and record the options."""
    if run.resume_from is not None:
        state.restore_checkpoint(run, run.resume_from)
        if run.dist.is_main:
            print(f"peftkit train: resuming {run.out} from {run.resume_from.name} (step {run.start_step})",
                  flush=True)
    elif run.dist.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        report.write_json(run.out / "run_options.json", run.o.to_dict())


def announce(run: Run) -> None:
    """The start-up lines: model, method, data, steps, processes, trainable share (main process only)."""
    if not run.dist.is_main:
        return
    o, d = run.o, run.data
    print(f"peftkit train: {o.model}, {describe_method(o)}; "
          f"data: {d.stats.describe()}; {len(d.val)} validation examples; {d.total_steps} steps of "
          f"{o.batch_size} on {run.dist.world_size} process(es), {run.dist.device}; warm-up "
          f"{effective_warmup(o, d.total_steps)[0]} steps", flush=True)
    note = effective_warmup(o, d.total_steps)[1]
    if note:
        print(f"peftkit train: {note}", file=sys.stderr if note.startswith("WARNING") else sys.stdout, flush=True)
    if o.lr_note():
        print(f"peftkit train: {o.lr_note()}", flush=True)
    print(f"peftkit train: trainable {run.trainable_params:,} of {run.total_params:,} parameters "
          f"({100 * run.trainable_params / run.total_params:.3f}%)", flush=True)
    if run.precision:
        print(f"peftkit train: base dtype {run.precision['dtype']} ({run.precision['dtype_reason']})", flush=True)


def setup(o: TrainOptions) -> Run:
    """Every setup stage in order: the run, ready for its first (or resumed) step."""
    dist = dist_mod.init_distributed(o.device)
    o, dtype_choice = resolve_precision(o, dist)
    o, out, resume_from = setup_run_dir(o, dist)
    chats = setup_records(o, dist)  # no model needed: data errors come before the seconds of loading one
    model, tokenizer = setup_model(o, dist)
    data = setup_data(o, tokenizer, dist, chats)
    trainable, total = setup_adapter(o, model, dist)
    named, optimizer, scheduler = setup_optimizer(o, model, dist, data.total_steps)
    scorer = choose_scorer(o, tokenizer, dist, data.val_chats)
    run = Run(o, dist, out, model, tokenizer, data, named, optimizer, scheduler, scorer, trainable, total, resume_from,
              precision=dtype_choice.as_dict())
    resume_or_start(run)
    announce(run)
    return run


def open_tracking(run: Run) -> tracking.Tracker:
    """The --report-to backends (docs/tracking.md), opened on the main process once run_options.json is written;
    a resumed run continues the tracking runs its tracking.json names. An empty tracker otherwise."""
    o = run.o
    if not (run.dist.is_main and o.report_to):
        return tracking.Tracker()
    info = tracking.RunInfo(run.out, run.out.resolve().name, o.to_dict(), o.experiment,
                            Path(o.tracking_dir) if o.tracking_dir else None,
                            run.start_step if run.resumed else None,
                            tracking.read_state(run.out) if run.resumed else {})
    return tracking.open_tracker(o.report_to, info)


# --- during the loop -----------------------------------------------------------------------------------------------
def validate(run: Run) -> float | None:
    """Validation loss per answer token (None without validation examples)."""
    return validation_loss(run.model, run.data.val, run.data.pad_id, run.dist.device, run.o.batch_size,
                           run.o.loss_chunk)


def save_checkpoint(run: Run, step: int) -> None:
    """A checkpoint of the run after `step` optimizer steps (every rank takes part)."""
    state.save_checkpoint(run, step)


# --- finish --------------------------------------------------------------------------------------------------------
def summarize(run: Run, metrics: report.Metrics, val_loss: float | None, train_seconds: float,
              started: float) -> dict:
    """summary.json's record of the run (main process)."""
    o, device = run.o, run.dist.device
    rows = [r for r in metrics.rows() if "tokens_per_s" in r]
    adapter_dir = state.result_dir(run)
    return {
        "output_dir": str(run.out), "adapter_dir": str(adapter_dir), "model": o.model, "method": o.method,
        "task": "built-in tickets" if o.builtin else str(o.data), "steps": run.data.total_steps,
        "warmup_steps": effective_warmup(o, run.data.total_steps)[0],
        **run.scorer.summary(),
        "val_loss_start": next((r["val_loss"] for r in metrics.rows() if r.get("step") == 0), None),
        "val_loss": val_loss, "final_loss": rows[-1]["loss"] if rows else None,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - started,
        "tokens_per_second": sum(r["tokens_per_s"] for r in rows) / max(len(rows), 1),
        "trainable_params": run.trainable_params, "total_params": run.total_params,
        "trainable_share": run.trainable_params / run.total_params,
        "adapter_bytes": report.dir_bytes(adapter_dir), "peak_memory_mb": report.peak_memory_mb(device),
        "memory_kind": "accelerator, allocated" if device.type == "cuda" else "resident set size",
        "processes": run.dist.world_size, "data": run.data.stats.describe(),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        **run.precision,
    }


def finish(run: Run, metrics: report.Metrics, train_seconds: float, started: float,
           tracker: tracking.Tracker | None = None) -> dict:
    """The finish stages: final validation, last checkpoint, result, the scorer's 'after', summary.json,
    loss_curve.png, the tracking runs' summary and files; then leave the process group. The summary on the main
    process, {} on the others."""
    tracker = tracker or tracking.Tracker()
    save_checkpoint(run, run.data.total_steps)  # first: a stop during the final validation or scoring loses no step
    val_loss = validate(run)
    state.save_result(run)
    run.scorer.after_training(run.model)
    summary = {}
    if run.dist.is_main:
        row = {"step": run.data.total_steps, "val_loss": val_loss, **run.scorer.final_metrics()}
        metrics.log(**row)
        tracker.log(row)
        report.plot_loss(metrics.rows(), run.out / "loss_curve.png", f"{run.o.model}, {describe_method(run.o)}")
        summary = summarize(run, metrics, val_loss, train_seconds, started)
        report.write_json(run.out / "summary.json", summary)
        result = state.result_dir(run)
        tracker.finish(summary, {result.name: result, **{name: run.out / name for name in (
            "loss_curve.png", "summary.json", "metrics.jsonl", "run_options.json")}})
    dist_mod.barrier(run.dist)
    dist_mod.cleanup(run.dist)
    return summary
