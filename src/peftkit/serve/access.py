"""The server's logs: one access line per HTTP request when it finishes (streams at their end), and the
adapter registry's events (load, reload, eviction, refusal with its reason), through Python's `logging`.

    POST /v1/chat/completions model=tickets status=200 prompt_tokens=12 completion_tokens=30 latency_ms=412

Loggers: "peftkit.serve.access" (INFO per request) and "peftkit.serve.adapters" (INFO for loads, reloads
and evictions, WARNING for refusals). create_app() gives the "peftkit.serve" logger a stderr handler at
INFO unless it was configured already, so `peftkit serve` prints them; applications embedding the app can
configure those loggers themselves (a level or handler set beforehand is left alone).
"""

from __future__ import annotations

import logging
import sys
import time

access_log = logging.getLogger("peftkit.serve.access")
ROOT = "peftkit.serve"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (so a replaced stderr is followed)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it in __init__; sys.stderr is used instead
        pass


def configure_logging(level: str | int = "INFO") -> None:
    """Give the "peftkit.serve" logger a stderr handler at `level`, once; a logger that already has a level or
    a handler (configured by the embedding application) is left as it is."""
    logger = logging.getLogger(ROOT)
    if logger.handlers or logger.level != logging.NOTSET:
        return
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)


def shown(text: object, limit: int = 200) -> str:
    """A client-given value safe for one log line: as it is when it is short, printable and has no spaces,
    else quoted (repr), so a name with a newline cannot forge a second line."""
    text = str(text)
    if text and len(text) <= limit and text.isprintable() and " " not in text:
        return text
    return repr(text[:limit])


def note(request, **fields) -> None:
    """Record what the access line should say about `request` (model, status, prompt_tokens,
    completion_tokens); a status given here (499 for a client that left) wins over the HTTP status sent."""
    record = getattr(request.state, "access", None)
    if record is None:
        record = request.state.access = {}
    record.update(fields)


class AccessLog:
    """ASGI middleware: one access line per HTTP request, written when the response has finished (for a stream,
    after its last event), with the model and token counts the endpoint noted."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, sent = time.perf_counter(), {"status": 500}
        scope.setdefault("state", {})  # one dict, shared by every copy of the scope the app may make

        async def send_and_watch(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            record = scope["state"].get("access") or {}
            access_log.info("%s %s model=%s status=%s prompt_tokens=%d completion_tokens=%d latency_ms=%d",
                            scope.get("method", "-"), shown(scope.get("path", "-")),
                            shown(record["model"]) if "model" in record else "-",
                            record.get("status", sent["status"]), record.get("prompt_tokens", 0),
                            record.get("completion_tokens", 0), round(1000 * (time.perf_counter() - t0)))
