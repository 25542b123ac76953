"""The training loop behind `peftkit train` (and `peftkit.train.train(options)` from Python).

`train` reads like torchtune's single-device recipe: the setup stages (recipe.py), a short loop, the
finish stages. One optimizer step takes the global batch `BatchOrder.indices(step)`: a pure function of
(seed, step), so resuming needs only the step number. Each process takes its share, splits it into
`grad_accum` micro-batches, and divides each micro-batch's summed token loss by the token count of the
WHOLE global batch; after the gradient all-reduce every process holds exactly the gradient of one big
batch, so 1 process and N processes follow the same loss curve. Rank 0 writes everything.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from .. import tracking
from . import data as data_mod
from . import distributed as dist_mod
from . import recipe, report
from .checkpoints import checkpoint_path, latest_checkpoint
from .loss import sum_token_loss
from .method import after_optimizer_step, describe_method, inject_method, loss_extra
from .options import TrainOptions
from .recipe import lr_lambda, make_optimizer
from .run import Run
from .scoring import exact_match, validation_loss
from .stop import Stopped, StopRequests, agreed_signal

# names other modules and scripts import from here
__all__ = ["train", "train_step", "make_optimizer", "lr_lambda", "inject_method", "describe_method",
           "validation_loss", "exact_match"]


def train(o: TrainOptions, stop: StopRequests | None = None) -> dict:
    """Run training as the options say; returns the run summary (also written to summary.json) on the main
    process, {} on the others. It changes no process-wide setting (CPU threads, the allocator):
    `peftkit train` makes those first with `process.configure_process`. `stop` (an open `stop.StopRequests`, as
    `peftkit train` passes): a first Ctrl-C or SIGTERM during the step loop checkpoints the step under way and
    raises `stop.Stopped` (stop.py)."""
    started = time.perf_counter()
    run = recipe.setup(o)
    tracker = recipe.open_tracking(run)  # --report-to: every metrics row goes to metrics.jsonl and the tracker
    try:
        return _train(run, tracker, started, stop)
    except Stopped as stopped:  # KILLED; a stop outside the step loop still names the newest checkpoint
        tracker.close(stopped)
        newest = latest_checkpoint(run.out) if stopped.checkpoint is None else None
        if newest is not None:
            raise Stopped(stopped.signum, None, run.data.total_steps, newest, run.out) from None
        raise
    except BaseException as error:  # the tracking runs end FAILED (KILLED on Ctrl-C), not left running
        tracker.close(error)
        raise


def _train(run: Run, tracker: tracking.Tracker, started: float, stop: StopRequests | None = None) -> dict:
    """`train` after setup: the base's score, the step loop, the finish stages."""
    o = run.o
    run.scorer.before_training(run.model)
    metrics = report.Metrics(run.out / "metrics.jsonl", run.dist.is_main, run.start_step if run.resumed else None)
    if not run.resumed and run.data.val:  # where the curve starts: the base model's validation loss
        row = {"step": 0, "val_loss": recipe.validate(run)}
        metrics.log(**row)
        tracker.log(row)

    run.model.train()
    total = run.data.total_steps
    bar = _progress(o, run.dist.is_main, run.start_step, total)
    t_train = time.perf_counter()
    seconds_before = _prior_seconds(metrics) if run.resumed else 0.0
    with stop.graceful() if stop is not None else contextlib.nullcontext():
        for step in range(run.start_step, total):
            _stop_if_asked(run, stop, step, saved=step > run.start_step and _due(o.save_every, step, total), bar=bar)
            _one_step(run, step, metrics, tracker, bar, seconds_before, t_train)
        _stop_if_asked(run, stop, total, saved=False, bar=bar)
    if bar is not None:
        bar.close()
    return recipe.finish(run, metrics, seconds_before + time.perf_counter() - t_train, started, tracker)


