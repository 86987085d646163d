"""Bearer-token authentication on every route, as plain ASGI middleware (it runs before routing, so an
unknown path without a token is a 401 too, and streaming responses pass through untouched).

API clients send ``Authorization: Bearer <token>``. The dashboard, a page a browser navigates to, signs in
once through a form that sets an HttpOnly, SameSite=Strict cookie holding the token; the cookie is accepted
for GET and HEAD only, so a cookie can read the dashboard's data but never create, cancel or delete
anything (no cross-site request can act with it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie

COOKIE = "tunesmith_token"
_OPEN = {("POST", "/dashboard/login")}  # checks the token it is given itself
_LOGIN_PAGES = {"/", "/dashboard"}


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuth:
    def __init__(self, app, tokens: list[str], login_page: bytes):
        self.app = app
        self.digests = [fingerprint(t) for t in tokens]
        self.login_page = login_page

    def check(self, token: str | None) -> str | None:
        """The token's fingerprint when it is one of ours (compared in constant time), else None."""
        if not token:
            return None
        fp = fingerprint(token)
        ok = False
        for d in self.digests:
            ok |= hmac.compare_digest(d, fp)
        return fp if ok else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if (method, path) in _OPEN:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        token, fp = _bearer(headers.get(b"authorization")), None
        if token is not None:
            fp = self.check(token)
        elif method in ("GET", "HEAD"):
            fp = self.check(_cookie(headers.get(b"cookie")))
        if fp is not None:
            scope.setdefault("state", {})["token_fp"] = fp
            return await self.app(scope, receive, send)
        if method == "GET" and path in _LOGIN_PAGES:
            return await _send(send, 401, "text/html; charset=utf-8", self.login_page)
        message = ("Incorrect API token provided." if token is not None else
                   "Missing API token: send the header 'Authorization: Bearer <token>' (tokens come from "
                   "`tunesmith serve --token-file` or $TUNESMITH_API_TOKENS).")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await _send(send, 401, "application/json", body, [(b"www-authenticate", b"Bearer")])


def _bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _cookie(value: bytes | None) -> str | None:
    if not value:
        return None
    jar = SimpleCookie()
    try:
        jar.load(value.decode("latin-1"))
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


async def _send(send, status: int, content_type: str, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
