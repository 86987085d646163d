"""Run a python grader's ``grade(sample, item)`` out of process, many samples per process.

One process per batch (started in ~30 ms), fed one sample at a time over a pipe, so that the parent can hold
each sample to a wall-clock limit: a sample that runs past it is killed with its process, scores 0 with the
reason, and the rest of the batch goes on in a fresh process. A process that dies on a sample (a native
crash, the CPU-time backstop) is retried once in a fresh process when it had graded earlier samples, since
the limit may have been spent by them; dying again, the sample scores 0 with the reason.

What the process may do is set in sandbox_worker.py (limits, the audit hook). Here: an empty temporary working
directory, removed afterwards; a cleared environment (only single-thread settings for numeric libraries);
``python -I -S -B``: no environment variables read, no user site, no .pth files run, no bytecode written;
the site-packages of this Python added to the path, so that numpy and friends import; a new session, so a
terminal's Ctrl-C reaches the parent, which kills the process.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .core import Grade, failed

WORKER = Path(__file__).with_name("sandbox_worker.py")
ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class SandboxLimits:
    """timeout_s: wall-clock seconds per sample (OpenAI allows a grader 2 minutes; a training step should not
    wait that long for one answer). memory_mb: address space of the process (OpenAI's 2 GB). startup_s: for
    the grader's module-level code, its imports."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    startup_s: float = 30.0


class _Died(Exception):
    """The process is gone or unusable: reason, and whether the sample may be retried in a fresh one."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def run_sandboxed(source: str, samples: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]],
                  limits: SandboxLimits = SandboxLimits()) -> list[Grade]:
    """One Grade per (sample, item); every failure is that sample's 0 with a reason, never an exception."""
    grades: list[Grade] = []
    retried = -1
    while len(grades) < len(samples):
        with _Worker(source, limits) as worker:
            if worker.fatal is not None:
                reason = f"the grader's code failed before grading: {worker.fatal}"
                return grades + [failed(reason)] * (len(samples) - len(grades))
            first = True
            while len(grades) < len(samples):
                i = len(grades)
                try:
                    grades.append(worker.grade(samples[i], items[i]))
                except _Died as died:
                    if died.retry and not first and retried != i:
                        retried = i  # its limit may have been spent by the samples before it: once more, alone
                    else:
                        grades.append(failed(died.reason))
                    break
                first = False
    return grades


class _Worker:
    def __init__(self, source: str, limits: SandboxLimits):
        self.limits = limits
        self.fatal: str | None = None
        self.dir = tempfile.mkdtemp(prefix="tunesmith-grader-")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", WORKER.read_text(encoding="utf-8")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.dir, env=ENV,
            start_new_session=True, close_fds=True)
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.buffer = b""
        paths = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
        cpu_s = int(max(60, 6 * limits.timeout_s))  # a backstop; the wall-clock limit per sample comes first
        header = {"source": source, "paths": paths, "memory_mb": limits.memory_mb, "cpu_s": cpu_s}
        try:
            self._send(header, limits.startup_s)
            answer = self._receive(limits.startup_s, "starting")
            self.fatal = answer.get("fatal") if "ready" not in answer else None
        except _Died as died:
            self.fatal = died.reason
        except BaseException:  # e.g. Ctrl-C while it starts: no process or folder left behind
            self.__exit__()
            raise

    def grade(self, sample: Mapping[str, Any], item: Mapping[str, Any]) -> Grade:
        try:
            self._send({"sample": sample, "item": item}, self.limits.timeout_s)
        except (TypeError, ValueError) as e:  # not JSON: the grader could not have read it either
            return failed(f"the sample or item cannot be sent to the sandbox as JSON ({e})")
        answer = self._receive(self.limits.timeout_s, "grading")
        if "score" in answer and isinstance(answer["score"], (int, float)):
            return Grade(float(answer["score"]))
        return failed(str(answer.get("error", f"unexpected answer from the sandbox: {answer!r:.100}")))

    def _send(self, message: dict, timeout: float) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        deadline = time.monotonic() + timeout
        fd = self.proc.stdin.fileno()
        while data:
            if not select.select([], [fd], [], max(0.0, deadline - time.monotonic()))[1]:
                self._kill()
                raise _Died(f"timed out after {timeout:g} s sending it to the sandbox", retry=False)
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise _Died(self._death(), retry=True) from None

    def _receive(self, timeout: float, doing: str) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                what = "the grader's module-level code" if doing == "starting" else "grade()"
                raise _Died(f"{what} timed out after {timeout:g} s (the sandbox's limit)", retry=False)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _Died(self._death(), retry=True)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self._kill()
            raise _Died(f"the sandbox answered garbage ({line[:60]!r})", retry=False)
        return answer

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # alive, but it closed its answer pipe: of no further use
            self._kill()
            return "the grader closed the sandbox's answer pipe"
        if code < 0:
            name = signal.Signals(-code).name
            why = {"SIGXCPU": " (its CPU-time limit)", "SIGKILL": " (killed)", "SIGSEGV": " (a crash)"}.get(name, "")
            return f"the grader's process died of {name}{why}{self._last_words()}"
        return f"the grader's process exited with code {code} in the middle of grading{self._last_words()}"

    def _last_words(self) -> str:
        """The worker's own stderr (the grader's goes to /dev/null): a traceback if the worker itself broke."""
        os.set_blocking(self.proc.stderr.fileno(), False)
        try:
            lines = (self.proc.stderr.read() or b"").decode("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1][:200]}" if lines else ""

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its session: anything it managed to start too
            except ProcessLookupError:
                pass
        self.proc.wait()

    def __enter__(self) -> "_Worker":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.proc.stdin.close()  # end of input: the worker's loop ends
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self._kill()
        if self.proc.poll() is None:
            self._kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)
