"""The HTTP API: OpenAI's Files, Fine-tuning and Chat Completions shapes, plus the dashboard.

Routes (all behind bearer-token auth, see auth.py; files in routes_files.py, jobs in routes_jobs.py,
models and chat in routes_chat.py, the dashboard here):

    POST   /v1/files                               upload (multipart: file, purpose=fine-tune), validated
    GET    /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST   /v1/fine_tuning/jobs                    create (Idempotency-Key header honoured)
    GET    /v1/fine_tuning/jobs                    list, newest first, `after` + `limit`
    GET    /v1/fine_tuning/jobs/{id}               retrieve;   POST .../cancel, .../pause, .../resume
    GET    /v1/fine_tuning/jobs/{id}/events        newest first, `after` + `limit`
    GET    /v1/fine_tuning/jobs/{id}/checkpoints
    GET    /v1/fine_tuning/jobs/{id}/metrics       tunesmith extension: loss points after `since` (dashboard)
    GET    /v1/fine_tuning/jobs/{id}/report[/...]  the run's report.html (and its images), when written
    GET    /v1/models, /v1/models/{id};  DELETE /v1/models/{id};  POST /v1/chat/completions (stream or not)
    POST   /v1/images/generations                  text-to-image models, base and fine-tuned (routes_images.py)
    POST   /v1/fine_tuning/alpha/graders/run, .../validate   a grader on one answer; a grader checked
    GET    /, /dashboard;  POST /dashboard/login, /dashboard/logout

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status the hosted API uses.
Handlers that write, read files or generate are plain ``def`` (FastAPI runs them in its thread pool). The
routes a dashboard polls (job list, job, events, metrics) are ``async``: each is one or two indexed reads
of the WAL database, which never wait for the writer and take well under a millisecond, less than the
hop to a pool thread; under 50 polling clients that hop and the GIL contention of 40 threads dominated.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import COOKIE, SecurityHeaders, Sessions, Throttle, TokenAuth, script_hashes, session_id
from .http import ApiError, Scrubber, set_scrubber
from .inference import ModelPool
from .routes_chat import add_model_routes
from .routes_files import add_file_routes, sweep_orphans
from .routes_graders import add_grader_routes
from .routes_images import add_image_routes
from .routes_jobs import add_job_routes
from .settings import Settings
from .supervisor import Supervisor

log = logging.getLogger("tunesmith.server")

# ---------------------------------------------------------------- the app


def create_app(settings: Settings) -> FastAPI:
    settings.make_dirs()
    store = settings.open_store()
    store.init()
    supervisor = Supervisor(settings, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        removed = sweep_orphans(settings, store)
        if removed:
            log.warning("removed %d files no upload finished (a crash mid-upload): %s", len(removed),
                        ", ".join(removed))
        supervisor.recover()
        supervisor.start()
        yield
        await run_in_threadpool(supervisor.stop)

    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings, app.state.store, app.state.supervisor = settings, store, supervisor
    app.state.pool = ModelPool(settings.max_loaded_models)
    app.state.base_models = _base_models(settings)
    if settings.judge_model and settings.judge_model not in app.state.base_models:
        from ..config import ConfigError

        raise ConfigError(f"--judge-model {settings.judge_model!r} is not a model this server offers; offered: "
                          f"{', '.join(sorted(app.state.base_models)) or '(none)'} (add one with --model NAME=PATH)")
    _add_error_handlers(app)
    add_file_routes(app, settings, store)
    add_job_routes(app, settings, store)
    add_model_routes(app, settings, store)
    add_grader_routes(app, settings)
    add_image_routes(app, settings, store)
    set_scrubber(Scrubber(settings.data_dir, app.state.base_models))
    login_page = _asset("login.html")
    sessions = Sessions(settings.session_ttl_s)
    app.state.token_check = TokenAuth(None, settings.tokens, b"", sessions)  # the login form checks with the same rule
    app.state.throttle = Throttle()
    _add_dashboard_routes(app, login_page)
    app.add_middleware(TokenAuth, tokens=settings.tokens, login_page=login_page, sessions=sessions)
    # outermost: every answer, the 401s of TokenAuth too
    app.add_middleware(SecurityHeaders, script_hashes=script_hashes(_asset("dashboard.html")))
    return app


def _base_models(settings: Settings) -> dict[str, str]:
    """API name -> model reference: installed built-in aliases, then the models registered with --model."""
    from ..models import list_models

    out = {m.alias: m.alias for m in list_models() if m.installed}
    out.update(settings.base_models)
    return out


def _asset(name: str) -> bytes:
    return resources.files("tunesmith.server").joinpath("static", name).read_bytes()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        e = exc.errors()[0]
        loc = [str(p) for p in e["loc"] if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        if e["type"] == "extra_forbidden":
            return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                            code="unknown_parameter").response()
        msg = e["msg"].removeprefix("Value error, ")
        return ApiError(400, f"Invalid value for '{param}': {msg}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal server error: {type(exc).__name__}", type_="server_error",
                        code="internal_error").response()


# ---------------------------------------------------------------- dashboard


def _add_dashboard_routes(app: FastAPI, login_page: bytes) -> None:
    page = _asset("dashboard.html")
    login_failed = login_page.replace(b"<!--error-->", b"<p class=error>That token is not valid.</p>")

    @app.get("/")
    def root():
        return RedirectResponse("/dashboard", status_code=307)

    @app.get("/dashboard")
    def dashboard():
        return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    @app.post("/dashboard/login")
    async def login(request: Request):
        client = request.client.host if request.client else "?"
        wait = app.state.throttle.retry_after(client)
        if wait > 0:  # too many wrong tokens from this address: not even checked
            page = login_page.replace(b"<!--error-->", b"<p class=error>Too many failed sign-ins: wait a minute.</p>")
            return Response(page, status_code=429, media_type="text/html; charset=utf-8",
                            headers={"Retry-After": str(int(wait) + 1)})
        form = await request.form(max_files=0, max_fields=2)
        who = app.state.token_check.check(str(form.get("token") or "").strip())
        if who is None:
            app.state.throttle.failed(client)
            return Response(login_failed, status_code=401, media_type="text/html; charset=utf-8")
        resp = RedirectResponse("/dashboard", status_code=303)
        sessions = app.state.token_check.sessions
        resp.set_cookie(COOKIE, sessions.create(who), httponly=True, samesite="strict", path="/",
                        max_age=int(sessions.ttl_s))
        return resp

    @app.post("/dashboard/logout")
    async def logout(request: Request):
        """Revokes the session (a sign-out sent by another site could only sign the user out: harmless)."""
        app.state.token_check.sessions.revoke(session_id(request.headers.get("cookie")))
        resp = RedirectResponse("/dashboard", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp
