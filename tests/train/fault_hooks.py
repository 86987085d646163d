"""Fault injection for the reliability tests: run `tunesmith` in a separate process that stops at an exact
point (a training forward, a logged step, a phase of a checkpoint write) so the test can kill it there.

A *site* names the point; the process writes a marker file there and then sleeps, and the test, which
waits for the marker, sends the signal:

    micro:N             before the N-th training forward of the process (N even with grad_accum 2: between
                        the two micro-batches of one optimizer step, the first one's gradients accumulated)
    step:N              just after the N-th train event reached metrics.jsonl (a step boundary, before the
                        evaluation and checkpoint of that step)
    ckpt:N:PHASE        inside the N-th checkpoint write of the process; PHASE is weights (trainable tensors
                        written), optimizer (optimizer tensors written), manifest (every file and the manifest
                        written and fsynced, not yet renamed) or renamed (the new checkpoint in place, older
                        ones not yet pruned)
    sleep:S             no pause: every training forward sleeps S seconds (slow steps for signal tests)
    none                no hook

Two ways to start such a process: ``spawn`` runs this file as a fresh Python interpreter (exactly what a
user's `tunesmith train` does, imports included); ``fork`` forks the test process, whose torch and
transformers are already imported, which saves the ~5 s import per process. Both run ``tunesmith.cli.main``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml


# ---------------------------------------------------------------- hooks (run inside the child process)


def _pause(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def install(site: str, marker: Path) -> None:
    """Monkeypatch the training code in this process so that it stops at ``site``."""
    import torch

    from tunesmith.train import checkpoint as ckpt
    from tunesmith import events
    from tunesmith.train import steps

    kind, _, arg = site.partition(":")
    if kind == "none":
        return
    if kind in ("micro", "sleep"):
        real, count = steps.token_loss, [0]

        def token_loss(model, batch, *args, **kwargs):
            if torch.is_grad_enabled():  # training forwards only (evaluation runs under no_grad)
                count[0] += 1
                if kind == "sleep":
                    time.sleep(float(arg))
                elif count[0] == int(arg):
                    _pause(marker)
            return real(model, batch, *args, **kwargs)

        steps.token_loss = token_loss
    elif kind == "step":
        real_call, count = events.JsonlSink.__call__, [0]

        def call(self, event):
            real_call(self, event)
            if getattr(event, "kind", None) == "train":
                count[0] += 1
                if count[0] == int(arg):
                    _pause(marker)

        events.JsonlSink.__call__ = call
    elif kind == "ckpt":
        _install_checkpoint_hooks(ckpt, int(arg.split(":")[0]), arg.split(":")[1], marker)
    else:
        raise ValueError(f"unknown site {site!r}")


def _install_checkpoint_hooks(ckpt, nth: int, phase: str, marker: Path) -> None:
    real_save, real_file, real_fsync = ckpt.save_checkpoint, ckpt.save_file, ckpt._fsync
    writes, files = [0], [0]

    def save_checkpoint(*a, **kw):
        writes[0] += 1
        files[0] = 0
        return real_save(*a, **kw)

    def save_file(tensors, path, *a, **kw):
        real_file(tensors, path, *a, **kw)
        files[0] += 1
        if writes[0] == nth and (phase, files[0]) in (("weights", 1), ("optimizer", 2)):
            _pause(marker)

    def fsync(path):
        real_fsync(path)
        if writes[0] != nth:
            return
        if (phase == "manifest" and Path(path).name == "manifest.json") or (phase == "renamed" and Path(path).is_dir()):
            _pause(marker)

    ckpt.save_checkpoint, ckpt.save_file, ckpt._fsync = save_checkpoint, save_file, fsync


# ---------------------------------------------------------------- starting and stopping the process


class Child:
    """A `tunesmith` process with a hook; ``pid``, ``wait()`` -> exit code (negative: killed by that signal)."""

    def __init__(self, argv: list[str], site: str, workdir: Path, mode: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.marker = workdir / f"marker-{time.monotonic_ns()}"
        self.log = workdir / f"log-{time.monotonic_ns()}.txt"
        self.proc = None
        if mode == "spawn":
            with open(self.log, "w") as log:
                self.proc = subprocess.Popen([sys.executable, __file__, site, str(self.marker), *argv],
                                             stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
            self.pid = self.proc.pid
        else:
            self.pid = _fork(argv, site, self.marker, self.log)

    def wait_marker(self, timeout: float = 120.0) -> bool:
        """True once the process reached its site; False if it ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.marker.exists() and self.marker.read_text():
                return True
            if self.poll() is not None:
                return False
            time.sleep(0.01)
        self.kill()
        raise TimeoutError(f"the process did not reach its site in {timeout} s; log:\n{self.output()}")

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        if getattr(self, "_code", None) is not None:
            return self._code
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self._code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self._code

    def wait(self, timeout: float = 180.0) -> int:
        end = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > end:
                self.kill()
                raise TimeoutError(f"the process did not end in {timeout} s; log:\n{self.output()}")
            time.sleep(0.02)
        return code

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        return self.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _fork(argv: list[str], site: str, marker: Path, log: Path) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: never return into the test runner
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = _run(argv, site, marker)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _run(argv: list[str], site: str, marker: Path) -> int:
    import torch

    torch.set_num_threads(1)  # the same as the test process (conftest), so results agree to the bit
    install(site, marker)
    from tunesmith.cli import main

    return main(argv)


# ---------------------------------------------------------------- configs


def write_config(path: Path, settings: dict) -> Path:
    """A YAML config from dotted settings {"train.lr": 0.01, ...}."""
    tree: dict = {}
    for key, value in settings.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def base_settings(tiny_model_dir, tiny_data, out: Path, **extra) -> dict:
    """A tiny, fast, deterministic run: no generations, no base-versus-tuned comparison."""
    train_f, valid_f = tiny_data
    settings = {
        "model.name": str(tiny_model_dir), "data.train": str(train_f), "data.valid": str(valid_f),
        "data.max_length": 64, "output_dir": str(out), "train.batch_size": 4, "train.max_steps": 4,
        "train.lr": 1e-2, "train.warmup_steps": 1, "eval.every_steps": 2, "eval.samples": 0,
        "eval.compare_base": False, "eval.metric_examples": 0, "method.lora.r": 4, "method.lora.dropout": 0.0,
    }
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return settings


if __name__ == "__main__":  # python fault_hooks.py SITE MARKER tunesmith-args...
    sys.exit(_run(sys.argv[3:], sys.argv[1], Path(sys.argv[2])))
