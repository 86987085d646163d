"""Training throughput on 1 and 2 processes of this machine: tokens/s and the scaling efficiency.

Runs the real command, ``tunesmith train --nproc N`` (torchrun underneath; gloo on CPU, NCCL on GPUs),
with the same effective batch in every run (16 examples a step: 1 process x 16, 2 processes x 8), so
each run does the same work per step. Every process gets ``--threads`` CPU threads (default 1): N
processes use N times the cores of one, the usual way to read scaling. (Giving one process all cores
as threads instead measures OpenMP against processes, and on a busy machine mostly measures the
spinning of OpenMP threads that wait for a core.)

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_distributed.py              # ddp and fsdp, ~2-3 min on 2 cores
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_distributed.py --steps 40 --hidden 512 --strategies ddp
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_distributed.py --model smollm2-135m-instruct \
        --data bench/data/chat_train.jsonl --max-length 1024 --strategies ddp --steps 12   # ~6 min on 2 cores

Throughput counts target tokens over training steps only: each step's own time as the loop logs it
(evaluation, checkpoints and start-up excluded), the first ``--warmup`` steps dropped. Efficiency is
tokens/s(N) / (N x tokens/s(1)): 1.0 would be perfect scaling. The model is a seeded Llama of the
built-in model's architecture (``--layers``/``--hidden``), or any model (``--model``); the data short
synthetic chats of similar lengths, or any training file (``--data``): the shipped chats of 33 to ~580
tokens show what uneven lengths cost, since every process waits for the slowest at each step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.report.data import read_events

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("fox dog paris france date iso hello world quick brown lazy capital river mountain ocean forest city "
         "market garden winter summer music letter number").split()
EFFECTIVE_BATCH = 16


def write_data(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            f.write(json.dumps({"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                             {"role": "assistant", "content": " ".join(reversed(words))}]}) + "\n")
    return path


def run(nproc: int, strategy: str, model: str, data: Path, out: Path, steps: int, warmup: int, threads: int,
        max_length: int = 192) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "train", "--nproc", str(nproc), "--quiet", "--overwrite",
           "--model", model, "--data", str(data), "--out", str(out), "--method", "full", "--max-steps", str(steps),
           "--batch-size", str(EFFECTIVE_BATCH // nproc), "--lr", "1e-4",
           "--set", f"distributed.strategy={strategy}", "--set", "data.valid_fraction=0.05",
           "--set", f"data.max_length={max_length}", "--set", "data.overflow=truncate", "--set", f"eval.every_steps={steps}", "--set", "eval.samples=0",
           "--set", "eval.metric_examples=0", "--set", "eval.compare_base=false", "--set", "train.log_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = read_events(out / "metrics.jsonl")
    train = [e for e in events if e["kind"] == "train"][warmup:]
    tokens = sum(e["tokens"] for e in train)
    seconds = sum(e["tokens"] / e["tokens_per_s"] for e in train)
    return {"processes": nproc, "strategy": strategy, "threads_per_process": threads,
            "micro_batch": EFFECTIVE_BATCH // nproc, "steps_timed": len(train), "tokens": tokens,
            "train_seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "median_step_s": round(statistics.median(e["tokens"] / e["tokens_per_s"] for e in train), 4),
            "final_loss": train[-1]["loss"], "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--model", help="any model reference instead of the seeded Llama (e.g. smollm2-135m-instruct)")
    p.add_argument("--data", type=Path, help="a training file instead of the synthetic chats")
    p.add_argument("--max-length", type=int, default=192, help="data.max_length (longer examples are truncated)")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    args = p.parse_args()

    from tunesmith.testing import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-dist-") as tmp:
        tmp = Path(tmp)
        model = args.model or str(save_tiny_model(tmp / "model", layers=args.layers, hidden=args.hidden,
                                                  heads=max(4, args.hidden // 64)))
        data = (args.data.resolve() if args.data
                else write_data(tmp / "train.jsonl", EFFECTIVE_BATCH * args.steps, seed=0))
        rows = [run(1, "ddp", model, data, tmp / "p1", args.steps, args.warmup, args.threads, args.max_length)]
        for strategy in args.strategies:
            rows.append(run(2, strategy, model, data, tmp / f"p2-{strategy}", args.steps, args.warmup, args.threads,
                            args.max_length))

    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base, 3)
        r["efficiency"] = round(r["tokens_per_s"] / (r["processes"] * base), 3)
    result = {"model": args.model or f"seeded Llama, {args.layers} layers, hidden {args.hidden}",
              "data": str(args.data) if args.data else "synthetic chats of 4-12 words", "max_length": args.max_length,
              "effective_batch": EFFECTIVE_BATCH, "steps": args.steps, "warmup_steps_dropped": args.warmup,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "cpu_count": os.cpu_count(),
              "platform": platform.platform(), "torch": torch.__version__,
              "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print(f"{result['model']}, {result['data']}, effective batch {EFFECTIVE_BATCH}, {args.steps} steps "
          f"({args.warmup} warm-up dropped), {result['device']}, {os.cpu_count()} cores, "
          f"load average {result['load_average_1m']:.1f}")
    print(f"{'processes':>9} {'strategy':>8} {'threads':>7} {'micro':>5} {'tokens/s':>9} {'step s':>7} "
          f"{'speedup':>7} {'efficiency':>10} {'wall s':>6}")
    for r in rows:
        print(f"{r['processes']:>9} {r['strategy']:>8} {r['threads_per_process']:>7} {r['micro_batch']:>5} "
              f"{r['tokens_per_s']:>9.1f} {r['median_step_s']:>7.3f} {r['speedup']:>7.2f} {r['efficiency']:>10.2f} "
              f"{r['wall_s']:>6.0f}")
    print(f"(written to {RESULTS / 'distributed.json'})")


if __name__ == "__main__":
    main()
