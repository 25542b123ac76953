"""Exact-match scoring by greedy generation, stopping each row as soon as it can no longer match.

An answer is right only if the whole generated text equals the target, so a row whose text has left the
target's prefix is already wrong: generating the rest of it is wasted work. A base model that answers
in prose is scored after a few tokens instead of after the full answer length; a trained adapter that
is right generates exactly the target and stops at its end-of-turn token. The result is the same as
generating everything and comparing. Answers judged after parsing (JSON, answers.py) cannot be cut off
that way: their rows run to their end-of-turn token, or to twice the target's length.
"""

from __future__ import annotations

import torch

from .infer import chat_prompt, generation_config, left_padding


def _reply_guard(tokenizer, targets: list[str], exact_only: list[bool], prompt_len: int):
    from transformers import StoppingCriteria

    class ReplyGuard(StoppingCriteria):
        """Per row: an exact-only row stops once its text is not a prefix of the target (or is already
        longer); any other row (its answer is judged after parsing, so other spellings count) stops once it
        is much longer than the target."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            # trailing whitespace after a complete answer may still be followed by more text: keep going then
            done = [not (t.startswith(s.lstrip()) or s.strip() == t) if exact else len(s) > 2 * len(t) + 64
                    for s, t, exact in zip(texts, targets, exact_only)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return ReplyGuard()


@torch.no_grad()  # not inference_mode: under FSDP the gathered parameters must stay usable for training
def greedy_replies(model, tokenizer, conversations: list[list[dict]], targets: list[str],
                   exact_only: list[bool] | None = None, batch_size: int = 50, progress: bool = False) -> list[str]:
    """The greedy reply to each conversation, generated only as far as judging it against its target needs:
    rows marked `exact_only` (default: all) stop as soon as they leave the target's text; the others run to
    their end-of-turn token or to twice the target's length."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    exact_only = [True] * len(targets) if exact_only is None else exact_only
    longest = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in targets)
    extra = 4 if all(exact_only) else max(16, longest // 4)  # a reply judged by parsing may be spelt longer
    config = generation_config(model, tokenizer, longest + extra, 0.0, 1.0)
    device = next(model.parameters()).device
    prompts = [chat_prompt(tokenizer, c) for c in conversations]
    replies: list[str] = []
    with left_padding(tokenizer):
        for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="scoring", unit="batch"):
            rows = slice(start, start + batch_size)
            enc = tokenizer(prompts[rows], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            n = enc["input_ids"].shape[1]
            guard = StoppingCriteriaList([_reply_guard(tokenizer, targets[rows], exact_only[rows], n)])
            out = model.generate(**enc, generation_config=config, stopping_criteria=guard)  # (B, n + new)
            replies += tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
    return replies


def greedy_exact_match(model, tokenizer, conversations: list[list[dict]], targets: list[str], batch_size: int = 50,
                       progress: bool = False) -> tuple[float, list[str]]:
    """(share of conversations whose greedy reply equals its target after stripping, the replies)."""
    replies = greedy_replies(model, tokenizer, conversations, targets, None, batch_size, progress)
    right = sum(r.strip() == t for r, t in zip(replies, targets))
    return right / max(len(targets), 1), replies
