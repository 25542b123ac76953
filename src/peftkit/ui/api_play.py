"""The playground's backend: one prompt to the base and to several adapters, each answer streamed.

The page always speaks OpenAI's API under /api/play/v1 (models, completions, chat/completions, stream=true),
whichever of two backends answers it:
- `--serve-url URL` (loopback only): a running `peftkit serve`; the console checks each request (the fields
  it forwards, prompt size, max_tokens) and relays the server's events as they come;
- `--model M`: the base loads in this process with the adapters given by --adapter / --adapter-dir and those
  of the runs under the folder trained on that same base; `peftkit serve`'s own app (batching engine, limits)
  is mounted at /api/play, with max_tokens bounded by --max-tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from .folder import Folder, UiError

router = APIRouter()
MAX_PROMPT_CHARS = 32_000
MAX_MESSAGES = 64
RELAY_TIMEOUT_S = 300.0


@dataclass
class Playground:
    """Which backend answers the playground: mode "off", "proxy" (url) or "local" (an in-process app)."""

    mode: str = "off"
    url: str | None = None
    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    max_tokens: int = 256
    app: object | None = None  # local: peftkit serve's FastAPI app, mounted at /api/play
    engine: object | None = None  # local: its engine, closed when the console stops
    api_key: str | None = field(default=None, repr=False)  # proxy: the server's --api-key, sent as a Bearer token

    def info(self) -> dict:
        hint = {"off": "start the console with --model MODEL (load the base and adapters here) or --serve-url "
                       "http://127.0.0.1:PORT (a running peftkit serve) to use the playground"}.get(self.mode)
        return {"mode": self.mode, "url": self.url, "base": self.base, "adapters": self.adapters,
                "max_tokens": self.max_tokens, "hint": hint}


def check_serve_url(url: str) -> str:
    """`url` without a trailing '/', if it is http(s) on a loopback host; ValueError otherwise."""
    from ..serve.cli import is_loopback

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--serve-url {url!r} is not an http(s) URL; give the address `peftkit serve` printed, "
                         "for example http://127.0.0.1:8000")
    if not is_loopback(parts.hostname):
        raise ValueError(f"--serve-url {url!r} is not on this machine: the console relays prompts only to a "
                         "loopback server (127.0.0.1, ::1 or localhost)")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError(f"--serve-url {url!r}: give only scheme, host and port (the /v1 paths are added)")
    return url.rstrip("/")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class PlayRequest(BaseModel):
    """What the console forwards to a running server: the fields the page sends, bounded."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = True


def playground_of(request: Request) -> Playground:
    return request.app.state.playground


def relay_client(request: Request):
    """The app's httpx client for the running server (made on first use, closed with the app)."""
    import httpx

    state = request.app.state
    if getattr(state, "relay", None) is None:
        state.relay = httpx.AsyncClient(timeout=httpx.Timeout(RELAY_TIMEOUT_S, connect=5.0))
    return state.relay


async def relay(request: Request, method: str, path: str, body: dict | None = None) -> Response:
    """Send the request to the running server and stream its answer back (status and content type kept)."""
    import httpx

    play = playground_of(request)
    client = relay_client(request)
    auth = {"Authorization": f"Bearer {play.api_key}"} if play.api_key else {}
    outgoing = client.build_request(method, play.url + path, json=body, headers=auth)
    try:
        answer = await client.send(outgoing, stream=True)
    except httpx.HTTPError as err:
        raise UiError(502, f"no answer from peftkit serve at {play.url} ({type(err).__name__}: {err}); is it "
                           f"running? start it with `peftkit serve --model ... --port {urlsplit(play.url).port}`")
    kind = answer.headers.get("content-type", "application/json")
    return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, media_type=kind,
                             headers={"Cache-Control": "no-cache"}, background=BackgroundTask(answer.aclose))


@router.get("/api/playground")
def playground_info(request: Request) -> dict:
    return playground_of(request).info()


