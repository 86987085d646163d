"""Sampling with one seeded stream per answer (generate_ids row_seeds, what GRPO samples with) against transformers'
own sampling (one torch.multinomial over the batch from the global generator).

Same model (the built-in SmolLM2-135M-Instruct), prompts, batch size, temperature and length limit, in one run, the two
alternating so that machine noise falls on both. Sampled answers end at different lengths, so each side is timed per
decode step (a batch runs as many steps as its longest answer) and the figure is the ratio of those.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_sampling.py                 # 32 prompts x 64 tokens, 3 rounds
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_sampling.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_generate import load_builtin, make_prompts  # noqa: E402

from tunesmith.evaluate import render_prompt  # noqa: E402
from tunesmith.evaluate.generate import generate_ids, length_sorted_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def decode_steps(prompts, answers, batch_size: int) -> int:
    """Forward passes the batched generation made: per batch, its longest answer's length."""
    return sum(max(len(answers[i][0]) for i in batch)
               for batch in length_sorted_batches([len(p) for p in prompts], batch_size))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    model, tok, source = load_builtin()
    prompts = [render_prompt(tok, c) for c in make_prompts(args.prompts)]
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=True,
              temperature=args.temperature)
    generate_ids(model, tok, prompts[:2], **dict(kw, max_new_tokens=2), seed=0)  # warm-up
    sides = {
        "transformers": lambda r: generate_ids(model, tok, prompts, seed=r, **kw),
        "row_seeded": lambda r: generate_ids(model, tok, prompts, row_seeds=[1000 * r + i for i in range(len(prompts))],
                                             **kw),
    }
    seconds, steps = {k: 0.0 for k in sides}, {k: 0 for k in sides}
    for r in range(args.rounds):
        for name, run in sides.items():
            t0 = time.perf_counter()
            answers = run(r)
            seconds[name] += time.perf_counter() - t0
            steps[name] += decode_steps(prompts, answers, args.batch_size)
    per_step = {k: 1000 * seconds[k] / max(1, steps[k]) for k in sides}
    result = {"model": source, "threads": torch.get_num_threads(), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "rounds": args.rounds,
              "seconds": {k: round(v, 2) for k, v in seconds.items()}, "decode_steps": steps,
              "ms_per_decode_step": {k: round(v, 2) for k, v in per_step.items()},
              "row_seeded_over_transformers": round(per_step["row_seeded"] / per_step["transformers"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{len(prompts)} prompts x up to {args.max_new_tokens} tokens, batch {args.batch_size}, {source}, "
          f"{result['threads']} threads, {args.rounds} rounds each")
    for k in sides:
        print(f"  {k:13s}: {seconds[k]:7.2f} s over {steps[k]:5d} decode steps = {per_step[k]:6.2f} ms a step")
    print(f"  row-seeded / transformers time per decode step: {result['row_seeded_over_transformers']:.3f}")


if __name__ == "__main__":
    main()
