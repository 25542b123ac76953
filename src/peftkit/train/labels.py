"""A chat as token ids with labels on the answers only: rendered once, each answer located, tokenized once.

Answer i spans the text between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]).
Rendering and tokenizing every prefix would give those spans and their token boundaries directly, in time
quadratic in the chat's length (one 400-turn chat: 21 s); the functions here find the same ones in linear time:
the spans from renders of a few messages at a time, checked against the whole chat, and the token boundaries
from one tokenization of the whole chat plus the short stretch since the last special token.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

IGNORE_INDEX = -100  # the label torch's cross_entropy skips


class DataError(ValueError):
    """A problem with the user's data: the message names the file, the line or record, and the fix."""


@dataclass(frozen=True)
class Example:
    """One tokenized chat. `labels` equals `input_ids` on answer tokens and is -100 everywhere else."""

    input_ids: list[int]
    labels: list[int]
    # which chat of the list given to data.tokenize_chats it came from (0-based; -1 when made elsewhere), so a
    # held-out example can be scored by generation from its chat
    chat: int = field(default=-1, compare=False)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat as text: the tokenizer's chat template, or a plain instruction template when it has none."""
    if getattr(tokenizer, "chat_template", None) is None:
        blocks = [{"system": "{}", "user": "### Instruction:\n{}", "assistant": "### Response:\n{}" +
                   (tokenizer.eos_token or "")}[m["role"]].format(m["content"]) for m in messages]
        if add_generation_prompt:
            blocks.append("### Response:\n")
        return "\n\n".join(blocks)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates raise their own errors (empty prompt, roles not alternating, ...)
        raise DataError(f"the tokenizer's chat template cannot render messages {[m['role'] for m in messages]}: "
                        f"{e}; start the chat with a user (or system) message and alternate user/assistant") from e


def check_options(max_length: int, overflow: str) -> None:
    if overflow not in ("truncate", "skip"):
        raise DataError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}")


def tokenize_messages(tokenizer, messages: list[dict], max_length: int,
                      overflow: str = "truncate") -> tuple[Example | None, str]:
    """Tokenize a chat with labels on every assistant answer and its end-of-turn token; status says what happened.

    Answer i spans the text between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]):
    the content plus whatever the template puts after it (ChatML: "<|im_end|>\\n"; the trailing newline IS labelled,
    which is harmless because generation stops at the end token). A boundary's token index is the length of the
    text before it, tokenized, where that is how the whole chat begins; where the tokenizer merges across a
    boundary, character offsets place it and a token straddling the boundary counts as answer. Status: "ok",
    "truncated", "too_long" (overflow="skip") or "no_response" (no answer left).
    """
    check_options(max_length, overflow)
    full = render_chat(tokenizer, messages, False)
    spans = answer_spans(tokenizer, messages, full)
    boundaries = TokenBoundaries(tokenizer, full)
    ids = boundaries.ids
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a, b = boundaries.at(start, True), boundaries.at(end, False)
        labels[a:b] = ids[a:b]
    status = "ok"
    if len(ids) > max_length:
        if overflow == "skip":
            return None, "too_long"
        ids, labels, status = ids[:max_length], labels[:max_length], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_response"
    return Example(input_ids=list(ids), labels=labels), status


# --- where the answers are, in characters ----------------------------------------------------------------------------
def answer_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """(start, end) in `full` (the rendered chat) of each assistant answer: from the end of
    render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1]).

    Found from short windows where the template allows (linear time), else from every prefix (quadratic)."""
    spans = _spans_from_windows(tokenizer, messages, full)
    return spans if spans is not None else _spans_from_prefixes(tokenizer, messages, full)


