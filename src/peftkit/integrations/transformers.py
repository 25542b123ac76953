"""Train a peftkit-injected model with transformers' `Trainer` or TRL's `SFTTrainer`, keeping adapter-only
checkpoints in HF PEFT's format.

    peftkit.inject(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="runs/x", save_steps=50), train_dataset=ds,
                         processing_class=tokenizer)
    use_peftkit(trainer, lean_loss=True)     # adapter-only checkpoints, resume from them, lean loss
    trainer.train()                          # or trainer.train(resume_from_checkpoint=True)
    trainer.save_model()                     # runs/x: adapter_config.json + adapter_model.safetensors

Why a helper and not only a callback: Trainer writes each checkpoint's weights (`save_model` -> `_save` ->
the model's `save_pretrained`: the whole model, 140 GB for a 70B base) before any callback event fires, and
`train(resume_from_checkpoint=...)` loads the weights (`_load_from_checkpoint`) before the first one; for a
model that is not a `peft.PeftModel` it finds no whole-model file in an adapter-only folder and fails. So
`use_peftkit` gives this one trainer object its own `_save`, `_load_from_checkpoint` and `_load_best_model`
(composition: no Trainer subclass, the model is not touched), and adds `PeftkitAdapterCallback`.

`PeftkitAdapterCallback` alone (`Trainer(..., callbacks=[PeftkitAdapterCallback()])`) also keeps every
checkpoint adapter-only and writes the final adapter at the end of training, but only by deleting the
whole-model files after Trainer wrote them, and resuming still needs `use_peftkit`.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

from ..checkpoint import save_adapter
from ..files import CONFIG_NAME, WEIGHTS_NAME
from .adapter_state import check_trains_adapter, restore_adapter, training_adapter
from .trainer_loss import lean_compute_loss

__all__ = ["PeftkitAdapterCallback", "use_peftkit", "lean_compute_loss", "restore_adapter"]

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes beside the weights
# What `save_pretrained` writes for the whole model: weights (single file or shards + index) and its config.
WHOLE_MODEL_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                     "pytorch_model.bin.index.json", "config.json", "generation_config.json")


def _whole_model_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WHOLE_MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


class PeftkitAdapterCallback(TrainerCallback):
    """Adapter-only checkpoints for a Trainer training a peftkit adapter.

    - train begin: refuses to start unless exactly the adapter's weights train (anything else that trained
      would be lost from every checkpoint) and the adapter is not frozen;
    - each save: the checkpoint folder holds the adapter in PEFT format (adapter_config.json +
      adapter_model.safetensors, loadable by `PeftModel.from_pretrained` and `peftkit.load_adapter`) and no
      whole-model weights (deleted, with a warning, when a trainer without `use_peftkit` wrote them);
    - train end: writes the final adapter to `args.output_dir`.

    `adapter`: the adapter's name (default: the model's one active adapter)."""

    def __init__(self, adapter: str | None = None) -> None:
        self.adapter = adapter
        self.warned = False

    def _name(self, model: nn.Module) -> str:
        self.adapter = training_adapter(model, self.adapter)
        return self.adapter

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Check that the adapter, and only it, trains."""
        if model is None:
            raise ValueError("PeftkitAdapterCallback needs the trainer's model; use it with transformers.Trainer")
        check_trains_adapter(model, self._name(model))

    def on_save(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Make the new checkpoint folder adapter-only."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not args.should_save or model is None or not folder.is_dir():
            return
        if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
            save_adapter(model, folder, self._name(model))
        whole = _whole_model_files(folder)
        if whole:
            size = sum(p.stat().st_size for p in whole) / 2**20
            for path in whole:
                path.unlink()
            if not self.warned:
                self.warned = True
                warnings.warn(f"the trainer wrote the whole model ({size:.0f} MiB) into {folder}; "
                              "PeftkitAdapterCallback deleted it and kept the adapter. Call "
                              "peftkit.integrations.transformers.use_peftkit(trainer) to keep it from being written "
                              "at all (and to resume from these checkpoints)", stacklevel=2)

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Write the final adapter to args.output_dir."""
        if args.should_save and model is not None:
            save_adapter(model, args.output_dir, self._name(model))


class AdapterCheckpoints:
    """The save and load hooks `use_peftkit` gives one trainer: adapter in, adapter out, nothing else."""

    def __init__(self, trainer: Any, adapter: str) -> None:
        self.trainer, self.adapter = trainer, adapter

    def model(self) -> nn.Module:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer._save: the adapter (PEFT format), the tokenizer and the training arguments; never the base."""
        trainer = self.trainer
        if not trainer.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else trainer.args.output_dir
        save_adapter(self.model(), output_dir, self.adapter)
        saver = trainer.processing_class or getattr(trainer.data_collator, "tokenizer", None)
        if saver is not None:
            saver.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def load(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer._load_from_checkpoint: the adapter's weights from the checkpoint, in place."""
        folder = Path(resume_from_checkpoint)
        if not (folder / CONFIG_NAME).is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            raise ValueError(f"{str(folder)!r} holds no adapter checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                             + (f"it has {found[:12]}. " if found is not None else "it does not exist. ")
                             + "Resume from a checkpoint-N folder written by a trainer under use_peftkit")
        restore_adapter(self.model() if model is None else model, folder, self.adapter)

    def load_best(self) -> None:
        """Trainer._load_best_model: the adapter of the best checkpoint (load_best_model_at_end=True)."""
        self.load(self.trainer.state.best_model_checkpoint)


_REFUSED = {"is_deepspeed_enabled": "DeepSpeed", "is_fsdp_enabled": "FSDP", "is_fsdp_xla_enabled": "FSDP on XLA"}


def use_peftkit(trainer: Any, adapter: str | None = None, lean_loss: bool = False) -> Any:
    """Make `trainer` (transformers.Trainer, TRL's SFTTrainer, ...) keep adapter-only checkpoints of the
    peftkit adapter its model trains, and return it.

    - every checkpoint and `trainer.save_model()` write adapter_config.json + adapter_model.safetensors in
      HF PEFT's format (and the tokenizer, training_args.bin); the whole model is never written;
    - `trainer.train(resume_from_checkpoint=...)` copies the checkpoint's adapter back into the model in place;
      Trainer itself restores the optimizer, scheduler, RNG and step from the same folder;
    - `load_best_model_at_end=True` loads the best checkpoint's adapter;
    - lean_loss=True: `trainer.compute_loss` becomes `lean_compute_loss` (peftkit's answer-only loss, never the
      batch's full logits; equal to Trainer's default loss). It replaces SFTTrainer's own loss, and with it
      SFTTrainer's entropy and token-accuracy metrics.

    `adapter`: the adapter's name (default: the model's one active adapter). DeepSpeed and FSDP save and load
    sharded weights on paths of their own and are refused: use `peftkit train --nproc N` (FSDP) for those."""
    refused = [what for attr, what in _REFUSED.items() if getattr(trainer, attr, False)]
    refused += ["XLA (TPU)"] * is_torch_xla_available() + ["SageMaker model parallelism"] * is_sagemaker_mp_enabled()
    if refused:
        raise ValueError(f"use_peftkit does not support {', '.join(refused)}: their checkpoints hold sharded weights "
                         "that these hooks do not gather. Train on one process or with DDP, or with "
                         "`peftkit train --nproc N` (which shards the frozen base with FSDP)")
    model = trainer.accelerator.unwrap_model(trainer.model)
    name = training_adapter(model, adapter)
    hooks = AdapterCheckpoints(trainer, name)
    trainer._save = hooks.save
    trainer._load_from_checkpoint = hooks.load
    trainer._load_best_model = hooks.load_best
    if lean_loss:
        trainer.compute_loss = partial(lean_compute_loss, trainer)
    if not any(isinstance(cb, PeftkitAdapterCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(PeftkitAdapterCallback(name))
    return trainer
