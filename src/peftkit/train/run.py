"""What the recipe's setup stages build, and the training loop, checkpoints and summary then use."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import BatchOrder, DataStats, Example
from .distributed import Dist
from .options import TrainOptions
from .scoring import Scorer


@dataclass(frozen=True)
class TrainData:
    """The tokenized examples and the batch order over them."""

    train: list[Example]
    val: list[Example]
    stats: DataStats
    pad_id: int
    order: BatchOrder  # the global batch of each step: a pure function of (seed, step)
    total_steps: int
    val_chats: list = field(default_factory=list)  # the validation examples' chats (the user's data only)


@dataclass
class Run:
    """One training run, set up: where it writes, the model with its adapter, data, optimizer and scorer.

    `start_step` is 0 for a new run and the checkpoint's step after a resume."""

    o: TrainOptions
    dist: Dist
    out: Path
    model: torch.nn.Module
    tokenizer: Any
    data: TrainData
    named: list[tuple[str, torch.nn.Parameter]]  # the trainable parameters by name (checkpoint keys)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scorer: Scorer
    trainable_params: int
    total_params: int
    resume_from: Path | None = None
    start_step: int = 0
    precision: dict = field(default_factory=dict)  # {"dtype", "dtype_reason"}: --dtype as resolved (precision.py)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def sharded(self) -> bool:
        """True when FSDP shards the model over several processes (each forward pass needs every rank)."""
        return self.o.fsdp and self.dist.enabled

    @property
    def resumed(self) -> bool:
        return self.resume_from is not None
