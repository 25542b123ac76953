"""Exact-match scoring by greedy generation, stopping each row as soon as it can no longer match.

An answer is right only if the whole generated text equals the target, so a row whose text has left the
target's prefix is already wrong: generating the rest of it is wasted work. A base model that answers
in prose is scored after a few tokens instead of after the full answer length; a trained adapter that
is right generates exactly the target and stops at its end-of-turn token. The result is the same as
generating everything and comparing.
"""

from __future__ import annotations

import torch

from .infer import chat_prompt, generation_config, left_padding


def _prefix_guard(tokenizer, targets: list[str], prompt_len: int):
    from transformers import StoppingCriteria

    class PrefixGuard(StoppingCriteria):
        """Per row: stop once the text so far is not a prefix of the target (or is already longer)."""

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            # trailing whitespace after a complete answer may still be followed by more text: keep going then
            done = [not (t.startswith(s.lstrip()) or s.strip() == t) for s, t in zip(texts, targets)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return PrefixGuard()


@torch.inference_mode()
def greedy_exact_match(model, tokenizer, conversations: list[list[dict]], targets: list[str], batch_size: int = 50,
                       progress: bool = False) -> tuple[float, list[str]]:
    """(share of conversations whose greedy reply equals its target after stripping, the replies)."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteriaList

    longest = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in targets)
    config = generation_config(model, tokenizer, longest + 4, 0.0, 1.0)
    device = next(model.parameters()).device
    prompts = [chat_prompt(tokenizer, c) for c in conversations]
    replies: list[str] = []
    with left_padding(tokenizer):
        for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="scoring", unit="batch"):
            chunk, wanted = prompts[start:start + batch_size], targets[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            n = enc["input_ids"].shape[1]
            guard = StoppingCriteriaList([_prefix_guard(tokenizer, wanted, n)])
            out = model.generate(**enc, generation_config=config, stopping_criteria=guard)  # (B, n + new)
            replies += tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
    right = sum(r.strip() == t for r, t in zip(replies, targets))
    return right / max(len(targets), 1), replies
