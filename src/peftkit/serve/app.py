"""The HTTP app of `peftkit serve`: OpenAI's /v1/models, /v1/completions and /v1/chat/completions on top of
the batching Engine, plus /health, /metrics and (with an admin token) adapter load/unload.

    app = create_app(engine, registry, tokenizer, model_name="smollm2", stop_token_ids=(2,))
    uvicorn.run(app, host="127.0.0.1", port=8000)

This file assembles the app: the service object the routes call (service.py), the routers
(routes_completions.py, routes_models.py, admin.py), the body limit, and the error handlers that make every
failure answer in OpenAI's JSON shape with the status a client's SDK maps to its exception classes.
`model` in a request names the base (`model_name`) or an adapter; the name goes to the registry as it
is, which rejects bad names (400) and unknown adapters (404): the app never builds a path from it.
"""

from __future__ import annotations

import json

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import routes_completions, routes_models
from .access import AccessLog, configure_logging
from .admin import api_key_guard
from .limits import ERROR_TYPES, ApiError, BodyLimit, CatchErrors, error_response, validation_message
from .request import QueueFull
from .schemas import error_body
from .service import ServeService, service_of
from .validate import AdapterError


def create_app(engine, registry, tokenizer, *, model_name: str, context_length: int | None = None,
               stop_token_ids: tuple[int, ...] | list[int] = (), max_tokens_limit: int = 2048,
               max_body_bytes: int = 1 << 20, admin_token: str | None = None, api_key: str | None = None,
               log_level: str | int | None = "INFO") -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller, and closed by it after the server stops).

    context_length: the model's positions; a prompt plus max_tokens beyond it is refused with 400.
    stop_token_ids: ids that end every reply (eos, end of turn). admin_token: enables /admin/adapters.
    api_key: the /v1 endpoints need it as a Bearer token (401 otherwise; /health and /metrics stay open).
    log_level: the access and adapter logs go to stderr at this level (access.py), unless the application
    configured the "peftkit.serve" logger already; None leaves logging alone."""
    if log_level is not None:
        configure_logging(log_level)
    app = FastAPI(title="peftkit serve", summary="OpenAI-compatible serving of many LoRA adapters on one base",
                  docs_url=None, redoc_url=None, dependencies=[Depends(api_key_guard)])
    app.state.api_key = api_key or None
    service = ServeService(engine, registry, tokenizer, model_name=model_name, context_length=context_length,
                           stop_token_ids=stop_token_ids, max_tokens_limit=max_tokens_limit)
    app.state.service = service
    app.state.metrics, app.state.engine, app.state.registry = service.metrics, engine, registry
    app.add_middleware(BodyLimit, limit=max_body_bytes,
                       on_reject=lambda path: service.observe_refused(path, 413))
    app.add_middleware(CatchErrors, respond=internal_error)  # it also covers BodyLimit
    app.add_middleware(AccessLog)  # the outermost of ours: one line per request, whatever answered it
    add_error_handlers(app)
    app.include_router(routes_completions.router)
    app.include_router(routes_models.router)
    if admin_token:
        from .admin import add_admin_routes

        add_admin_routes(app, registry, admin_token)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's error JSON: validation (400), unknown routes, ours, the registry's and
    a full queue (429); anything unexpected (500) is answered by the CatchErrors middleware."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    for cls in (ApiError, AdapterError, QueueFull):
        app.add_exception_handler(cls, api_error)


async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """A body that does not fit the schema: 400 with one line per field (FastAPI's default is 422)."""
    service_of(request).observe_refused(request.url.path, 400)
    message, param = validation_message(err.errors())
    return error_response(ApiError(400, message, param=param))


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    status = err.status_code
    detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
    if status == 404:
        detail = f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, " \
                 "POST /v1/chat/completions, GET /health, GET /metrics"
    return JSONResponse(error_body(detail, ERROR_TYPES.get(status, "invalid_request_error")), status_code=status)


def api_error(request: Request, err: Exception) -> JSONResponse:
    return error_response(err)


async def internal_error(request: Request, err: Exception) -> JSONResponse:
    """Anything unexpected still answers in OpenAI's error JSON (500), naming the error; counted unless the
    endpoint counted it already."""
    if not getattr(request.state, "counted", False):
        service_of(request).observe_refused(request.url.path, 500)
    return JSONResponse(error_body(f"internal server error: {type(err).__name__}: {err}", "server_error", None),
                        status_code=500)
