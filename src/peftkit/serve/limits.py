"""Request limits and the app's own errors: the body-size guard (413), readable validation errors (400), how
any error becomes OpenAI's error JSON with the status a client's SDK maps to its exception classes (with
Retry-After on a 429), a catch-all that answers an unexpected error without closing the connection, and the
read deadline that closes connections sending a request too slowly (slowloris).

The body limit is an ASGI middleware, not a check in each endpoint, because it must act before the body
is parsed: a Content-Length above the limit is refused at once, and a body sent without one (chunked) is
counted as it arrives and refused as soon as it passes the limit, so a client cannot make the server
buffer more than --max-body-bytes whatever the headers say.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .request import QueueFull
from .schemas import error_body
from .validate import AdapterError

RETRY_AFTER = "1"  # seconds a client should wait after a 429 (the queue moves every decode step)
DRAIN_BYTES = 16 << 20  # a rejected body up to this size is read to its end before the 413 (see _reject)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


class ApiError(Exception):
    """An error for the client: HTTP status, a message saying what is wrong and what to do, and the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def status_of(err: BaseException) -> int:
    """The HTTP status an error answers with: its own for ours and the registry's, 429 for a full queue, else 500."""
    if isinstance(err, (ApiError, AdapterError)):
        return err.status
    return 429 if isinstance(err, QueueFull) else 500


def error_response(err: BaseException) -> JSONResponse:
    """`err` in OpenAI's error JSON, with its status (and the Bearer challenge on a 401)."""
    status = status_of(err)
    if isinstance(err, QueueFull):
        message = f"the server's request queue is full ({err}); retry after a short wait"
    else:
        message = getattr(err, "message", None) or str(err) or type(err).__name__
    code = getattr(err, "code", None) or {404: "model_not_found", 422: "invalid_adapter", 429: "queue_full",
                                          503: "no_free_adapter_slot"}.get(status)
    headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": RETRY_AFTER}}.get(status)
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), code,
                                   getattr(err, "param", None)), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body over `limit` bytes, by header or by bytes received."""

    def __init__(self, app, limit: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject

    async def _reject(self, scope, receive, send, size: str, more: bool) -> None:
        """413, after reading (and dropping) the rest of a body of moderate size: closing a connection with
        unread data makes TCP reset it, and the client would see a broken connection instead of the 413."""
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""))
        budget = DRAIN_BYTES
        while more and budget > 0:
            message = await receive()
            budget -= len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        body = json.dumps(error_body(f"the request body is {size}, above this server's limit of {self.limit} bytes "
                                     "(--max-body-bytes); send a smaller request", code="request_too_large"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(error_body(
                    f"Content-Length {length.decode(errors='replace')!r} is not a number")).encode()})
                return
            if int(length) > self.limit:
                await self._reject(scope, receive, send, f"{int(length)} bytes (Content-Length)",
                                   more=int(length) <= DRAIN_BYTES)
                return
        chunks, size = [], 0
        while True:  # read the whole (bounded) body first, counting what really arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, receive, send, f"over {self.limit} bytes (counted as received)",
                                   more=message.get("more_body", False))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, which streaming responses listen for

        await self.app(scope, replay, send)


class CatchErrors:
    """ASGI middleware: an unexpected exception raised before the response started is logged and answered by
    `respond` (a 500 in OpenAI's error JSON) here, instead of reaching the server, which would close the
    connection, so a kept-alive client's next request would be reset. After the response started (a stream),
    the exception goes on to the server: the reply cannot be completed and the connection must close."""

    def __init__(self, app, respond: Callable[[Request, Exception], Awaitable[Response]]) -> None:
        self.app, self.respond = app, respond

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if started:
                raise
            logging.getLogger("uvicorn.error").error("Exception in ASGI application", exc_info=err)
            response = await self.respond(Request(scope), err)
            await response(scope, receive, send)


class ReadDeadline:
    """An asyncio protocol around uvicorn's HTTP protocol (composition; `inner` does all the HTTP): a request
    must arrive whole, headers and body, within `seconds` of its first byte (or of the connection's start),
    else the connection is closed, with a 408 when its headers never came. uvicorn alone times out only idle
    kept-alive connections, so a client sending a request slowly (slowloris) could hold a connection forever.
    The time spent producing the response (a long stream) does not count."""

    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.transport = None
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def factory(cls, protocol_class, seconds: float) -> Callable[..., ReadDeadline]:
        """What uvicorn's Config(http=...) takes: builds `protocol_class(**uvicorn's arguments)` wrapped."""
        return lambda **kw: cls(protocol_class(**kw), seconds)

    def reading(self) -> bool:
        """Whether a request is partly received: no request yet, only the previous one's reply done, or a body
        still arriving (uvicorn's request cycle knows)."""
        cycle = getattr(self.inner, "cycle", None)
        return cycle is None or cycle.response_complete or cycle.more_body

    def arm(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.seconds, self.expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        cycle = getattr(self.inner, "cycle", None)
        if cycle is None or cycle.response_complete:  # the headers never came: nothing else will answer
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()  # a request whose body stalls sees a disconnect

    # the asyncio.Protocol interface, each passed on to uvicorn's protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)
        if self.reading():
            self.arm()
        else:
            self.disarm()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, first field) for pydantic's errors: one line per field, with the field named."""
    by_field: dict[str, list[str]] = {}
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        kind = e.get("type", "")
        if kind == "json_invalid":
            return f"the request body is not valid JSON: {e.get('msg')}", None
        if kind == "lone_surrogate":  # found by the schema in the whole body; ctx names where
            where = e.get("ctx", {}).get("field", "").removeprefix("a key of ")
            field = None if where.startswith("the ") else re.split(r"[.\[]", where)[0]
            return f"invalid request: {e.get('msg')}", field
        field = loc[0] if loc else "body"
        if kind == "extra_forbidden":
            text = f"{'.'.join(loc)!r} is not a field of this API; remove it"
        elif kind == "missing" and not loc:
            text = "the request needs a JSON body"
        elif kind == "missing":
            text = f"{'.'.join(loc)!r} is required"
        else:
            text = f"{'.'.join(loc)}: {e.get('msg')}"
        if text not in by_field.setdefault(field, []):
            by_field[field].append(text)
    lines = [texts[0] if len(texts) == 1 else f"{field}: none of the accepted forms fit ({'; '.join(texts[:3])})"
             for field, texts in by_field.items()]
    return "invalid request: " + "; ".join(lines), next(iter(by_field), None)
