"""The console's FastAPI app: the static page, the JSON API of each page, the playground's backend, and the
limits every request meets (a body limit, the Host check against DNS rebinding, errors as JSON that say what
to do).

    app = create_app("runs/")                                   # runs, plan, sweeps
    app = create_app("runs/", playground=local_playground(...))  # and the playground
    uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..serve.limits import BodyLimit
from . import api_play, api_plan, api_runs, api_sweeps
from .api_play import Playground
from .auth import TokenGate
from .folder import Folder, UiError

STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_BODY_BYTES = 256 << 10


def error(status: int, message: str) -> JSONResponse:
    """The one error shape of the console (OpenAI's, as the playground's server answers too)."""
    return JSONResponse({"error": {"message": message, "status": status}}, status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    async def ui_error(request: Request, err: UiError) -> JSONResponse:
        return error(err.status, err.message)

    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                 for e in err.errors()[:10]]
        return error(400, "invalid request: " + "; ".join(lines))

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no page or API at {request.url.path}; open / for the console"
        return error(err.status_code, message)

    app.add_exception_handler(UiError, ui_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


def create_app(root: str | Path, playground: Playground | None = None,
               allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS, max_body_bytes: int = MAX_BODY_BYTES,
               token: str | None = None, token_cookie: str = "peftkit_ui_token") -> FastAPI:
    """The console over the folder `root`. allowed_hosts: the Host headers answered (loopback names by default,
    so a web page cannot reach the console through DNS rebinding); None answers any (with --allow-remote).
    token: every request must carry it (auth.py; --token, made for --allow-remote). A local playground's engine
    is started with the app and closed after it."""
    folder = Folder(root)
    play = playground or Playground()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if play.engine is not None:
            play.engine.start()
        try:
            yield
        finally:
            if getattr(app.state, "relay", None) is not None:
                await app.state.relay.aclose()
            if play.engine is not None:
                play.engine.close()

    app = FastAPI(title="peftkit ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.folder, app.state.playground, app.state.relay, app.state.token = folder, play, None, token
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if token is not None:
        app.add_middleware(TokenGate, token=token, cookie=token_cookie)
    if allowed_hosts is not None:  # added last, so it runs first
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    add_error_handlers(app)
    for router in (api_runs.router, api_sweeps.router, api_plan.router, api_play.router):
        app.include_router(router)
    if play.mode == "proxy":
        app.include_router(api_play.proxy_router())

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if play.mode == "local":
        app.mount("/api/play", play.app)
    return app
