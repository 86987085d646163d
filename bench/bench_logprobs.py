"""Per-token log-probabilities with the fused head (train.loss.token_logprobs) against full (B, T, V) logits.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_logprobs.py               # B=8, T=512, 3 timed steps per path
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_logprobs.py --steps 1 --seq 256   # a quicker look

The model: a random Llama with SmolLM2-135M's width and vocabulary (hidden 576, 9 heads, 3 key/value heads, MLP 1536,
vocab 49152, tied embeddings) and 2 layers, fully trainable, fp32. The batch: B sequences of T random tokens, the first
``--prompt-frac`` of each without a target. One step: log-probabilities of the targets, a DPO-style loss over pairs of
sequence sums, backward. The paths, each in its own process (so each peak is its own):

- ``fused``: token_logprobs(fused=True): hidden states at the targets, LinearTokenLogprobs over (512, V) tiles;
- ``keep``: token_logprobs(fused=False): logits at the target positions only (N, V), log-softmax, gather;
- ``plain``: full (B, T, V) logits, fp32 log-softmax, gather at the targets (what a preference trainer does).

Reported: the median step time (wall, and the process's CPU time: the threads' sum, less moved by other processes on
a shared machine than the wall time), and the step's peak memory: the process's maximum resident set size (getrusage) after
the steps less the one before them (model, batch and optimizer-free gradients of a warm-up pass are in the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PATHS = ("fused", "keep", "plain")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(path: str, batch_size: int, seq: int, prompt_frac: float, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.data import IGNORE
    from tunesmith.train.loss import token_logprobs
    from tunesmith.train.packing import model_inputs

    torch.set_num_threads(threads)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g)  # (B, T)
    labels = ids.clone()
    labels[:, :int(seq * prompt_frac)] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def plain(model, batch):
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]  # (B, T-1, V)
        nxt = batch["labels"][:, 1:]
        mask = nxt != IGNORE
        logp = torch.log_softmax(logits.float(), -1).gather(-1, nxt.clamp(min=0)[..., None]).squeeze(-1)
        return logp[mask], torch.arange(nxt.size(0))[:, None].expand_as(nxt)[mask]

    fn = {"fused": lambda m, b: token_logprobs(m, b, fused=True),
          "keep": lambda m, b: token_logprobs(m, b, fused=False), "plain": plain}[path]

    def step():
        model.zero_grad(set_to_none=False)  # the gradients' memory stays allocated: it is in the baseline
        logps, rows = fn(model, batch)
        seqs = torch.zeros(batch_size).index_add(0, rows, logps)
        loss = -F.logsigmoid(0.1 * (seqs[0::2] - seqs[1::2])).sum()
        loss.backward()
        return float(loss)

    with torch.no_grad():  # a small pass so that the allocator and the weights' pages are warm
        model(input_ids=ids[:1, :16])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base = _max_rss_mb()
    times, cpu, losses = [], [], []
    for _ in range(steps + 1):  # the first step is a warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"path": path, "step_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu[1:]),
            "peak_extra_mb": _max_rss_mb() - base,
            "baseline_mb": base, "loss": losses[-1], "targets": int((labels[:, 1:] != IGNORE).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (B)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence (T)")
    ap.add_argument("--prompt-frac", type=float, default=0.5, help="leading fraction of each sequence with no target")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {PATHS}")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.prompt_frac, args.steps, args.threads)))
        return
    results = {}
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, "--worker", path, "--batch", str(args.batch), "--seq", str(args.seq),
               "--prompt-frac", str(args.prompt_frac), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
    targets = next(iter(results.values()))["targets"]
    print(f"B={args.batch} T={args.seq} vocab=49152 hidden=576 layers=2 targets={targets} threads={args.threads}")
    print(f"{'path':8}{'step s':>10}{'CPU s':>10}{'peak extra MB':>16}{'loss':>12}")
    for r in results.values():
        print(f"{r['path']:8}{r['step_s']:>10.2f}{r['cpu_s']:>10.2f}{r['peak_extra_mb']:>16.0f}{r['loss']:>12.5f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
