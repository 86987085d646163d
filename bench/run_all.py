"""Run every benchmark in bench/ in turn (``make bench``) and print a one-line status for each.

Each bench_*.py prints its own figures and writes its JSON next to it (bench/results/). A benchmark is
a measurement, not a test: a failing one is reported and the others still run. Pass names to run a
subset: ``python bench/run_all.py generate safety_gate``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in argv]
    status = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE.parent)
        status.append((script.name, rc, time.time() - t0))
    print("\n=== summary ===")
    for name, rc, secs in status:
        print(f"{name:32s} {'ok' if rc == 0 else f'FAILED (exit {rc})':16s} {secs:7.0f} s")
    return 0 if all(rc == 0 for _, rc, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
