"""The job server: an OpenAI-compatible fine-tuning API, chat completions and a dashboard.

    tunesmith serve  ->  serve.run(args)  ->  uvicorn( api.create_app(Settings) )
                                                 ├─ auth.TokenAuth      bearer tokens (per project) on every route,
                                                 │                      dashboard sessions, security headers
                                                 ├─ store.Store         SQLite (WAL) state; store_pg: PostgreSQL
                                                 ├─ supervisor          queue -> one worker process per job
                                                 ├─ worker              train() with events into the database
                                                 └─ inference           chat completions, LRU of loaded models

    tunesmith worker ->  node.Worker: claims jobs of a shared PostgreSQL store (SKIP LOCKED), renews leases,
                         forks a child per job that runs worker.run_job
"""

from .settings import Settings

__all__ = ["Settings"]
