"""The console's access token (ui/auth.py): required with --allow-remote (made and printed when not given),
optional on loopback; a browser opens the printed ?token= address once (an HttpOnly, SameSite=Strict cookie, then
a redirect without the token), scripts send a Bearer header, anything else is 401 naming where the token comes
from."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from ui_helpers import shared_folder

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request, WebSocket  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from peftkit.cli import main  # noqa: E402
from peftkit.ui.app import create_app  # noqa: E402
from peftkit.ui.auth import check_token, new_token  # noqa: E402

LOCAL = "http://127.0.0.1"
TOKEN = "a-test-token-of-24-chars"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return shared_folder(tmp_path_factory)


def test_every_request_needs_the_token_and_the_error_says_where_it_comes_from(folder):
    with TestClient(create_app(folder["root"], token=TOKEN), base_url=LOCAL) as c:
        for path in ("/", "/api/runs", "/static/app.js", "/api/plan/choices"):
            res = c.get(path)
            assert res.status_code == 401, path
        body = c.get("/api/runs").json()["error"]
        assert body["status"] == 401 and "?token=" in body["message"] and "Bearer" in body["message"]
        assert c.get("/api/runs").headers["www-authenticate"] == "Bearer"
        assert c.post("/api/plan", json={"model": "llama-2-7b"}).status_code == 401
        for wrong in ("Bearer not-the-token-at-all", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
            assert c.get("/api/runs", headers={"Authorization": wrong}).status_code == 401, wrong
        ok = c.get("/api/runs", headers={"Authorization": f"bearer {TOKEN}"})
        assert ok.status_code == 200 and len(ok.json()["runs"]) == 3
        assert c.get("/api/runs", headers={"Cookie": "peftkit_ui_token=wrong; other=1"}).status_code == 401
        assert c.get("/api/runs", headers={"Cookie": '"\\broken=;;'}).status_code == 401


def test_the_printed_address_sets_a_strict_cookie_and_redirects_without_the_token(folder):
    with TestClient(create_app(folder["root"], token=TOKEN, token_cookie="peftkit_ui_token_7860"),
                    base_url=LOCAL) as c:
        assert c.get(f"/?token={TOKEN}x", follow_redirects=False).status_code == 401
        assert c.post(f"/api/plan?token={TOKEN}", json={}).status_code == 401  # only a page load sets it
        res = c.get(f"/api/runs?token={TOKEN}&path=runs", follow_redirects=False)
        assert res.status_code == 303 and res.headers["location"] == "/api/runs?path=runs"
        cookie = res.headers["set-cookie"]
        assert cookie.startswith(f"peftkit_ui_token_7860={TOKEN};")
        assert all(p in cookie for p in ("HttpOnly", "SameSite=Strict", "Path=/"))
        page = c.get(f"/?token={TOKEN}")  # the client follows the redirect with the cookie, as a browser does
        assert page.status_code == 200 and 'id="page-runs"' in page.text and str(page.url) == LOCAL + "/"
        assert c.get("/api/runs").status_code == 200  # the cookie now goes with every request


def test_tokens_are_random_long_enough_and_url_safe(capsys, folder):
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 32 and check_token(a) == a
    for bad, why in (("short", "16 to 256"), ("x" * 300, "16 to 256"), ("a token with spaces!", "only letters"),
                     ("ünïcödé-token-value-x", "only letters")):
        with pytest.raises(ValueError, match=why):
            check_token(bad)
    assert main(["ui", str(folder["root"]), "--port", "0", "--token", "short"]) == 2
    assert "--token must be 16 to 256 characters" in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python process importing torch: 3-8 s
def test_allow_remote_makes_a_token_prints_it_in_the_address_and_requires_it(folder):
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "ui", str(folder["root"]), "--port", "0",
                             "--host", "0.0.0.0", "--allow-remote"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"at http://0\.0\.0\.0:(\d+)/\?token=([A-Za-z0-9_\-]{32,}) ", line)
        assert found, line
        base, token = f"http://127.0.0.1:{found.group(1)}", found.group(2)
        assert httpx.get(base + "/api/runs", timeout=10).status_code == 401
        res = httpx.get(base + "/api/runs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert res.status_code == 200 and len(res.json()["runs"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "every request needs the access token" in proc.stderr.read()


def test_the_redirect_stays_on_this_site_whatever_the_path(folder):
    from peftkit.ui.auth import same_site_path

    for raw, where in ((b"//evil.example", "/evil.example"), (b"/\\evil.example", "/%5Cevil.example"),
                       (b"/%2F%2Fevil.example", "/%2F%2Fevil.example"), (b"/a%3Fb", "/a%3Fb"),
                       ("/\u20ac".encode(), "/%E2%82%AC"), (b"/runs/a b", "/runs/a%20b")):
        assert same_site_path({"raw_path": raw, "path": "/"}) == where, raw
    assert same_site_path({"path": "/x y", "root_path": "/console"}) == "/console/x%20y"  # no raw_path given
    with TestClient(create_app(folder["root"], token=TOKEN), base_url=LOCAL) as c:
        for path, where in (("/%2F%2Fevil.example", "/%2F%2Fevil.example"), ("/%E2%82%AC", "/%E2%82%AC")):
            res = c.get(f"{path}?token={TOKEN}", follow_redirects=False)
            assert res.status_code == 303 and res.headers["location"] == where, (path, res.headers)


def test_other_sites_odd_cookies_do_not_hide_the_token_and_websockets_need_it_too(folder):
    from starlette.testclient import WebSocketDenialResponse
    from starlette.websockets import WebSocketDisconnect

    app = create_app(folder["root"], token=TOKEN, allowed_hosts=None)  # the test client's websocket Host

    @app.websocket("/ws-probe")
    async def probe(ws: WebSocket):  # the console has no websocket route; a future one must be gated as well
        await ws.accept()
        await ws.send_text("in")
        await ws.close()

    with TestClient(app, base_url=LOCAL) as c:
        odd = f'prefs={{"a":1}}; a[b]=1; a b=1; peftkit_ui_token={TOKEN}'
        assert c.get("/api/runs", headers={"Cookie": odd}).status_code == 200
        with pytest.raises((WebSocketDisconnect, WebSocketDenialResponse)), c.websocket_connect("/ws-probe") as ws:
            ws.receive_text()
        with c.websocket_connect("/ws-probe", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            assert ws.receive_text() == "in"


def test_a_bad_token_from_the_environment_is_refused_before_anything_loads(folder, monkeypatch, capsys):
    monkeypatch.setenv("PEFTKIT_UI_TOKEN", "too short")
    assert main(["ui", str(folder["root"]), "--port", "0", "--model", "/no/such/model"]) == 2
    assert "--token must be 16 to 256 characters" in capsys.readouterr().err  # not the missing model


def test_the_playground_relay_sends_the_servers_api_key(folder):
    from ui_helpers import Served

    from peftkit.ui.api_play import Playground

    echo = FastAPI()

    @echo.get("/v1/models")
    def models(request: Request) -> dict:  # stands in for `peftkit serve --api-key`: says what it was sent
        return {"object": "list", "data": [], "auth": request.headers.get("authorization")}

    with Served(echo) as server:
        for key, sent in (("serve-key-123", "Bearer serve-key-123"), (None, None)):
            proxy = Playground(mode="proxy", url=server.url, max_tokens=8, api_key=key)
            with TestClient(create_app(folder["root"], proxy), base_url=LOCAL) as c:
                assert c.get("/api/play/v1/models").json()["auth"] == sent
