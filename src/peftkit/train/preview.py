"""`peftkit data preview FILE`: what training will see, before any training: each record as the chat it
becomes, that chat rendered with the model's chat template, and which tokens carry the loss.

How a record becomes a prompt (data.record_to_messages, then labels.tokenize_messages):
- {"messages": [{role, content}, ...]} is the chat as it is; {"conversations": [{from, value}]} (ShareGPT)
  maps human/gpt to user/assistant;
- {"instruction", "output", optional "input", optional "system"} becomes [system,] user = instruction,
  plus a blank line and the input when there is one, then assistant = output; {"prompt", "completion"} and
  {"question", "answer"} become one user and one assistant message;
- the chat is rendered with the tokenizer's chat template (or "### Instruction:/### Response:" blocks
  when it has none) and tokenized once; every assistant message, with the end-of-turn text the template
  puts after it, is labelled (trained on); everything else (system, user, the template's markup) is not;
- examples longer than --max-length are cut at the end (--overflow truncate) or left out (skip); one
  whose answers are all cut off is left out and counted.
"""

from __future__ import annotations

import sys

from . import data as data_mod
from .labels import IGNORE_INDEX

OPEN, CLOSE = "\u00ab", "\u00bb"  # « and », around labelled text when colour is off
GREEN, RESET = "\033[32m", "\033[0m"


def marked_text(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The example's text with each run of labelled tokens between « and » (or in green). Runs are cut
    from decodes of growing prefixes, so a character split across tokens is never cut in two."""
    ends = [i for i in range(1, len(ids)) if (labels[i] != IGNORE_INDEX) != (labels[i - 1] != IGNORE_INDEX)]
    pieces, done, start = [], "", 0
    for end in ends + [len(ids)]:
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece, done = text[len(done):], text
        if labels[start] != IGNORE_INDEX:
            piece = f"{GREEN}{piece}{RESET}" if colour else f"{OPEN}{piece}{CLOSE}"
        pieces.append(piece)
        start = end
    return "".join(pieces)


def preview(path: str, tokenizer, count: int, max_length: int, overflow: str, colour: bool, out=None) -> dict:
    """Print (to `out`, default standard output) the first `count` records as chats, rendered examples with
    their labelled part marked, and the counts for the whole file; return the counts."""
    out = out or sys.stdout
    records = data_mod.read_records(path)
    chats = data_mod.to_chats(records, path)  # every record checked, so a bad one is named now
    examples, stats = data_mod.tokenize_chats(chats, tokenizer, max_length, overflow, path)
    by_chat = {e.chat: e for e in examples}
    mark = "green" if colour else f"between {OPEN} and {CLOSE}"
    print(f"{path}: {stats.describe()}; labelled (trained) text is shown {mark}", file=out)
    for n, chat in enumerate(chats[:count], start=1):
        print(f"\n--- record {n}: " + ", ".join(f"{m['role']} ({len(m['content'])} chars)" for m in chat), file=out)
        example = by_chat.get(n - 1)
        if example is None:
            print("(left out: " + ("longer than --max-length" if overflow == "skip" else
                                   "no answer token left after truncation") + ")", file=out)
            continue
        labelled = sum(label != IGNORE_INDEX for label in example.labels)
        print(marked_text(tokenizer, example.input_ids, example.labels, colour), file=out)
        print(f"--- {len(example.input_ids)} tokens, {labelled} labelled", file=out)
    lengths = sorted(len(e.input_ids) for e in examples)
    counts = {"records": stats.records, "kept": stats.kept, "truncated": stats.truncated,
              "skipped": stats.skipped_too_long + stats.skipped_no_response,
              "labelled_tokens": sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples),
              "tokens": sum(lengths), "longest": lengths[-1] if lengths else 0,
              "median_length": lengths[len(lengths) // 2] if lengths else 0}
    print(f"\n{counts['records']:,} records -> {counts['kept']:,} examples, {counts['tokens']:,} tokens "
          f"({counts['labelled_tokens']:,} labelled); median {counts['median_length']} tokens, longest "
          f"{counts['longest']} (--max-length {max_length})", file=out)
    return counts
