"""``tunesmith serve``: parse the options into Settings, then run the app on uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..config import ConfigError
from .settings import Settings, read_tokens

SERVE_EXAMPLES = """examples:
  tunesmith serve                                       # 127.0.0.1:8000, data in ./tunesmith-data, token generated
  tunesmith serve --token-file tokens.txt --workers 2
  tunesmith serve --model tiny=./models/tiny --set eval.compare_base=false --on-interrupt fail

clients: the official openai package, pointed at the server:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN).fine_tuning.jobs.create(...)
"""


def add_parser(sub) -> None:
    import argparse

    s = sub.add_parser("serve", help="run the fine-tuning job server (OpenAI-compatible API + dashboard)",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="An HTTP server with OpenAI's Files, Fine-tuning and Chat Completions APIs, "
                       "a dashboard at /dashboard, SQLite state and worker processes that run queued jobs.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", default="tunesmith-data", help="database, uploads, run folders, logs")
    s.add_argument("--workers", type=int, default=1, help="jobs trained at the same time by this server (one process "
                   "each); 0 with --store: an API server only, `tunesmith worker` processes train")
    s.add_argument("--store", help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB: state shared by API servers and "
                   "`tunesmith worker` processes on several machines (--data-dir then a shared folder); default: "
                   "SQLite in DATA/tunesmith.db")
    s.add_argument("--lease-seconds", type=float, default=60.0, help="a job this server runs is taken over by "
                   "another worker when its lease is not renewed for this long")
    s.add_argument("--token-file", help="API tokens, a line each: TOKEN [PROJECT [admin]] (also: $TUNESMITH_API_TOKENS, "
                   "the same entries comma-separated); a project sees only its own files, jobs and models, an admin "
                   "token every project's; without either a token is generated into DATA/api-tokens")
    s.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                   help="offer a local model folder (or GGUF file) for fine-tuning and chat as NAME (repeatable); "
                   "installed built-in aliases are always offered")
    s.add_argument("--judge-model", metavar="NAME",
                   help="the model score_model graders ask, in reinforcement jobs and /v1/fine_tuning/alpha/graders "
                   "(a name from the models offered: an installed alias or a --model NAME); without it, score_model "
                   "graders are refused")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config default for every job, e.g. --set method.name=full (repeatable)")
    s.add_argument("--on-interrupt", choices=["resume", "fail"], default="resume",
                   help="a job whose worker or server died: resume it from its newest checkpoint, or fail it")
    s.add_argument("--max-attempts", type=int, default=3, help="starts of one job (first run + resumes) before it fails")
    s.add_argument("--max-file-mb", type=float, default=100.0, help="upload size limit")
    s.add_argument("--project-max-stored-mb", type=float, help="quota: megabytes of files one project may store "
                   "(default: no limit)")
    s.add_argument("--project-max-jobs", type=int, help="quota: unfinished jobs (validating, queued, running, paused) "
                   "one project may have (default: no limit)")
    s.add_argument("--max-loaded-models", type=int, default=2, help="models kept in memory for chat completions")
    s.add_argument("--worker-threads", type=int, help="torch threads per worker (default: torch's choice)")
    s.add_argument("--session-hours", type=float, default=8.0, help="how long a dashboard sign-in lasts")
    s.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def settings_from_args(args) -> Settings:
    from .jobs import MODEL_NAME_RE, check_server_overrides

    if args.workers < (0 if args.store else 1):
        raise ConfigError("--workers must be at least 1 (0 only with --store: then `tunesmith worker` trains)")
    if args.store and not args.store.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--store {args.store!r}: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DB")
    data_dir = Path(args.data_dir).expanduser().resolve()
    models = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not MODEL_NAME_RE.match(name) or not path:
            raise ConfigError(f"--model {item!r}: expected NAME=PATH with NAME from A-Z a-z 0-9 . _ -")
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise ConfigError(f"--model {item!r}: {p} does not exist")
        models[name] = str(p)
    job_defaults = check_server_overrides(args.overrides)
    tokens, source = read_tokens(args.token_file, data_dir)  # last: it may write a generated token
    settings = Settings(data_dir=data_dir, tokens=tokens, workers=args.workers, on_interrupt=args.on_interrupt,
                        max_attempts=args.max_attempts, base_models=models, job_defaults=job_defaults,
                        max_file_bytes=int(args.max_file_mb * 1024 * 1024),
                        quota_bytes=(int(args.project_max_stored_mb * 1024 * 1024)
                                     if args.project_max_stored_mb is not None else None),
                        quota_jobs=args.project_max_jobs,
                        max_loaded_models=args.max_loaded_models, worker_threads=args.worker_threads,
                        token_source=source, judge_model=args.judge_model, session_ttl_s=args.session_hours * 3600,
                        store_url=args.store, lease_s=args.lease_seconds,
                        # with a shared store, servers on one machine and folder are told apart by port
                        node=f"serve@{socket.gethostname()}:{data_dir}" + (f":{args.port}" if args.store else ""))
    return settings


def run(args) -> int:
    import uvicorn

    from .api import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: tokens travel in plain HTTP; put TLS in front of it",
              file=sys.stderr)
    print(f"tunesmith server on http://{args.host}:{args.port}  (dashboard /dashboard, API /v1)\n"
          f"  data: {settings.data_dir}   store: {app.state.store.describe()}   tokens: {settings.token_source}"
          f"   workers: {settings.workers}\n"
          f"  base models: {', '.join(sorted(app.state.base_models)) or '(none)'}"
          f"   judge for score_model graders: {settings.judge_model or '(none)'}", file=sys.stderr, flush=True)
    from ..safety.gate import safety_warning

    for name, path in sorted(settings.base_models.items()):  # --model NAME=PATH: failed the gate or never measured
        warning = safety_warning(path)
        if warning:
            print(f"{name}: {warning}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5)
    return 0
