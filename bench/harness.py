"""What the benchmarks against TRL share: a driver runs each measurement in a fresh worker process (so its peak memory
is its own) and reads back its ``RESULT {json}`` line; a worker chooses its allocator before torch loads and marks
the CPU time of each training step. Imports nothing heavy: a worker imports this before torch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- the driver's side


def clean_env() -> dict:
    """This environment without a preloaded allocator: each worker picks its own (``choose_allocator``)."""
    from tunesmith.allocator import REEXEC_MARKER

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", REEXEC_MARKER)}
    return {**env, "HF_HUB_OFFLINE": "1"}


def run_worker(script: str, spec: dict, label: str, log, oom_hint: str = "") -> dict:
    """Run ``bench/<script> '<spec json>'`` in a fresh process and return its ``RESULT`` dict, with the 1-minute load
    average at the start and the end (this run included) and the memory available at the start. A worker that fails
    raises RuntimeError with the end of its output; ``oom_hint`` is added when it was killed (exit -9)."""
    t, load, free = time.time(), os.getloadavg()[0], available_gb()
    proc = subprocess.run([sys.executable, str(HERE / script), json.dumps(spec)], cwd=HERE.parent,
                          capture_output=True, text=True, env=clean_env())
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        why = (f"\nkilled by SIGKILL: most likely the kernel's out-of-memory killer ({available_gb():.0f} GB available "
               f"now){oom_hint}" if proc.returncode == -9 else "")
        raise RuntimeError(f"worker {spec} failed (exit {proc.returncode}):\n{tail}{why}")
    log(f"  {label:26s} done in {time.time() - t:5.0f} s")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_1min": [load, os.getloadavg()[0]], "mem_available_gb": free}


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    total = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gb": round(total / 2 ** 20, 1)}


# ---------------------------------------------------------------- the worker's side

BASELINES = ("trl", "diffusers")  # worker kinds that run another tool, as its users run it


def choose_allocator(spec: dict) -> None:
    """Before torch loads: tunesmith's runs get what the ``tunesmith`` command gives them (tcmalloc when installed, else
    glibc tuned at train start, and its OpenMP wait: tunesmith/allocator.py, cpus.py); the baselines (kinds in
    BASELINES: TRL, diffusers' training example) get the system allocator, as their users run them. ``"allocator":
    "system"`` or ``"tcmalloc"`` in the spec overrides either, to measure the allocator itself. Other kinds (scoring,
    scaling) take tunesmith's settings: their figures do not depend on them, and on glibc's defaults their many fresh
    activation buffers page-fault."""
    from tunesmith import allocator

    baseline = spec["kind"] in BASELINES
    if not baseline:  # the OpenMP wait the tunesmith command sets, unless the spec's env sets one
        from tunesmith.cpus import prepare_environment

        prepare_environment()
    if spec.get("allocator", "system" if baseline else "tunesmith") == "system":
        os.environ[allocator.ENV] = "system"
    else:
        allocator.reexec_with_tcmalloc(training=True)  # returns if tcmalloc is missing: glibc tuned, as in train()
        allocator.prepare_training_process()


def cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system): less sensitive to a shared machine than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class CpuMarks:
    """A tunesmith event sink: the CPU time at the run's start and at each step's end, so ``per_step()`` is each step's
    CPU seconds (what evaluation, checkpoints and a reference pass cost falls outside the steps)."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, event):
        if type(event).__name__ in ("RunStarted", "StepEnd"):
            self.marks.append(cpu_s())

    def close(self):
        pass

    def per_step(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def unshare_prompts() -> None:
    """Make tunesmith lay every answer out with its own copy of the prompt (the "unshared" extra runs): packed rows
    where the model packs, padded where not, never the prefixed layout (train.packing.row_layout)."""
    from tunesmith.train import loop, packing

    unshared = lambda model: "packed" if packing.packs(model) else "padded"  # noqa: E731
    loop.row_layout = packing.row_layout = unshared
