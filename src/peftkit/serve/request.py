"""A generation request and its handle: what the HTTP layer submits and reads back.

The engine thread pushes tokens into a Handle; readers take them with tokens() (blocking, any thread) or
stream() (asyncio, woken through loop.call_soon_threadsafe, so the event loop never blocks).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass


class QueueFull(Exception):
    """The request queue is at max_queue (HTTP 429): retry later."""


class EngineClosed(RuntimeError):
    """The engine was closed (the server is stopping): HTTP 503."""


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the row's own generator: the same draws whatever shares the batch
    stop_token_ids: tuple[int, ...] = ()  # e.g. the tokenizer's eos / end-of-turn ids


def request_problems(req: GenRequest, vocab_size: int | None, max_positions: int | None) -> list[str]:
    """What is wrong with `req` for a model of this vocabulary and context (falsy: not known), one line each."""
    problems = []
    ids = req.prompt_ids
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        problems.append("prompt_ids must be a non-empty list of token ids")
    elif vocab_size and not all(0 <= t < vocab_size for t in ids):
        problems.append(f"prompt_ids must lie in 0..{vocab_size - 1}")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        problems.append(f"max_tokens must be a positive integer, got {req.max_tokens!r}")
    elif max_positions and ids and len(ids) + req.max_tokens > max_positions:
        problems.append(f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                        f"context of {max_positions} tokens; shorten the prompt or lower max_tokens")
    if req.seed is not None and (not isinstance(req.seed, int) or isinstance(req.seed, bool)
                                 or not 0 <= req.seed < 2**63):
        problems.append(f"seed must be an integer in 0..2**63-1, got {req.seed!r}")
    if not req.temperature >= 0:
        problems.append(f"temperature must be >= 0, got {req.temperature!r}")
    if not 0 < req.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {req.top_p!r}")
    return problems


class Handle:
    """One submitted request: its tokens as they come, and how it ended.

    The stop token that ends a request is counted in completion_tokens but not yielded (it is no text)."""

    def __init__(self, prompt_tokens: int, on_cancel: Callable[[Handle], None] | None = None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: str | None = None
        self.token_ids: list[int] = []  # what tokens() yields, kept
        self.token_logprobs: list[float] = []  # log p of each token under the model (before temperature)
        self._on_cancel = on_cancel  # the engine drops a queued request at once
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = threading.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def tokens(self) -> Iterator[int]:
        """Each new token id as it is produced (blocking)."""
        pos = 0
        while True:
            with self._cond:
                while pos == len(self.token_ids) and self.finish_reason is None:
                    self._cond.wait()
                new, finished = self.token_ids[pos:], self.finish_reason is not None
            pos += len(new)
            yield from new
            if finished and pos == len(self.token_ids):
                return

    async def stream(self) -> AsyncIterator[int]:
        """The same as tokens(), for asyncio code: waits on an asyncio.Event the engine thread sets through
        loop.call_soon_threadsafe, so the event loop is never blocked."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._cond:
            self._waiters.append(waiter)
        try:
            pos = 0
            while True:
                event.clear()
                with self._cond:
                    new, finished = self.token_ids[pos:], self.finish_reason is not None
                pos += len(new)
                for token in new:
                    yield token
                if finished and pos == len(self.token_ids):
                    return
                if not new:
                    await event.wait()
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until the request ends; its token ids."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"the request did not finish within {timeout} s")
        return list(self.token_ids)

    def cancel(self) -> None:
        """End the request: a queued one at once, a running one before the next step ("cancelled")."""
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    # --- engine side ------------------------------------------------------------------------------
    def _push(self, token: int | None, logprob: float) -> None:
        with self._cond:
            self.completion_tokens += 1
            if token is not None:
                self.token_ids.append(token)
                self.token_logprobs.append(logprob)
            self._notify()

    def _finish(self, reason: str, error: str | None = None) -> None:
        with self._cond:
            if self.finish_reason is None:
                self.error = error
                self.finish_reason = reason
            self._notify()

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, event in self._waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed; its reader is gone
                pass
