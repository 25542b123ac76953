"""The HTTP app of `peftkit serve`: OpenAI's /v1/models, /v1/completions and /v1/chat/completions on top of
the batching Engine, plus /health, /metrics and (with an admin token) adapter load/unload.

    app = create_app(engine, registry, tokenizer, model_name="smollm2", stop_token_ids=(2,))
    uvicorn.run(app, host="127.0.0.1", port=8000)

`model` in a request names the base (`model_name`) or an adapter; the name goes to the registry as it
is, which rejects bad names (400) and unknown adapters (404): the app never builds a path from it.
Each prompt and each of the `n` choices is one engine request; they share batches with everyone else's.
Errors use OpenAI's JSON shape with the status a client's SDK maps to its exception classes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .request import EngineClosed, GenRequest, QueueFull
from .limits import ApiError, BodyLimit, validation_message
from .registry import AdapterError
from .schemas import (ChatChoice, ChatCompletion, ChatCompletionChunk, ChatRequest, ChunkChoice, Completion,
                      CompletionChoice, CompletionRequest, Delta, ModelCard, ModelList, Usage, error_body)
from .textstream import LockedTokenizer, TextStream

MAX_ROWS = 64  # prompts x n in one request
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable"}


def _status(err: BaseException) -> int:
    if isinstance(err, (ApiError, AdapterError)):
        return err.status
    return 429 if isinstance(err, QueueFull) else 500


def _error_response(err: BaseException) -> JSONResponse:
    status = _status(err)
    if isinstance(err, QueueFull):
        message = f"the server's request queue is full ({err}); retry after a short wait"
    else:
        message = getattr(err, "message", None) or str(err) or type(err).__name__
    code = getattr(err, "code", None) or {404: "model_not_found", 422: "invalid_adapter", 429: "queue_full",
                                          503: "no_free_adapter_slot"}.get(status)
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "server_error"), code,
                                   getattr(err, "param", None)), status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their engine requests however the response ends, also when the client
    leaves before the first event (then the body generator never starts, so its own cleanup cannot run)."""

    def __init__(self, body: AsyncIterator[str], handles: list, on_close) -> None:
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


