"""A run on disk: its directory, its checkpoints (the training state, saved and restored), the resume guard,
and the final result (the adapter in PEFT format, or the whole model for --method full)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import torch

from ..checkpoint import adapter_state_dict, save_adapter
from ..files import honour_umask
from . import checkpoints as ckpt
from . import distributed as dist_mod
from .method import method_state, restore_method_state, trains_whole_model
from .options import SAME_RUN, TrainOptions
from .run import Run


def output_dir(o: TrainOptions) -> Path:
    """--output-dir, else the run a --resume checkpoint path belongs to, else runs/<task>-<method>-<time>."""
    if o.output_dir:
        return Path(o.output_dir)
    if o.resume:
        checkpoint = Path(o.resume)
        if checkpoint.parent.name == "checkpoints":  # a checkpoint path names its run
            return checkpoint.parent.parent
        raise ValueError("--resume latest needs --output-dir naming the run to continue")
    name = "tickets" if o.builtin else Path(o.data).stem
    return Path("runs") / f"{name}-{o.method}-{datetime.now():%Y%m%d-%H%M%S}"


def with_run_lr(out: Path, o: TrainOptions) -> TrainOptions:
    """A resume that did not choose --lr continues at the run's own rate (run_options.json): a run started before
    its method's default rate changed resumes with the command that started it."""
    if o.lr_given:
        return o
    saved = json.loads((out / "run_options.json").read_text()).get("lr")
    if isinstance(saved, (int, float)) and not isinstance(saved, bool) and saved > 0 and saved != o.lr:
        return o.replace(lr=float(saved), lr_given=False)
    return o


def check_same_run(out: Path, o: TrainOptions) -> None:
    """Resuming with options that change the math would silently produce a different run: refuse it.
    Which options those are is declared on the options' fields (`same_run=True` in options.py)."""
    saved = json.loads((out / "run_options.json").read_text())
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(o, k)!r}" for k in SAME_RUN if saved.get(k) != getattr(o, k)]
    if changed:
        raise ValueError(f"--resume: these options differ from the run in {out}: " + "; ".join(changed)
                         + ". Resume with the run's own options (see run_options.json) or start a new --output-dir")


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded parameter (every rank must call it), or the tensor itself."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def save_checkpoint(run: Run, step: int) -> None:
    """A checkpoint: trainable params by name, optimizer, schedule, RNG, and a PEFT-format adapter copy.
    Every rank takes part (a sharded model's tensors are gathered); the main one writes."""
    o, dist, model = run.o, run.dist, run.model
    params = {n: full_tensor(p).detach() for n, p in run.named}
    if run.sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opt_state = get_optimizer_state_dict(model, run.optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                             cpu_offload=True))
    else:
        opt_state = run.optimizer.state_dict()
    if dist.is_main:
        state = {"step": step, "optimizer": opt_state, "scheduler": run.scheduler.state_dict(),
                 "rng": ckpt.capture_rng(), "exact_match_before": run.scorer.before, "world_size": dist.world_size,
                 "method": method_state(model, o)}
        no_adapter_copy = run.sharded or trains_whole_model(o)
        extra = None if no_adapter_copy else {"adapter": lambda p: save_adapter(model, p)}
        ckpt.save_checkpoint(run.out, step, params=params, trainer_state=state, extra_dirs=extra,
                             keep_last=o.keep_checkpoints)
    dist_mod.barrier(dist)


def restore_checkpoint(run: Run, path: Path) -> None:
    """Put a checkpoint's parameters, optimizer, schedule, RNG and the scorer's 'before' figure back into
    the run, and continue from its step."""
    params, state = ckpt.load_checkpoint(path)
    missing = sorted({n for n, _ in run.named} - set(params))
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {path} lacks parameters of this run: {', '.join(missing[:8])}; "
                                   "was it written with other --method/--r/--target-modules options?")
    with torch.no_grad():
        for n, p in run.named:
            src = params[n]
            if hasattr(p, "full_tensor"):  # FSDP: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(p.device), p.device_mesh, p.placements).to_local()
                p.to_local().copy_(src)
            else:
                p.copy_(src.to(p.device))
    if run.o.fsdp and hasattr(run.named[0][1], "full_tensor"):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    ckpt.restore_rng(state["rng"])
    restore_method_state(run.model, run.o, state.get("method", {}))
    run.start_step, run.scorer.before = int(state["step"]), state.get("exact_match_before")


def result_dir(run: Run) -> Path:
    """Where the result goes: <output-dir>/adapter, or <output-dir>/model for --method full."""
    return run.out / ("model" if trains_whole_model(run.o) else "adapter")


def save_result(run: Run) -> Path:
    """The adapter in PEFT format, or for --method full the whole model as a transformers directory.
    Every rank takes part (a sharded adapter is gathered first); the main one writes."""
    path = result_dir(run)
    tensors = {k: full_tensor(v) for k, v in adapter_state_dict(run.model).items()} if run.sharded else None
    if not run.dist.is_main:
        return path
    with ckpt.writing(path, "the model" if trains_whole_model(run.o) else "the adapter"):
        if not trains_whole_model(run.o):
            save_adapter(run.model, path, tensors=tensors)
        else:
            run.model.save_pretrained(path, state_dict=tensors)
            run.tokenizer.save_pretrained(path)
            honour_umask(path)  # safetensors makes 0600 files whatever the umask
    return path
