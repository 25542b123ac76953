"""What a run measures on held-out data: validation loss (every run), and a task's own score as a plug-in.

The recipe asks the scorer it chose at setup (`choose_scorer`) for its score before and after training;
the built-in ticket task's scorer is exact match of greedy answers on held-out tickets, any other data
has none (`NoScore`). The recipe itself knows nothing of tickets.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import adapters as adapter_api
from . import data as data_mod
from . import task
from .distributed import Dist
from .loss import sum_token_loss
from .options import TrainOptions


@torch.no_grad()
def validation_loss(model, examples: list, pad_id: int, device, batch_size: int, chunk: int) -> float | None:
    """Mean loss per answer token over `examples` (None when there are none), in eval mode."""
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


def exact_match(model, tokenizer, tickets: list[task.Ticket], progress: bool, label: str,
                command: str = "peftkit train") -> float:
    """Share of `tickets` whose greedy answer is exactly the record, in eval mode; progress lines name `command`."""
    from .evaluate import greedy_exact_match

    was_training = model.training
    model.eval()
    if progress:
        print(f"{command}: scoring {len(tickets)} held-out tickets ({label}) ...", flush=True)
    score, _ = greedy_exact_match(model, tokenizer, [t.messages(with_answer=False) for t in tickets],
                                  [t.answer for t in tickets], progress=progress)
    model.train(was_training)
    return score


class Scorer(Protocol):
    """A task's own score, measured by the recipe's hooks; `before` travels in checkpoints."""

    before: float | None

    def before_training(self, model) -> None:
        """Score the base model (adapters disabled), unless a checkpoint already brought the figure."""

    def after_training(self, model) -> None:
        """Score the trained model."""

    def final_metrics(self) -> dict:
        """Fields for the last line of metrics.jsonl."""

    def summary(self) -> dict:
        """exact_match_before, exact_match_after and eval_examples for summary.json (in that order)."""


class NoScore:
    """Data of the user's own: validation loss is the only measure."""

    before: float | None = None

    def before_training(self, model) -> None:
        pass

    def after_training(self, model) -> None:
        pass

    def final_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {"exact_match_before": None, "exact_match_after": None, "eval_examples": 0}


class TicketExactMatch:
    """The built-in task: exact match on the fixed held-out tickets, of the base model and of the adapter.

    On the main process, or on every process when the model is sharded (each forward pass needs them all)."""

    def __init__(self, tickets: list[task.Ticket], tokenizer, *, score_base: bool, takes_part: bool, main: bool,
                 progress: bool) -> None:
        self.tickets, self.tokenizer = tickets, tokenizer
        self.score_base, self.takes_part, self.main, self.progress = score_base, takes_part, main, progress
        self.before: float | None = None
        self.after: float | None = None

    def before_training(self, model) -> None:
        if not self.score_base or self.before is not None or not self.takes_part:
            return
        with adapter_api.disable_adapters(model):
            self.before = exact_match(model, self.tokenizer, self.tickets, self.progress, "base model")
        if self.main:
            print(f"peftkit train: base model exact match {100 * self.before:.0f}%", flush=True)

    def after_training(self, model) -> None:
        if self.tickets and self.takes_part:
            self.after = exact_match(model, self.tokenizer, self.tickets, self.progress, "trained adapter")

    def final_metrics(self) -> dict:
        return {"exact_match": self.after} if self.after is not None else {}

    def summary(self) -> dict:
        return {"exact_match_before": self.before, "exact_match_after": self.after,
                "eval_examples": len(self.tickets)}


def choose_scorer(o: TrainOptions, tokenizer, dist: Dist) -> Scorer:
    """The built-in task's exact match, or no score of its own for the user's data."""
    if not o.builtin:
        return NoScore()
    sharded = o.fsdp and dist.enabled
    return TicketExactMatch(task.eval_set(o.eval_examples), tokenizer, score_base=o.score_base,
                            takes_part=dist.is_main or sharded, main=dist.is_main, progress=o.progress and dist.is_main)
