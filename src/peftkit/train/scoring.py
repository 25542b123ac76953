"""What a run measures on held-out data: validation loss (every run), and a task's own score as a plug-in.

The recipe asks the scorer it chose at setup (`choose_scorer`) for its score before and after training;
the built-in ticket task's scorer is exact match of greedy answers on held-out tickets; the user's own data
is scored on its held-out chats by exact match and, for JSON answers, JSON match (`AnswerMatch`,
answers.py); a run without held-out examples has no score (`NoScore`). The recipe itself knows nothing
of tickets.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .. import adapters as adapter_api
from . import answers
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
        """exact_match_before, exact_match_after, eval_examples, json_match_before, json_match_after and
        json_examples for summary.json (in that order; None where not measured)."""


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
        return {"exact_match_before": None, "exact_match_after": None, "eval_examples": 0,
                "json_match_before": None, "json_match_after": None, "json_examples": 0}


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
                "eval_examples": len(self.tickets), "json_match_before": None, "json_match_after": None,
                "json_examples": 0}


def answer_scores(model, tokenizer, chats: list[list[dict]], progress: bool, label: str,
                  command: str = "peftkit train") -> dict:
    """`answers.score_answers` of the greedy replies to `chats`' last assistant turns, in eval mode."""
    from .evaluate import greedy_replies

    prompts, references = answers.held_out_pairs(chats)
    exact_only = [not answers.is_json(answers.parse_json(t)) for t in references]
    was_training = model.training
    model.eval()
    if progress:
        print(f"{command}: scoring {len(chats)} held-out examples ({label}) ...", flush=True)
    replies = greedy_replies(model, tokenizer, prompts, references, exact_only, batch_size=16, progress=progress)
    model.train(was_training)
    return answers.score_answers(replies, references)


def describe_scores(scores: dict) -> str:
    """e.g. "exact match 40%, JSON match 75% (of 20 JSON answers)"."""
    line = f"exact match {100 * scores['exact_match']:.0f}%"
    if scores.get("json_match") is not None:
        line += f", JSON match {100 * scores['json_match']:.0f}% (of {scores['json_examples']} JSON answers)"
    return line


class AnswerMatch:
    """The user's data: greedy answers to held-out chats (their last assistant turn), before and after
    training; `before` (a dict of `answers.score_answers`) travels in checkpoints."""

    def __init__(self, chats: list[list[dict]], tokenizer, *, score_base: bool, takes_part: bool, main: bool,
                 progress: bool) -> None:
        self.chats, self.tokenizer = chats, tokenizer
        self.score_base, self.takes_part, self.main, self.progress = score_base, takes_part, main, progress
        self.before: dict | None = None
        self.after: dict | None = None

    def before_training(self, model) -> None:
        if not self.score_base or self.before is not None or not self.takes_part:
            return
        with adapter_api.disable_adapters(model):
            self.before = answer_scores(model, self.tokenizer, self.chats, self.progress, "base model")
        if self.main:
            print(f"peftkit train: base model {describe_scores(self.before)}", flush=True)

    def after_training(self, model) -> None:
        if self.takes_part:
            self.after = answer_scores(model, self.tokenizer, self.chats, self.progress, "trained adapter")

    def final_metrics(self) -> dict:
        return {k: self.after[k] for k in ("exact_match", "json_match")} if self.after else {}

    def summary(self) -> dict:
        before, after = self.before or {}, self.after or {}
        return {"exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
                "eval_examples": len(self.chats), "json_match_before": before.get("json_match"),
                "json_match_after": after.get("json_match"),
                "json_examples": (self.after or self.before or {}).get("json_examples", 0)}


def choose_scorer(o: TrainOptions, tokenizer, dist: Dist, held_out: list[list[dict]] | None = None) -> Scorer:
    """The built-in task's exact match; for the user's data, answer match on (up to --eval-examples of) its
    held-out chats `held_out`, or no score when there are none (or --eval-examples 0)."""
    sharded = o.fsdp and dist.enabled
    if o.eval_examples == 0:
        return NoScore()
    if not o.builtin:
        chats = (held_out or [])[:o.eval_examples]
        if not chats:
            return NoScore()
        return AnswerMatch(chats, tokenizer, score_base=o.score_base, takes_part=dist.is_main or sharded,
                           main=dist.is_main, progress=o.progress and dist.is_main)
    return TicketExactMatch(task.eval_set(o.eval_examples), tokenizer, score_base=o.score_base,
                            takes_part=dist.is_main or sharded, main=dist.is_main, progress=o.progress and dist.is_main)
