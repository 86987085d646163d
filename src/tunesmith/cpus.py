"""The CPUs a training process may use, how its threads wait, and whether other processes are taking them.

Why throughput collapsed beside another CPU-bound process (measured on the 2-core development VM, bench/
bench_contention.py has the figures): torch's intra-op threads are OpenMP threads (libgomp), which after each
parallel region spin, by default, for ~300,000 iterations waiting for more work before they sleep. A training step
runs thousands of parallel regions; alone, the spinning saves a wake-up each time. Beside another process that wants
the same cores, a spinning thread burns the time slice its peer (descheduled, holding up the region's end) needed, and
the other process's threads spin against ours the same way: the LoRA job ran 2.7 to 4.7 times slower instead of 2.

What is done about it:
- ``prepare_environment``: libgomp's spin before sleeping is shortened (``GOMP_SPINCOUNT``, read once when libgomp
  loads, so it is set before torch is imported: by the ``tunesmith`` command, and by allocator.reexec_with_tcmalloc
  for the process it starts) unless the environment sets it or ``OMP_WAIT_POLICY``.
- ``configure_threads``: torch's thread count is capped at the CPUs this process may actually use: its affinity mask
  and its cgroup CPU quota (a container limited to 1 CPU on a 2-core host would otherwise run 2 threads on 1 CPU),
  unless ``OMP_NUM_THREADS`` says otherwise.
- ``OtherLoad``: the training loop samples how much CPU other processes take (system-wide busy time from
  /proc/stat less this process's own) and warns, once, when it is over half a CPU for several steps in a row.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

# libgomp's spins before a waiting thread sleeps. Its default (300,000; 30 billion with OMP_WAIT_POLICY=active) suits
# a machine of one's own. The benchmark's LoRA job (fp32, 10 steps) alone and beside a 2-thread torch loop, two rounds
# on the 2-core development VM (Intel, AVX-512 + AMX), tokens/s alone / beside (slowdown):
#   300,000 (default)  191 / 47 (4.1x), 202 / 71 (2.8x)      30,000   196 / 68 (2.9x), 192 / 78 (2.5x)
#    10,000            191 / 96 (2.0x), 185 / 80 (2.3x)       3,000   184 / 91 (2.0x), 181 / 88 (2.1x)
#   OMP_WAIT_POLICY=passive (sleep at once)  178 / 93 (1.9x), 166 / 77 (2.2x)
# 10,000 (~10-30 us of spinning) keeps the speed alone within this machine's noise and halves the slowdown beside
# another process; sleeping at once costs 7-13% alone. bench/bench_contention.py measures it again.
SPINCOUNT = "10000"


def prepare_environment(env: dict | None = None) -> dict:
    """``env`` (default: this process's environment) with tunesmith's OpenMP wait setting, unless it sets its own.
    Only effective before libgomp loads (before torch is imported in this process, or for a process started with it)."""
    env = os.environ if env is None else env
    if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
        env["GOMP_SPINCOUNT"] = SPINCOUNT
    return env


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``), or None where there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota (rounded up)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


@dataclass
class Threads:
    """What ``configure_threads`` decided, for the run log and run.json."""
    threads: int
    available: int
    wait: str  # the OpenMP wait setting in effect
    reason: str


def configure_threads() -> Threads:
    """Cap torch's intra-op threads at ``available_cpus()`` unless OMP_NUM_THREADS is set; say what is in effect."""
    import torch

    available = available_cpus()
    threads = torch.get_num_threads()
    reason = "torch's default"
    if "OMP_NUM_THREADS" in os.environ:
        reason = "OMP_NUM_THREADS"
    elif threads > available:
        torch.set_num_threads(available)
        reason = f"capped from {threads} to the CPUs this process may use (affinity, cgroup quota)"
        threads = available
    wait = (f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if "OMP_WAIT_POLICY" in os.environ else
            f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else "libgomp's default")
    return Threads(threads, available, wait, reason)


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks (/proc/stat's first line)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_jiffies() -> int | None:
    """This process's CPU time (all threads, user + system) in clock ticks (/proc/self/stat)."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(after_name[11]) + int(after_name[12])  # utime, stime (fields 14 and 15)
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """How many CPUs other processes keep busy, between calls to ``sample``: the machine's busy time less this
    process's own, per second of wall time. Linux only (elsewhere ``sample`` returns None)."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read():
        busy, own = _busy_jiffies(), _own_jiffies()
        return None if busy is None or own is None else (busy[0], own, time.monotonic())

    def sample(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[2] - last[2] <= 0:
            return None
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        others = (now[0] - last[0]) - (now[1] - last[1])
        # Ticks are 10 ms and the machine's and this process's counters are read a moment apart: over a short
        # interval the difference can pass the machine's CPU count (measured 2.28 of 2 on a busy machine). Clamp.
        return min(float(os.cpu_count() or 1), max(0.0, others / ticks / (now[2] - last[2])))


class Oversubscription:
    """Watches other processes' CPU use step by step and says, once, when the machine is oversubscribed: other
    processes keeping at least ``threshold`` CPUs busy for ``patience`` steps in a row while this one runs ``threads``
    threads on ``available`` CPUs. Returns the warning text (or None) from ``step``."""

    def __init__(self, threads: int, available: int, threshold: float = 0.5, patience: int = 3):
        self.load = OtherLoad()
        self.threads, self.available, self.threshold, self.patience = threads, available, threshold, patience
        self.in_row, self.warned = 0, False
        self.others: list[float] = []

    def step(self) -> str | None:
        others = self.load.sample()
        if others is None or self.warned:
            return None
        self.in_row = self.in_row + 1 if others >= self.threshold else 0
        self.others.append(others)
        if self.in_row < self.patience:
            return None
        self.warned = True
        recent = self.others[-self.patience:]
        return (f"this machine is oversubscribed: other processes kept {sum(recent) / len(recent):.1f} of its "
                f"{self.available} CPUs busy over the last {self.patience} steps, while this run uses {self.threads} "
                "threads; training shares the CPUs with them and runs slower (each process's threads wait for the "
                "others'). Run one CPU-bound job at a time, or give each its own cores (taskset, "
                "OMP_NUM_THREADS)")
