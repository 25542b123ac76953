"""GET /v1/models (the base, then every adapter the server can serve), GET /v1/models/{model}, GET /health
and GET /metrics (Prometheus text format). Reads only: nothing here loads an adapter or touches the engine's
queue, so these stay fast while the server is busy generating.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .schemas import ModelList
from .service import service_of

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request):
    return ModelList(data=await run_in_threadpool(service_of(request).cards)).model_dump()


@router.get("/v1/models/{model}")
async def model(model: str, request: Request):
    return (await run_in_threadpool(service_of(request).card, model)).model_dump()


@router.get("/health")
async def health(request: Request):
    return service_of(request).health()


@router.get("/metrics")
async def metrics_text(request: Request):
    metrics = service_of(request).metrics
    return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)