def proxy_router() -> APIRouter:
    """The /api/play/v1 routes that relay to a running server (proxy mode only)."""
    proxy = APIRouter()

    @proxy.get("/api/play/v1/models")
    async def models(request: Request) -> Response:
        return await relay(request, "GET", "/v1/models")

    @proxy.post("/api/play/v1/completions")
    async def completions(request: Request, body: PlayRequest) -> Response:
        return await relay(request, "POST", "/v1/completions", checked(request, body, chat=False))

    @proxy.post("/api/play/v1/chat/completions")
    async def chat(request: Request, body: PlayRequest) -> Response:
        return await relay(request, "POST", "/v1/chat/completions", checked(request, body, chat=True))

    return proxy


def checked(request: Request, body: PlayRequest, chat: bool) -> dict:
    """The JSON to forward; 400 for a request the page would never send (both or neither of prompt and
    messages, max_tokens over the console's --max-tokens)."""
    limit = playground_of(request).max_tokens
    if body.max_tokens > limit:
        raise UiError(400, f"max_tokens {body.max_tokens} is over the console's limit of {limit} (--max-tokens)")
    if chat and (body.messages is None or body.prompt is not None):
        raise UiError(400, "chat/completions takes `messages` (a list of {role, content}) and no `prompt`")
    if not chat and (body.prompt is None or body.messages is not None):
        raise UiError(400, "completions takes a `prompt` string and no `messages`")
    return json.loads(body.model_dump_json(exclude_none=True))


# --- the in-process backend ----------------------------------------------------------------------------------------
ADAPTER_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def run_adapters(folder: Folder, model: str) -> dict[str, Path]:
    """name -> adapter folder of every run under the folder trained on `model` (its run_options.json says so)."""
    found: dict[str, Path] = {}
    same = {model, str(Path(model).expanduser().resolve())}
    runs, _ = folder.find()
    for run in runs:
        adapter = run / "adapter"
        try:
            options = folder.read_json(run / "run_options.json", required=False) or {}
        except UiError:
            continue
        trained_on = options.get("model")
        if not (adapter / "adapter_config.json").is_file() or not isinstance(trained_on, str):
            continue
        if trained_on in same or str(Path(trained_on).expanduser().resolve()) in same:
            name = ADAPTER_NAME.sub("-", folder.relative(run)).strip("-.")[:100] or "run"
            while name in found:
                name += "_"
            found[name] = adapter
    return found


def local_playground(folder: Folder, model: str, adapters: dict[str, str], adapter_dir: str | None = None,
                     dtype: str = "auto", device: str = "cpu", max_tokens: int = 256,
                     max_body_bytes: int = 256 << 10) -> Playground:
    """Load `model`, register the adapters (explicit ones, then the runs' own) and build peftkit serve's app
    over them; the caller mounts `.app` and starts `.engine`."""
    from .. import hf
    from ..models import load_model
    from ..serve.app import create_app
    from ..serve.cli import served_name
    from ..serve.engine import Engine
    from ..serve.registry import AdapterRegistry
    from ..precision import resolve_dtype
    from ..train.infer import stop_ids

    base, tokenizer = load_model(model, dtype=resolve_dtype(dtype, device).torch_dtype())
    if device != "cpu":
        base.to(device)
    every = {name: str(path) for name, path in run_adapters(folder, model).items()} | dict(adapters)
    registry = AdapterRegistry(base, adapter_dir=adapter_dir, adapters=every)
    engine = Engine(base, registry, max_batch=8, max_queue=64)
    name = served_name(model, None)
    app = create_app(engine, registry, tokenizer, model_name=name, context_length=hf.text_context_length(base),
                     stop_token_ids=tuple(stop_ids(base, tokenizer)), max_tokens_limit=max_tokens,
                     max_body_bytes=max_body_bytes, log_level=None)
    return Playground(mode="local", base=name, adapters=registry.names(), max_tokens=max_tokens, app=app,
                      engine=engine)
