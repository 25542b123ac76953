"""Token ids to text, one token at a time, with OpenAI's text stop sequences.

Decoding a token alone is wrong for byte-level BPE (a character can span tokens) and for SentencePiece
(leading spaces depend on the previous token), so each step decodes a short window of recent tokens and
emits what the newest ones added, holding back a trailing incomplete character (U+FFFD), as TGI and vLLM
do. Text that could still be the start of a stop sequence is held back too, so a stream never shows
text that the final response cuts; streamed pieces concatenated equal the non-streamed text exactly.
LockedTokenizer shares one tokenizer between the event loop and worker threads: encoding and chat templates
run in worker threads behind one lock, and decoding (each streamed token, on the event loop) uses a copy
behind a lock of its own, so a stream never waits for a long prompt being tokenized.
"""

from __future__ import annotations

import copy
import logging
import threading

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with push(); each call returns the text that is now safe to show. After a stop
    sequence matched, `stopped` is True, the text ends before the stop string and later pushes return ""."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been taken
        self.pending = ""  # decoded text held back because it may begin a stop sequence
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        if final and len(self.ids) > self.read:  # the window produced nothing visible (special tokens)
            self.prefix = self.read = len(self.ids)
        return ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        return self._release(self._new_text(final=False), final=False)

    def finish(self) -> str:
        """The text still held back, once no more tokens will come (an incomplete character shows as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._new_text(final=True), final=True)

    def _release(self, piece: str, final: bool) -> str:
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            self.text += out
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[:min(hits)]
            self.pending, self.stopped = "", True
        elif final:
            out, self.pending = self.pending, ""
        else:
            keep = self._stop_prefix_len(self.pending)
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


class LockedTokenizer:
    """The app's tokenizer, safe across the event loop and worker threads. HF fast tokenizers raise "Already
    borrowed" when threads overlap on one instance, so encode() and render_chat() (seconds for a 1 MB text;
    called from worker threads) hold `lock`, while decode() (one short window per streamed token, called on
    the event loop) uses its own copy of the tokenizer behind `decode_lock`: the event loop never waits for
    an encode. A tokenizer that cannot be copied shares the one instance and lock (and then it can wait)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lock = tokenizer, threading.Lock()
        try:
            self.decoder, self.decode_lock = copy.deepcopy(tokenizer), threading.Lock()
        except Exception as err:  # noqa: BLE001 - e.g. a tokenizer holding an object that cannot be copied
            logging.getLogger(__name__).warning("the tokenizer cannot be copied (%s: %s); streams decode with the "
                                                "encoding instance and may wait for long prompts",
                                                type(err).__name__, err)
            self.decoder, self.decode_lock = tokenizer, self.lock

    def decode(self, ids: list[int], **kw) -> str:
        with self.decode_lock:
            return self.decoder.decode(ids, **kw)

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        from ..train.infer import chat_prompt

        with self.lock:
            return chat_prompt(self.tokenizer, messages)
