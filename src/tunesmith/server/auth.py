"""Who is asking: bearer tokens that belong to projects, dashboard sessions, and the headers every page carries.
Plain ASGI middleware (it runs before routing, so an unknown path without a token is a 401 too, and streaming
responses pass through untouched).

API clients send ``Authorization: Bearer <token>``. A token belongs to one project (token file lines
``TOKEN PROJECT [admin]``); what a project creates (files, jobs, fine-tuned models, their events) is visible
only to its tokens, and to admin tokens, which see every project. The request's ``Principal`` (project, admin)
is put in ``request.state.principal`` for the routes (http.py's lookups answer 404 across projects).

The dashboard, a page a browser navigates to, signs in once through a form; the cookie it gets holds a random
session id, never the token: bound to the token's project, read-only (GET and HEAD only, so no cross-site request
can act with it), expiring after ``session_ttl_s``, revoked by signing out, and forgotten when the server restarts
(sessions live in this process's memory). Failed sign-ins are throttled per client address.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.cookies import SimpleCookie

COOKIE = "tunesmith_session"
_OPEN = {("POST", "/dashboard/login"), ("POST", "/dashboard/logout")}  # they check what they are given themselves
_LOGIN_PAGES = {"/", "/dashboard"}


@dataclass(frozen=True)
class Token:
    token: str
    project: str = "default"
    admin: bool = False


@dataclass(frozen=True)
class Principal:
    fp: str  # the token's fingerprint (idempotency keys are per token)
    project: str
    admin: bool = False
    read_only: bool = False  # a dashboard session

    def sees(self, project: str | None) -> bool:
        return self.admin or project == self.project

    @property
    def scope(self) -> str | None:
        """The project to filter lists by; None (every project) for an admin."""
        return None if self.admin else self.project


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Dashboard sessions in memory: random id -> (principal, expiry). A restart forgets them all."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._by_id: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}  # drop expired ones
            self._by_id[sid] = (Principal(principal.fp, principal.project, principal.admin, read_only=True),
                                now + self.ttl_s)
        return sid

    def get(self, sid: str | None) -> Principal | None:
        if not sid:
            return None
        with self._lock:
            entry = self._by_id.get(sid)
            if entry is None or entry[1] <= time.monotonic():
                self._by_id.pop(sid, None)
                return None
            return entry[0]

    def revoke(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class Throttle:
    """At most ``limit`` failed sign-ins per client address in ``window_s``; past that every sign-in from the
    address is refused unchecked (429) until the oldest failure leaves the window."""

    def __init__(self, limit: int = 10, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds to wait before the next try is checked; 0 when it may be checked now."""
        with self._lock:
            q = self._trim(client)
            return 0.0 if len(q) < self.limit else q[0] + self.window_s - time.monotonic()

    def failed(self, client: str) -> None:
        with self._lock:
            self._trim(client).append(time.monotonic())

    def _trim(self, client: str) -> deque:
        q = self._fails.setdefault(client, deque())
        while q and q[0] <= time.monotonic() - self.window_s:
            q.popleft()
        return q


class TokenAuth:
    def __init__(self, app, tokens: list[Token], login_page: bytes, sessions: Sessions | None = None):
        self.app = app
        self.entries = [(fingerprint(t.token), t) for t in tokens]
        self.login_page = login_page
        self.sessions = sessions or Sessions(8 * 3600)

    def check(self, token: str | None) -> Principal | None:
        """The token's principal when it is one of ours (compared in constant time, against every token), else None."""
        if not token:
            return None
        fp, found = fingerprint(token), None
        for digest, entry in self.entries:
            if hmac.compare_digest(digest, fp):
                found = entry
        return Principal(fp, found.project, found.admin) if found else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        if (method, path) in _OPEN:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        token, who = _bearer(headers.get(b"authorization")), None
        if token is not None:
            who = self.check(token)
        elif method in ("GET", "HEAD"):
            who = self.sessions.get(session_id(headers.get(b"cookie")))
        if who is not None:
            scope.setdefault("state", {})["principal"] = who
            return await self.app(scope, receive, send)
        if method == "GET" and path in _LOGIN_PAGES:
            return await _send(send, 401, "text/html; charset=utf-8", self.login_page)
        message = ("Incorrect API token provided." if token is not None else
                   "Missing API token: send the header 'Authorization: Bearer <token>' (tokens come from "
                   "`tunesmith serve --token-file` or $TUNESMITH_API_TOKENS).")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await _send(send, 401, "application/json", body, [(b"www-authenticate", b"Bearer")])


class SecurityHeaders:
    """On every response: a Content-Security-Policy (no scripts but the dashboard's own, by hash; no framing:
    frame-ancestors 'none', and X-Frame-Options for older browsers), no MIME sniffing, no referrer. A route that
    sets its own policy (the report: sandboxed) keeps it."""

    def __init__(self, app, script_hashes: list[str]):
        self.app = app
        scripts = " ".join(f"'sha256-{h}'" for h in script_hashes) or "'none'"
        self.csp = (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src 'self' data:; "
                    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"content-security-policy" not in names:
                    headers.append((b"content-security-policy", self.csp))
                headers += [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                message = message | {"headers": headers}
            await send(message)

        return await self.app(scope, receive, with_headers)


def script_hashes(page: bytes) -> list[str]:
    """CSP hashes (base64 sha256) of a page's inline <script> blocks."""
    import base64
    import re

    return [base64.b64encode(hashlib.sha256(m).digest()).decode()
            for m in re.findall(rb"<script>(.*?)</script>", page, flags=re.S)]


def _bearer(value: bytes | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def session_id(value: bytes | str | None) -> str | None:
    if not value:
        return None
    jar = SimpleCookie()
    try:
        jar.load(value.decode("latin-1") if isinstance(value, bytes) else value)
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel else None


async def _send(send, status: int, content_type: str, body: bytes, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