def _one_step(run: Run, step: int, metrics: report.Metrics, tracker: tracking.Tracker, bar, seconds_before: float,
              t_train: float) -> None:
    """A step of the loop and what follows it: its metrics row, the progress bar, a periodic checkpoint."""
    o, total = run.o, run.data.total_steps
    t0 = time.perf_counter()
    result = train_step(run, step)
    dt = time.perf_counter() - t0
    row = {"step": step + 1, "loss": round(result.loss, 6), "lr": result.lr,
           "tokens_per_s": round(result.tokens / dt, 1),
           "memory_mb": round(report.peak_memory_mb(run.dist.device), 1),
           "epoch": round(run.data.order.epoch_of(step), 4), "grad_norm": result.grad_norm,
           "seconds": round(seconds_before + time.perf_counter() - t_train, 2)}
    if _due(o.eval_every, step + 1, total):
        row["val_loss"] = recipe.validate(run)
    metrics.log(**row)
    tracker.log(row)
    if bar is not None:
        bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / dt:.0f}", refresh=False)
        bar.update(1)
    if _due(o.save_every, step + 1, total):
        recipe.save_checkpoint(run, step + 1)


def _stop_if_asked(run: Run, stop: StopRequests | None, done: int, saved: bool, bar) -> None:
    """Before a step (and after the last): when any rank was signalled, write a checkpoint after the `done` steps
    finished so far (unless the periodic one just did, or nothing ran yet in this process) and raise Stopped.
    Without StopRequests (train() from Python, sweep trials; the same on every rank) there is nothing to agree on,
    so no collective is added to the step."""
    if stop is None:
        return
    signum = agreed_signal(stop, lambda v: dist_mod.reduce_max(v, run.dist))
    if not signum:
        return
    if bar is not None:
        bar.close()
    first = run.start_step
    if done > first and not saved:
        recipe.save_checkpoint(run, done)
    checkpoint = checkpoint_path(run.out, done) if done > first else run.resume_from  # None: nothing to resume yet
    raise Stopped(signum, done if checkpoint else first, run.data.total_steps, checkpoint, run.out)


@dataclass(frozen=True)
class StepResult:
    loss: float  # per answer token of the global batch
    tokens: int  # tokens of the global batch, padding excluded
    grad_norm: float | None  # before clipping; None without clipping
    lr: float  # the learning rate this step used


def train_step(run: Run, step: int) -> StepResult:
    """One optimizer step on the global batch of `step`, this process's share of it in micro-batches."""
    o, dist, params = run.o, run.dist, run.params
    chosen = [run.data.train[i] for i in run.data.order.indices(step)]
    norm = sum(_answer_tokens(e) for e in chosen)
    mine = data_mod.BatchOrder.shard(chosen, dist.rank, dist.world_size)
    loss_sum, tokens = 0.0, 0
    for micro in _micro_batches(mine, o.grad_accum):
        batch = {k: v.to(dist.device) for k, v in data_mod.collate(micro, run.data.pad_id).items()}
        loss, _ = sum_token_loss(run.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 o.loss_chunk)
        extra = loss_extra(run.model, o)  # a method's regularizer: once per step, shared out by answer tokens
        trained = loss if extra is None else loss + extra * sum(_answer_tokens(e) for e in micro)
        (trained * (dist.world_size / max(norm, 1))).backward()
        loss_sum += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    if dist.enabled and not o.fsdp:
        dist_mod.all_reduce_gradients(params, dist)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)) if o.max_grad_norm > 0 else None
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    after_optimizer_step(run.model, o, step, run.data.total_steps)
    run.optimizer.zero_grad(set_to_none=True)
    loss_value = dist_mod.reduce_mean(loss_sum, dist) * dist.world_size / max(norm, 1)
    tokens = int(dist_mod.reduce_mean(float(tokens), dist) * dist.world_size)
    return StepResult(loss_value, tokens, grad_norm, lr)


def _due(every: int, done: int, total: int) -> bool:
    """True when a periodic event (validation, checkpoint) falls after `done` steps; the last step has its own."""
    return bool(every) and done % every == 0 and done < total


def _answer_tokens(example: data_mod.Example) -> int:
    return sum(1 for y in example.labels[1:] if y != data_mod.IGNORE_INDEX)


def _micro_batches(examples: list, n: int) -> list[list]:
    size = math.ceil(len(examples) / n)
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def _progress(o: TrainOptions, main: bool, start: int, total: int):
    if not (main and o.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


def _prior_seconds(metrics: report.Metrics) -> float:
    rows = [r for r in metrics.rows() if "seconds" in r]
    return rows[-1]["seconds"] if rows else 0.0
