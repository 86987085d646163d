"""The CPU memory allocator a training process runs with: tcmalloc when it is installed, else glibc tuned.

Why it matters on a CPU: a training step allocates and frees the same few hundred activation and gradient
buffers (megabytes each) at every step. glibc's malloc serves blocks above its mmap threshold with a fresh
``mmap`` and unmaps them on ``free``, so each step page-faults its buffers in again and the kernel zeroes
them: on the 2-core development machine a LoRA step of the built-in model took ~220,000 minor page faults
(~900 MB of fresh pages), and the GEMMs writing into fresh pages ran at a third of their speed.
tcmalloc keeps freed memory for reuse; it is what PyTorch's own CPU launcher
(``python -m torch.backends.xeon.run_cpu``) preloads by default. Measured on the benchmark's LoRA job
(bench/bench_train_vs_trl.py; README "Speed and memory"), against glibc's defaults: tcmalloc +4% tokens/s
over 24 steps at 0.81x the peak memory, +16% over the first 8 (where most of the faulting happens; glibc's
adaptive mmap threshold catches up later); glibc with mmap and trimming off (``tune_glibc``) +7% over 8 steps.

tcmalloc replaces malloc only if it is loaded before the process starts (``LD_PRELOAD``), so the
``tunesmith`` command re-executes itself once with it preloaded (``reexec_with_tcmalloc``, same process id,
same arguments). Child processes (``--nproc`` launches, server workers) inherit the environment.

``TUNESMITH_ALLOCATOR``: ``auto`` (default: tcmalloc if installed, else tuned glibc), ``tcmalloc`` (the same,
but a warning when it is missing), ``system`` (leave malloc alone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ENV = "TUNESMITH_ALLOCATOR"
REEXEC_MARKER = "_TUNESMITH_ALLOCATOR_REEXEC"  # set in the re-executed process (and its children): never loop
_LIBS = ("tcmalloc_minimal", "tcmalloc")
# Where Debian/Ubuntu (libtcmalloc-minimal4), Fedora (gperftools-libs) and conda put it, for when
# ldconfig's cache (ctypes.util.find_library) does not list it.
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
         str(Path(sys.prefix) / "lib"))


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    return value if value in ("auto", "tcmalloc", "system") else "auto"


def find_tcmalloc() -> str | None:
    """A loadable tcmalloc on this machine (a file path, or a soname the dynamic linker finds), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for directory in _DIRS:
        for name in _LIBS:
            hits = sorted(Path(directory).glob(f"lib{name}.so*"))
            if hits:
                return str(hits[0])
    for name in _LIBS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def in_use() -> str:
    """The allocator serving this process's malloc: "tcmalloc", "jemalloc" or "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def reexec_with_tcmalloc(training: bool = False) -> None:
    """Run this command again with tcmalloc preloaded, if it is installed and not in use; else return.

    Called by the ``tunesmith`` command before anything heavy is imported. ``os.execve`` keeps the process id,
    the open files and the terminal, so launchers, signals and pipes see the same process. ``training``: the
    command trains, so freed memory stays with the process for the next step (``TCMALLOC_RELEASE_RATE=0``
    unless the environment sets it; ``tune_glibc`` does the same for glibc). By default tcmalloc hands some
    freed pages back to the system as it goes, and a later step faults them in again: on the benchmark's LoRA
    job 1,500 page faults a step in steady state, 500 with the rate at 0 (and ~30,000 fewer over the job's first
    pass). On the development VM a page the host has reclaimed costs ~12 us to fault in, so that is ~0.5% of the
    job's time, below its run-to-run noise.
    """
    if mode() == "system" or os.environ.get(REEXEC_MARKER) or in_use() != "system":
        return
    lib = find_tcmalloc()
    if lib is None:
        if mode() == "tcmalloc":
            print(f"warning: {ENV}=tcmalloc but no tcmalloc is installed (Debian/Ubuntu: apt-get install "
                  "libtcmalloc-minimal4); going on with the system allocator", file=sys.stderr)
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env[REEXEC_MARKER] = "1"
    # tcmalloc prints a line for each allocation over 1 GiB by default (a large model's weights, a long batch).
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    if training:
        env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_glibc() -> bool:
    """Where malloc is glibc's: serve every block from the heap (no per-block mmap) and never trim it, so freed
    step buffers are reused instead of page-faulted in again. Returns whether anything was changed.

    Affects this process from here on; the cost is that memory freed after the peak stays with the process
    (as it does with tcmalloc) instead of going back to the system.
    """
    if mode() == "system" or in_use() != "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_tuned = False  # whether tune_glibc() changed this process's malloc


def describe() -> str:
    """For run.json and the report: which allocator this process runs with."""
    name = in_use()
    if name != "system":
        return name
    return "system (glibc, tuned: no mmap, no trim)" if _tuned else "system"


def prepare_training_process() -> str:
    """Called where training starts (also from the Python API, where no re-exec happened): tune glibc if tcmalloc
    is not in use. Returns ``describe()``."""
    global _tuned
    if not _tuned:
        _tuned = tune_glibc()
    return describe()