def create_app(engine, registry, tokenizer, *, model_name: str, context_length: int | None = None,
               stop_token_ids: tuple[int, ...] | list[int] = (), max_tokens_limit: int = 2048,
               max_body_bytes: int = 1 << 20, admin_token: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller, and closed by it after the server stops).

    context_length: the model's positions; a prompt plus max_tokens beyond it is refused with 400.
    stop_token_ids: ids that end every reply (eos, end of turn). admin_token: enables /admin/adapters."""
    from .metrics import Metrics

    app = FastAPI(title="peftkit serve", summary="OpenAI-compatible serving of many LoRA adapters on one base",
                  docs_url=None, redoc_url=None)
    metrics = Metrics(registry.stats, engine.stats)
    tok = LockedTokenizer(tokenizer)
    vocab = len(tokenizer)
    started = int(time.time())
    stops = tuple(int(i) for i in stop_token_ids)
    app.state.metrics, app.state.engine, app.state.registry = metrics, engine, registry

    def endpoint_of(path: str) -> str:
        """A bounded label: the generation endpoints by name, any other path as "other"."""
        return {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}.get(path, "other")

    def model_label(model: str, status: int) -> str:
        """The request's model as a metrics label; names that were refused share one label (bounded)."""
        if model == model_name or status < 400:
            return model
        return model if status not in (400, 404) and registry.has(model) else "_invalid"

    app.add_middleware(BodyLimit, limit=max_body_bytes,
                       on_reject=lambda path: metrics.observe("_invalid", endpoint_of(path), 413, 0.0))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        metrics.observe("_invalid", endpoint_of(request.url.path), 400, 0.0)
        message, param = validation_message(err.errors())
        return _error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        status = err.status_code
        detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if status == 404:
            detail = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, " \
                     "POST /v1/chat/completions, GET /health, GET /metrics"
        return JSONResponse(error_body(detail, ERROR_TYPES.get(status, "invalid_request_error")), status_code=status)

    for cls in (ApiError, AdapterError, QueueFull):
        app.add_exception_handler(cls, lambda request, err: _error_response(err))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        """Anything unexpected still answers in OpenAI's error JSON (500), naming the error."""
        metrics.observe("_invalid", endpoint_of(request.url.path), 500, 0.0)
        return JSONResponse(error_body(f"internal server error: {type(err).__name__}: {err}", "server_error", None),
                            status_code=500)

    # --- generation ---------------------------------------------------------------------------------------
    def prepare(prompts: list[str | list[int]], req) -> list[tuple[list[int], int]]:
        """(prompt ids, max_tokens) per prompt, after every limit check; nothing is submitted yet."""
        if len(prompts) * req.n > MAX_ROWS:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} completions; "
                           f"at most {MAX_ROWS} per request", param="n")
        asked = req.limit() if isinstance(req, ChatRequest) else req.max_tokens
        if asked is not None and asked > max_tokens_limit:
            raise ApiError(400, f"max_tokens={asked} is above this server's limit of {max_tokens_limit} "
                           "(--max-tokens-limit); ask for fewer tokens", param="max_tokens")
        out = []
        for i, prompt in enumerate(prompts):
            ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            if not ids:
                raise ApiError(400, f"{where} is empty; it needs at least one token to continue", param="prompt")
            if isinstance(prompt, list) and not all(0 <= t < vocab for t in ids):
                raise ApiError(400, f"{where} has token ids outside the vocabulary [0, {vocab})", param="prompt")
            room = (context_length - len(ids)) if context_length else max_tokens_limit
            if room < 1:
                raise ApiError(400, f"{where} has {len(ids)} tokens, at or above the model's context length of "
                               f"{context_length}; shorten it", param="prompt")
            default = 16 if isinstance(req, CompletionRequest) else max_tokens_limit
            max_tokens = asked if asked is not None else min(default, room)
            if max_tokens > room:
                raise ApiError(400, f"{where} has {len(ids)} tokens and max_tokens={max_tokens}: together more than "
                               f"the model's context length of {context_length}; lower max_tokens or shorten the "
                               "prompt", param="max_tokens")
            out.append((ids, max_tokens))
        return out

    def submit(prepared: list[tuple[list[int], int]], req) -> list:
        """One engine request per (prompt, choice); on any failure the ones already submitted are cancelled."""
        adapter = None if req.model == model_name else req.model
        handles = []
        try:
            for ids, max_tokens in prepared:
                for j in range(req.n):
                    seed = None if req.seed is None else req.seed + j
                    handles.append(engine.submit(GenRequest(
                        prompt_ids=list(ids), adapter=adapter, max_tokens=max_tokens, temperature=req.temperature,
                        top_p=req.top_p, seed=seed, stop_token_ids=stops)))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def start(request: Request, req, prompts: list) -> list:
        if bad := req.unsupported():
            raise ApiError(400, f"peftkit serve does not support {', '.join(bad)}; leave "
                           f"{'them' if len(bad) > 1 else 'it'} unset", param=bad[0])

        def work():
            try:
                return submit(prepare(prompts, req), req)
            except ValueError as err:  # the engine's own checks of a request
                raise ApiError(400, str(err)) from err
            except EngineClosed as err:  # the server is stopping
                raise ApiError(503, f"{err}; retry on another server or once this one is back",
                               code="shutting_down") from err

        return await run_in_threadpool(work)

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

    def used_tokens(handles: list, streams: list[TextStream]) -> int:
        """Completion tokens as the client got them: a reply cut by a stop string counts the tokens up to the
        match, not those the engine made before the cancel reached it (a number that depends on timing)."""
        return sum(len(s.ids) if s.stopped else h.completion_tokens for h, s in zip(handles, streams))

    def finish_reason(handle, stream: TextStream) -> str:
        return "stop" if stream.stopped else (handle.finish_reason or "stop")

    async def watch_disconnect(request: Request, handles: list) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for handle in handles:
            handle.cancel()

    async def generate(request: Request, req, prompts: list, endpoint: str, chat: bool):
        t0 = time.perf_counter()
        try:
            handles = await start(request, req, prompts)
        except Exception as err:
            metrics.observe(model_label(req.model, _status(err)), endpoint, _status(err), time.perf_counter() - t0)
            raise
        streams = [TextStream(tok, req.stops()) for _ in handles]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            recorded = False

            def record(status: int) -> None:
                """Count the stream once: when it ends, or as 499 if the client left (even before it began)."""
                nonlocal recorded
                if not recorded:
                    recorded = True
                    metrics.observe(model_label(req.model, status), endpoint, status, time.perf_counter() - t0,
                                    sum(h.prompt_tokens for h in handles[::req.n]),
                                    used_tokens(handles, streams))

            body = sse(request, req, handles, streams, rid, chat, record)
            return _EventStream(body, handles, lambda: record(499))
        watcher = asyncio.create_task(watch_disconnect(request, handles))
        status = 500
        try:
            texts = await asyncio.gather(*(collect(h, s) for h, s in zip(handles, streams)))
            usage = Usage(prompt_tokens=sum(h.prompt_tokens for h in handles[::req.n]),
                          completion_tokens=used_tokens(handles, streams), total_tokens=0)
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            reasons = [finish_reason(h, s) for h, s in zip(handles, streams)]
            if chat:
                choices = [ChatChoice(index=i, message={"content": t}, finish_reason=r)
                           for i, (t, r) in enumerate(zip(texts, reasons))]
                result = ChatCompletion(id=rid, model=req.model, choices=choices, usage=usage)
            else:
                choices = [CompletionChoice(index=i, text=t, finish_reason=r)
                           for i, (t, r) in enumerate(zip(texts, reasons))]
                result = Completion(id=rid, model=req.model, choices=choices, usage=usage)
            status = 200
            metrics.observe(req.model, endpoint, 200, time.perf_counter() - t0, usage.prompt_tokens,
                            usage.completion_tokens)
            return JSONResponse(result.model_dump())
        except Exception as err:
            status = _status(err)
            raise
        finally:
            watcher.cancel()
            for handle in handles:
                handle.cancel()
            if status != 200:
                metrics.observe(model_label(req.model, status), endpoint, status, time.perf_counter() - t0)

    async def collect(handle, stream: TextStream) -> str:
        async with aclosing(pieces(handle, stream)) as parts:
            return "".join([p async for p in parts])

    async def sse(request: Request, req, handles: list, streams: list, rid: str, chat: bool,
                  record) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, choices interleaved as their tokens come, then
        (with stream_options.include_usage) a usage chunk, then `data: [DONE]`."""
        queue: asyncio.Queue = asyncio.Queue()
        created = int(time.time())

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = Delta(role="assistant", content="") if role else Delta(content=text)
                body = ChatCompletionChunk(id=rid, created=created, model=req.model,
                                           choices=[ChunkChoice(index=index, delta=delta, finish_reason=reason)])
            else:
                body = Completion(id=rid, created=created, model=req.model,
                                  choices=[CompletionChoice(index=index, text=text or "", finish_reason=reason)])
            return f"data: {body.model_dump_json(exclude_none=chat)}\n\n"

        async def pump(index: int, handle, stream: TextStream) -> None:
            try:
                async with aclosing(pieces(handle, stream)) as parts:
                    async for piece in parts:
                        await queue.put((index, piece, None))
                await queue.put((index, None, finish_reason(handle, stream)))
            except Exception as err:  # noqa: BLE001 - reported to the client in the stream
                await queue.put((index, err, None))

        watcher = asyncio.create_task(watch_disconnect(request, handles))
        tasks = [asyncio.create_task(pump(i, h, s)) for i, (h, s) in enumerate(zip(handles, streams))]
        status, left = 499, len(tasks)  # 499: the client went away before the end
        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk(i, None, None, role=True)
            while left:
                index, piece, reason = await queue.get()
                if isinstance(piece, Exception):
                    status = _status(piece)
                    yield f"data: {json.dumps(error_body(str(piece), 'server_error'))}\n\n"
                    return
                if reason is not None:
                    left -= 1
                yield chunk(index, piece, reason)
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = Usage(prompt_tokens=sum(h.prompt_tokens for h in handles[::req.n]),
                              completion_tokens=used_tokens(handles, streams), total_tokens=0)
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                cls = ChatCompletionChunk if chat else Completion
                yield f"data: {cls(id=rid, created=created, model=req.model, choices=[], usage=usage).model_dump_json()}\n\n"
            status = 200
            record(status)  # before the last event, so a client that saw [DONE] finds the request counted
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            for task in tasks:
                task.cancel()
            for handle in handles:
                handle.cancel()
            record(status)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        try:
            prompts = req.prompts()
        except ValueError as err:
            raise ApiError(400, str(err), param="prompt") from None
        return await generate(request, req, prompts, "completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        def render() -> str:
            try:
                return tok.render_chat(req.rendered_messages())
            except ValueError as err:
                raise ApiError(400, str(err), param="messages") from err

        return await generate(request, req, [await run_in_threadpool(render)], "chat.completions", chat=True)

    # --- models, health, metrics ----------------------------------------------------------------------------
    def cards() -> list[ModelCard]:
        base = ModelCard(id=model_name, created=started)
        return [base] + [ModelCard(id=n, created=started, parent=model_name) for n in registry.names()
                         if n != model_name]

    @app.get("/v1/models")
    async def models():
        return ModelList(data=await run_in_threadpool(cards)).model_dump()

    @app.get("/v1/models/{model}")
    async def model(model: str):
        for card in await run_in_threadpool(cards):
            if card.id == model:
                return card.model_dump()
        raise ApiError(404, f"model {model!r} is neither the base ({model_name!r}) nor an adapter this server "
                       "has; GET /v1/models lists them", param="model")

    @app.get("/health")
    async def health():
        stats = registry.stats()
        return {"status": "ok", "model": model_name, "adapters_loaded": stats.get("loaded", 0),
                "queue_depth": engine.stats().get("queue_depth", 0)}

    @app.get("/metrics")
    async def metrics_text():
        return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)

    if admin_token:
        from .admin import add_admin_routes

        add_admin_routes(app, registry, admin_token)
    return app