def _spans_from_prefixes(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """The definition, rendered prefix by prefix; refuses a template whose prefix renderings are not prefixes."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render_chat(tokenizer, messages[:i], True), render_chat(tokenizer, messages[:i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"the chat template renders message {i + 1} differently depending on what follows, so "
                            "the answer cannot be located; use a template whose rendering of a chat prefix is a "
                            "prefix of the whole chat")
        spans.append((len(before), len(through)))
    return spans


def _spans_from_windows(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]] | None:
    """The spans `_spans_from_prefixes` gives, from renders of a few messages each: what message k adds to the
    chat is taken to be what it adds to a window of the leading system message and the one or two messages
    before it (the window keeps the parity of the user/assistant alternation, which some templates check).
    The pieces must rebuild `full` exactly, each generation prompt must sit where the answer starts, and the
    last answer's span must equal the one its real prefix renderings give; otherwise (or when a window cannot
    be rendered) None, and the caller renders every prefix."""
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        return []
    renders: dict[tuple[tuple[int, ...], bool], str] = {}

    def render(indices: tuple[int, ...], prompt: bool) -> str:
        if (indices, prompt) not in renders:
            renders[indices, prompt] = render_chat(tokenizer, [messages[i] for i in indices], prompt)
        return renders[indices, prompt]

    lead = 1 if messages[0]["role"] == "system" else 0

    def window(k: int) -> tuple[int, ...]:  # the messages whose rendering decides what message k adds
        if k - 1 < lead:
            return tuple(range(k + 1))
        first = k - 1 - (k - 1 - lead) % 2
        return tuple(range(lead)) + tuple(range(first, k + 1))

    def added(indices: tuple[int, ...], prompt: bool) -> str | None:  # what the last message (or the prompt) adds
        whole, rest = render(indices, prompt), render(indices if prompt else indices[:-1], False)
        return whole[len(rest):] if whole.startswith(rest) else None

    try:
        opening = render((0,), False)
        if not full.startswith(opening):
            return None
        ends = [0, len(opening)]  # ends[k]: where the rendering of messages[:k] ends in `full`
        for k in range(1, len(messages)):
            piece = added(window(k), False)
            if piece is None or not full.startswith(piece, ends[k]):
                return None
            ends.append(ends[k] + len(piece))
        if ends[-1] != len(full):
            return None
        spans = []
        for i in assistants:
            prompt, at = (render((), True), 0) if i == 0 else (added(window(i - 1), True), ends[i])
            if prompt is None or not full.startswith(prompt, at) or at + len(prompt) > ends[i + 1]:
                return None
            spans.append((at + len(prompt), ends[i + 1]))
        last = assistants[-1]  # the last answer as the definition finds it: two renders of (nearly) the whole chat
        before = render_chat(tokenizer, messages[:last], True)
        through = full if last == len(messages) - 1 else render_chat(tokenizer, messages[:last + 1], False)
        if not (through.startswith(before) and full.startswith(through)) or spans[-1] != (len(before), len(through)):
            return None
    except DataError:
        return None
    return spans


# --- where the answers are, in tokens --------------------------------------------------------------------------------
class TokenBoundaries:
    """The chat tokenized once (`ids`), and the token index of a character position in it.

    The index of position c is len(tokenize(full[:c])) where that tokenization is how `ids` begins. Tokenizers
    split the text at special (added) tokens first and tokenize the stretches between them on their own, so
    tokenize(full[:c]) is ids up to the last special token before c followed by tokenize(that token .. c): only
    that short stretch is tokenized again. Where it does not match `ids` (the tokenizer merged across c),
    character offsets place the boundary."""

    def __init__(self, tokenizer, full: str) -> None:
        self.tokenizer, self.full = tokenizer, full
        fast = bool(getattr(tokenizer, "is_fast", False))
        encoded = tokenizer(full, add_special_tokens=False, **({"return_offsets_mapping": True} if fast else {}))
        self.ids: list[int] = list(encoded["input_ids"])
        self.offsets: list[tuple[int, int]] | None = list(encoded["offset_mapping"]) if fast else None
        self._anchor_ends: list[int] = []  # character end of each usable special token, in order
        self._anchors: list[tuple[int, int]] = []  # (token index, character start) of each
        plain = _plain_added_tokens(tokenizer) if fast else {}
        for n, token_id in enumerate(self.ids if plain else ()):
            start, end = self.offsets[n]
            if token_id in plain and full[start:end] == plain[token_id]:
                self._anchor_ends.append(end)
                self._anchors.append((n, start))
        self._sorted_ends = self._sorted_starts = None

    def at(self, char: int, is_start: bool) -> int:
        """The token index of character `char`: `is_start` for the start of an answer (a token straddling it
        belongs to the answer), else its end (a token straddling it belongs to the answer too)."""
        k = bisect_right(self._anchor_ends, char)
        token, begin = self._anchors[k - 1] if k else (0, 0)
        piece = self.tokenizer(self.full[begin:char], add_special_tokens=False)["input_ids"]
        if self.ids[token:token + len(piece)] == list(piece):
            return token + len(piece)
        if self.offsets is None:  # the tokenizer merged across the boundary
            raise DataError("the tokenizer merges tokens across a prompt/answer boundary and, being a slow "
                            "tokenizer, gives no character offsets; use the fast (tokenizers) version")
        if self._sorted_ends is None:
            self._sorted_ends = sorted(end for _, end in self.offsets)
            self._sorted_starts = sorted(start for start, _ in self.offsets)
        if is_start:  # tokens wholly inside the prompt
            return bisect_right(self._sorted_ends, char)
        return bisect_left(self._sorted_starts, char)  # tokens that begin inside the answer


def _plain_added_tokens(tokenizer) -> dict[int, str]:
    """id -> text of the added (special) tokens matched as they are: none that takes in the whitespace around it
    or must stand alone as a word, which would tie it to the text beside it."""
    tokens = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {i: t.content for i, t in tokens.items()
            if isinstance(getattr(t, "content", None), str)
            and not any(getattr(t, flag, True) for flag in ("lstrip", "rstrip", "single_word"))}
