"""Streaming replies of `peftkit serve`: server-sent events in OpenAI's chunk format.

Choices are interleaved as their tokens come (one task per engine handle feeds a queue), then, with
stream_options.include_usage, a usage chunk, then `data: [DONE]`. An error mid-stream is sent as an error
event. The request is counted in the metrics exactly once: when the stream ends, or as 499 when the client
leaves, even before the first event; the access log (access.py) writes its line after that.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import StreamingResponse

from .generation import Generation, finish_reason, pieces, watch
from .limits import status_of
from .schemas import ChatCompletionChunk, ChunkChoice, Completion, CompletionChoice, Delta, error_body
from .textstream import TextStream


class EventStream(StreamingResponse):
    """Server-sent events that cancel their engine requests however the response ends, also when the client
    leaves before the first event (then the body generator never starts, so its own cleanup cannot run)."""

    def __init__(self, body: AsyncIterator[str], handles: list, on_close: Callable[[], None]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles, self.on_close = handles, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.cancel()
            self.on_close()


class StreamRecord:
    """Counts a stream in the metrics once: the first call wins (the end of the stream, or 499 on leaving)."""

    def __init__(self, service, gen: Generation, request: Request) -> None:
        self.service, self.gen, self.request, self.recorded = service, gen, request, False

    def __call__(self, status: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        gen = self.gen
        self.service.finish(self.request, gen.req.model, gen.endpoint, status, gen.elapsed(), gen.prompt_tokens(),
                            gen.used_tokens())


def stream_response(request: Request, service, gen: Generation) -> EventStream:
    """The streaming reply to a started generation."""
    record = StreamRecord(service, gen, request)
    return EventStream(events(request, gen, record), gen.handles, functools.partial(record, 499))


def chunk_event(gen: Generation, created: int, index: int, text: str | None, reason: str | None,
                role: bool = False) -> str:
    """One choice's piece of text (or its finish reason, or for chat the opening role) as an event."""
    if gen.chat:
        delta = Delta(role="assistant", content="") if role else Delta(content=text)
        body = ChatCompletionChunk(id=gen.rid, created=created, model=gen.req.model,
                                   choices=[ChunkChoice(index=index, delta=delta, finish_reason=reason)])
    else:
        body = Completion(id=gen.rid, created=created, model=gen.req.model,
                          choices=[CompletionChoice(index=index, text=text or "", finish_reason=reason)])
    return f"data: {body.model_dump_json(exclude_none=gen.chat)}\n\n"


def usage_event(gen: Generation, created: int) -> str:
    cls = ChatCompletionChunk if gen.chat else Completion
    body = cls(id=gen.rid, created=created, model=gen.req.model, choices=[], usage=gen.usage())
    return f"data: {body.model_dump_json()}\n\n"


async def pump(queue: asyncio.Queue, index: int, handle, stream: TextStream) -> None:
    """Feed one handle's pieces to `queue` as (index, piece, None), then (index, None, finish reason), or
    (index, error, None) if it failed."""
    try:
        async with aclosing(pieces(handle, stream)) as parts:
            async for piece in parts:
                await queue.put((index, piece, None))
        await queue.put((index, None, finish_reason(handle, stream)))
    except Exception as err:  # noqa: BLE001 - reported to the client in the stream
        await queue.put((index, err, None))


async def events(request: Request, gen: Generation, record: Callable[[int], None]) -> AsyncIterator[str]:
    """The event stream's body; every engine request is cancelled and the request counted when it ends."""
    queue: asyncio.Queue = asyncio.Queue()
    created = int(time.time())
    watcher = watch(request, gen)
    tasks = [asyncio.create_task(pump(queue, i, h, s)) for i, (h, s) in enumerate(zip(gen.handles, gen.streams))]
    status, left = 499, len(tasks)  # 499: the client went away before the end
    try:
        if gen.chat:
            for i in range(len(gen.handles)):
                yield chunk_event(gen, created, i, None, None, role=True)
        while left:
            index, piece, reason = await queue.get()
            if isinstance(piece, Exception):
                status = status_of(piece)
                yield f"data: {json.dumps(error_body(str(piece), 'server_error'))}\n\n"
                return
            if reason is not None:
                left -= 1
            yield chunk_event(gen, created, index, piece, reason)
        if gen.req.stream_options is not None and gen.req.stream_options.include_usage:
            yield usage_event(gen, created)
        status = 200
        record(status)  # before the last event, so a client that saw [DONE] finds the request counted
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        gen.cancel()
        record(status)
