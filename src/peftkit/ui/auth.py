"""The console's access token (`peftkit ui --token`, required with --allow-remote), in the manner of Jupyter's.

`peftkit ui` prints the console's address with `?token=...`. Opening it sets an HttpOnly, SameSite=Strict cookie
holding the token and redirects to the same page without it, so the token leaves the address bar and the page's
own requests carry the cookie. Scripts send `Authorization: Bearer <token>` instead. Any other request is answered
401 with the console's JSON error, saying where the token comes from. Tokens are compared in constant time;
the cookie's name carries the port, so consoles on two ports of one host keep apart.
"""

from __future__ import annotations

import hmac
import json
import secrets
from urllib.parse import parse_qsl, quote, quote_from_bytes, urlencode

from starlette.requests import cookie_parser

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 256
COOKIE_MAX_AGE_S = 7 * 24 * 3600


def new_token() -> str:
    """A fresh random token (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    """The token if it is usable; ValueError naming the rule otherwise (too short to resist guessing, too long, or
    characters that do not survive a URL and a cookie unescaped)."""
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise ValueError(f"--token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters (got {len(token)}); "
                         "leave it out to have one made")
    if not all(c.isascii() and (c.isalnum() or c in "-_.~") for c in token):
        raise ValueError("--token may hold only letters, digits and - _ . ~ (it travels in a URL and a cookie)")
    return token


def same_site_path(scope) -> str:
    """The request's path as a Location that stays on this site: from the bytes the client sent (so an encoded
    `?` or `/` stays encoded), re-quoted to plain ASCII, and with one leading slash (`//host` or `/\\host` would
    be read as another site)."""
    raw = scope.get("raw_path") or quote(scope.get("root_path", "") + scope.get("path", "/")).encode()
    text = quote_from_bytes(raw.split(b"?", 1)[0], safe="/%:@!$&'()*+,;=-._~")
    return "/" + text.lstrip("/")


class TokenGate:
    """ASGI middleware: every HTTP request needs the token (cookie, Bearer header, or ?token= which sets the
    cookie and redirects to the address without it); 401 otherwise."""

    def __init__(self, app, token: str, cookie: str = "peftkit_ui_token") -> None:
        self.app, self.token, self.cookie = app, check_token(token), cookie

    def _matches(self, given: str | None) -> bool:
        return bool(given) and len(given) <= MAX_TOKEN_CHARS and hmac.compare_digest(given.encode(),
                                                                                     self.token.encode())

    def _from_headers(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and self._matches(given.strip()):
            return True
        # the browser's parsing (Starlette's), not SimpleCookie's, which gives up at another site's odd cookie
        cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1")[:16384])
        return self._matches(cookies.get(self.cookie))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket" and not self._from_headers(dict(scope.get("headers") or [])):
            await receive()  # the connect event, then a refusal (HTTP 403 to the client)
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given and self._matches(given[-1]) and scope.get("method") in ("GET", "HEAD"):  # the printed address
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            location = same_site_path(scope) + (f"?{rest}" if rest else "")
            cookie = (f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}")
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode()),
                                    (b"cache-control", b"no-store"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if self._from_headers(dict(scope.get("headers") or [])):
            await self.app(scope, receive, send)
            return
        message = ("this console needs its access token: open the address `peftkit ui` printed (it ends in "
                   "?token=...), or send the header `Authorization: Bearer <token>`")
        body = json.dumps({"error": {"message": message, "status": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
