"""POST /v1/completions and POST /v1/chat/completions: OpenAI's generation endpoints.

Each prompt and each of the `n` choices is one engine request; they share batches with everyone else's.
The reply is one JSON body, or with `stream: true` server-sent events (sse.py). `model` names the base or
an adapter; the registry judges the name (400 for a bad one, 404 for an unknown adapter), the route never
builds a path from it. Every request is counted in the metrics once, by model, endpoint and status.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .access import note
from .generation import Generation, collect, watch
from .limits import ApiError, status_of
from .schemas import ChatChoice, ChatCompletion, ChatRequest, Completion, CompletionChoice, CompletionRequest, Usage
from .service import ServeService, service_of
from .sse import stream_response

router = APIRouter()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    note(request, model=req.model)
    try:
        prompts = req.prompts()
    except ValueError as err:
        raise ApiError(400, str(err), param="prompt") from None
    return await generate(request, req, prompts, "completions", chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    note(request, model=req.model)
    prompt = await run_in_threadpool(service_of(request).render_chat, req)
    return await generate(request, req, [prompt], "chat.completions", chat=True)


async def generate(request: Request, req, prompts: list, endpoint: str, chat: bool):
    """Start the request's engine requests and answer with JSON or a stream; a refused request is counted."""
    service = service_of(request)
    t0 = time.perf_counter()
    request.state.counted = True  # from here every outcome is counted, so the 500 handler does not count it again
    try:
        handles = await service.start(req, prompts)
    except Exception as err:
        status = status_of(err)
        service.finish(request, req.model, endpoint, status, time.perf_counter() - t0)
        raise
    gen = Generation.of(req, handles, service.tok, chat, endpoint, t0)
    if req.stream:
        return stream_response(request, service, gen)
    return await json_response(request, service, gen)


async def json_response(request: Request, service: ServeService, gen: Generation) -> JSONResponse:
    """The whole reply at once; the engine requests are cancelled if the client leaves before it is ready,
    and the request is then counted as 499 (client closed request), not as a 200 nobody received."""
    watcher = watch(request, gen)
    model, status = gen.req.model, 500
    try:
        texts = await asyncio.gather(*(collect(h, s) for h, s in zip(gen.handles, gen.streams)))
        usage = gen.usage()
        result = reply(gen, texts, gen.reasons(), usage)
        if gen.gone:
            status = 499
            return JSONResponse(result.model_dump(), status_code=499)  # nobody reads it
        status = 200
        service.finish(request, model, gen.endpoint, 200, gen.elapsed(), usage.prompt_tokens, usage.completion_tokens)
        return JSONResponse(result.model_dump())
    except Exception as err:
        status = status_of(err)
        raise
    finally:
        watcher.cancel()
        gen.cancel()
        if status != 200:
            service.finish(request, model, gen.endpoint, status, gen.elapsed())


def reply(gen: Generation, texts: list[str], reasons: list[str], usage: Usage) -> ChatCompletion | Completion:
    """OpenAI's completion (or chat completion) object for the finished choices."""
    if gen.chat:
        choices = [ChatChoice(index=i, message={"content": t}, finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return ChatCompletion(id=gen.rid, model=gen.req.model, choices=choices, usage=usage)
    choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return Completion(id=gen.rid, model=gen.req.model, choices=choices, usage=usage)
