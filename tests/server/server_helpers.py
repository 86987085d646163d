"""Helpers for the job-server tests: a real `tunesmith serve` subprocess on a free loopback port, and the
official openai client pointed at it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TOKEN = "test-token-0123456789abcdef"
# Small, fast jobs on the tiny model: the server applies these to every job (tunesmith serve --set).
JOB_DEFAULTS = ["data.max_length=64", "eval.max_new_tokens=4", "eval.samples=2", "eval.compare_examples=4",
                "eval.metric_examples=2", "method.lora.r=4", "train.warmup_steps=1", "train.lr=1e-2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; ``client`` is an ``openai.OpenAI`` with the test token."""

    def __init__(self, data_dir: Path, model_dir: Path, *extra: str, workers: int = 1, tokens: list[str] | None = None):
        """tokens: the token file's lines (TOKEN [PROJECT [admin]]); by default TOKEN alone (project "default")."""
        self.data_dir, self.model_dir, self.extra, self.workers = data_dir, model_dir, list(extra), workers
        self.tokens = tokens or [TOKEN]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, *more: str, timeout: float = 120) -> "Server":
        token_file = self.data_dir.parent / f"{self.data_dir.name}-tokens"
        token_file.write_text("# test tokens\n" + "".join(t + "\n" for t in self.tokens))
        cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--token-file", str(token_file), "--model", f"tiny={self.model_dir}", "--workers", str(self.workers),
               "--worker-threads", "1", *[a for d in JOB_DEFAULTS for a in ("--set", d)], *self.extra, *more]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TUNESMITH_API_TOKENS="")
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                self.client_for(self.tokens[0].split()[0]).models.list()
                return self
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"server did not answer within {timeout} s: {self.log_text()[-3000:]}")

    @property
    def client(self):
        return self.client_for(TOKEN)

    def client_for(self, token: str):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=token, max_retries=0, timeout=60)

    def log_text(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-server.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


def wait_for(predicate, timeout: float = 120, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_status(client, job_id: str, *statuses: str, timeout: float = 180):
    def check():
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None
    return wait_for(check, timeout, what=f"job {job_id} to reach {statuses}")
