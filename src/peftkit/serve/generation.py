"""One HTTP request's running generation: its engine handles read as text, for a JSON reply or a stream.

A request with P prompts and n choices has P x n engine handles (prompt-major), each with its own
TextStream that turns tokens into text and applies the request's stop strings. Whatever way the reply
ends (done, error, client gone), every handle is cancelled so no batch row keeps decoding for nobody.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request

from .limits import ApiError
from .schemas import Usage
from .textstream import TextStream


@dataclass
class Generation:
    """The engine handles of one request with their text streams, its response id and its start time."""

    req: object
    handles: list
    streams: list[TextStream]
    rid: str
    chat: bool
    endpoint: str
    t0: float
    gone: bool = False  # the client disconnected before the reply was complete

    @classmethod
    def of(cls, req, handles: list, tok, chat: bool, endpoint: str, t0: float) -> Generation:
        streams = [TextStream(tok, req.stops()) for _ in handles]
        return cls(req, handles, streams, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", chat, endpoint, t0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def prompt_tokens(self) -> int:
        """Each prompt once, though it has n handles."""
        return sum(h.prompt_tokens for h in self.handles[::self.req.n])

    def used_tokens(self) -> int:
        """Completion tokens as the client got them: a reply cut by a stop string counts the tokens up to the
        match, not those the engine made before the cancel reached it (a number that depends on timing)."""
        return sum(len(s.ids) if s.stopped else h.completion_tokens for h, s in zip(self.handles, self.streams))

    def usage(self) -> Usage:
        usage = Usage(prompt_tokens=self.prompt_tokens(), completion_tokens=self.used_tokens(), total_tokens=0)
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return usage

    def reasons(self) -> list[str]:
        return [finish_reason(h, s) for h, s in zip(self.handles, self.streams)]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def finish_reason(handle, stream: TextStream) -> str:
    return "stop" if stream.stopped else (handle.finish_reason or "stop")


async def pieces(handle, stream: TextStream) -> AsyncIterator[str]:
    """The text of one engine request as it is produced; a matched stop sequence cancels the request."""
    async with aclosing(handle.stream()) as tokens:
        async for token in tokens:
            piece = stream.push(token)
            if piece:
                yield piece
            if stream.stopped:
                handle.cancel()
                return
    if handle.finish_reason == "error":
        raise ApiError(500, f"generation failed: {handle.error}")
    if tail := stream.finish():
        yield tail


async def collect(handle, stream: TextStream) -> str:
    """The whole text of one engine request."""
    async with aclosing(pieces(handle, stream)) as parts:
        return "".join([p async for p in parts])


async def watch_disconnect(request: Request, gen: Generation) -> None:
    """Mark `gen` gone and cancel its handles once the client disconnects (run as a task next to the reply)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.gone = True
    gen.cancel()


def watch(request: Request, gen: Generation) -> asyncio.Task:
    return asyncio.create_task(watch_disconnect(request, gen))
