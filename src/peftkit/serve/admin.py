"""The admin endpoints of `peftkit serve`: list, load and unload adapters at run time.

They exist only when the server was started with --admin-token (otherwise 404, so an open server cannot be
reconfigured), and every call needs `Authorization: Bearer <token>` (401 otherwise). Names go to the registry
as they are; it rejects bad names (400) and unknown adapters (404).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .limits import ApiError

router = APIRouter(prefix="/admin/adapters")


def add_admin_routes(app: FastAPI, registry, token: str) -> None:
    """GET /admin/adapters, POST /admin/adapters/{name}/load, DELETE /admin/adapters/{name}: Bearer `token`.
    Without an admin token these routes do not exist (404), so an open server cannot be reconfigured."""
    app.state.admin_registry, app.state.admin_token = registry, token
    app.include_router(router, include_in_schema=False)  # /openapi.json is public: it does not advertise them


def authorized(request: Request):
    """The registry to administer, once the request's Bearer token matched the server's (401 otherwise)."""
    check_bearer(request.headers.get("authorization"), request.app.state.admin_token)
    return request.app.state.admin_registry


@router.get("")
async def loaded(request: Request):
    registry = authorized(request)
    return {"object": "list", "data": await run_in_threadpool(registry.info),
            "available": await run_in_threadpool(registry.names), "stats": registry.stats()}


@router.post("/{name}/load")
async def load(name: str, request: Request):
    registry = authorized(request)
    return await run_in_threadpool(registry.load, name)


@router.delete("/{name}")
async def unload(name: str, request: Request):
    registry = authorized(request)
    if not await run_in_threadpool(registry.unload, name):
        raise ApiError(404, f"adapter {name!r} is not loaded, so there is nothing to unload; GET /admin/adapters "
                       "lists the loaded ones", code="not_loaded")
    return {"name": name, "unloaded": True}


def check_bearer(header: str | None, token: str, what: str = "admin endpoints", flag: str = "--admin-token"
                 ) -> None:
    """Raise 401 unless `header` is "Bearer <token>" (the scheme in any case, as RFC 9110 says; the token
    compared in constant time). `what` and `flag` name the guarded endpoints and the server's option."""
    scheme, _, given = (header or "").strip().partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, f"{what} need the header `Authorization: Bearer <token>` with the server's {flag}",
                       code="invalid_api_key")


def api_key_guard(request: Request) -> None:
    """An app-wide dependency: with --api-key, the /v1 endpoints need it as a Bearer token (as vLLM's --api-key
    and OpenAI's clients do); /health and /metrics stay open for probes. It goes by the matched route's own path,
    so the app mounted under a prefix or behind a proxy's root_path is guarded the same."""
    key = getattr(request.app.state, "api_key", None)
    route = request.scope.get("route")
    if key and (route is None or str(getattr(route, "path", "/v1/")).startswith("/v1/")):
        check_bearer(request.headers.get("authorization"), key, "the /v1 endpoints", "--api-key")
