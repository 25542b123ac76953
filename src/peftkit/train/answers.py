"""How a generated answer is judged against the reference answer of a held-out example.

- exact match: the reply, stripped of surrounding whitespace, equals the reference (stripped);
- JSON match, for references that are JSON: the reply parses as JSON (a ```json fence around it is allowed)
  to the same value; objects compare without regard to key order or spacing, numbers by value (1 and 1.0
  are equal), and true/false are never numbers. Examples whose reference is not JSON have no JSON verdict.

`score_answers` returns the shares a run reports; `held_out_pairs` turns held-out chats into what to ask
(every message before the last assistant turn) and what the answer should be (that turn).
"""

from __future__ import annotations

import json
from typing import Any

_NOT_JSON = object()


def parse_json(text: str) -> Any:
    """The JSON value `text` holds (surrounding whitespace and one Markdown code fence allowed), else a
    sentinel that compares unequal to every value (use `is_json`)."""
    text = text.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3]
        text = text[4:] if text[:4].lower() == "json" else text
        text = text.strip()
    if not text or text[0] not in "{[\"-0123456789tfn":
        return _NOT_JSON
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def is_json(value: Any) -> bool:
    return value is not _NOT_JSON


def _canonical(value: Any) -> Any:
    """A hashable form in which equal JSON values are equal: key order ignored, bools apart from numbers."""
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("string" if isinstance(value, str) else "null", value)


def json_equal(reply: str, reference: str) -> bool | None:
    """Whether the reply holds the reference's JSON value; None when the reference is not JSON."""
    want = parse_json(reference)
    if not is_json(want):
        return None
    got = parse_json(reply)
    if not is_json(got):
        return False
    try:
        return _canonical(got) == _canonical(want)
    except RecursionError:  # parsed, but nested deeper than Python's stack allows walking: the texts decide
        return reply.strip() == reference.strip()


def score_answers(replies: list[str], references: list[str]) -> dict[str, Any]:
    """{"exact_match": share, "json_match": share of the JSON references matched (None without any),
    "examples": n, "json_examples": how many references are JSON}."""
    exact = [r.strip() == t.strip() for r, t in zip(replies, references)]
    verdicts = [v for v in (json_equal(r, t) for r, t in zip(replies, references)) if v is not None]
    return {"exact_match": sum(exact) / max(len(exact), 1),
            "json_match": sum(verdicts) / len(verdicts) if verdicts else None,
            "examples": len(exact), "json_examples": len(verdicts)}


def held_out_pairs(chats: list[list[dict]]) -> tuple[list[list[dict]], list[str]]:
    """(the conversation before each chat's last assistant turn, that turn's text). Every chat from
    `data.to_chats` has an assistant turn."""
    prompts, references = [], []
    for chat in chats:
        last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
        prompts.append(chat[:last])
        references.append(chat[last]["content"])
    return prompts, references
