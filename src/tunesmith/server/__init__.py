"""The job server: an OpenAI-compatible fine-tuning API, chat completions and a dashboard.

    tunesmith serve  ->  serve.run(args)  ->  uvicorn( api.create_app(Settings) )
                                                 ├─ auth.TokenAuth      bearer tokens on every route
                                                 ├─ store.Store         SQLite (WAL) state
                                                 ├─ supervisor          queue -> one worker process per job
                                                 ├─ worker              train() with events into the database
                                                 └─ inference           chat completions, LRU of loaded models
"""

from .settings import Settings

__all__ = ["Settings"]
