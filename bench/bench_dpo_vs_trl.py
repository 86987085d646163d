"""DPO speed and memory: tunesmith against TRL's DPOTrainer + PEFT, the same LoRA job side by side.

    python bench/make_pair_data.py                                  # the pairs (written already; seeded)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_dpo_vs_trl.py       # the default run (up to ~2 h on 2 cores; ~20 GB)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_dpo_vs_trl.py --steps 3 --batch 2 --no-extras   # a quick look

The job: the built-in SmolLM2-135M-Instruct (the safetensors folder tunesmith converts from the shipped GGUF; TRL
is given that folder), the preference pairs of bench/data/pairs_train.jsonl (make_pair_data.py: the shipped chats
of realistic length, the reply chosen, a seeded corruption of it rejected; prompt + answer 53 to 698 tokens, ~440
tokens a pair), fp32 on the CPU, sigmoid DPO loss with beta 0.1, LoRA r 16 / alpha 32 / dropout 0 on all linear
layers, AdamW lr 1e-5, cosine schedule with 1 warmup step, no weight decay, clipping at 1.0, 8 pairs per step,
seed 42, the pairs in file order in both tools (TRL: train_sampling_strategy sequential; checked from the answer
tokens each step scores), no gradient checkpointing in either (TRL turns it on by default), max length 1024 in
both (no pair comes near it, so neither truncates; TRL also scores the newline the chat template writes after each
answer's <|im_end|>, tunesmith stops at the <|im_end|>, as its SFT does). The reference is the starting model:
TRL's default for a PEFT model is the same model with its adapters switched off, computed in every step; tunesmith
computes the reference log-probabilities of every pair (training and validation) once before the first step, with
the adapters off. Its on-disk cache of them is bypassed here (dpo_workers.py), so each run pays the pass as a
first run on new data does. TRL with precompute_ref_log_probs (the reference of every training pair once, before
training) is run as an extra, and TRL's default run again with tcmalloc preloaded (the allocator's share of the
difference: on glibc's defaults every fresh activation buffer page-faults, src/tunesmith/allocator.py). The tools
take turns, each run in a fresh process so its peak memory is its own, on the allocator its users get (tunesmith
tcmalloc when installed, as the ``tunesmith`` command starts it; TRL the system's malloc).

Reported per run: preference pairs per second of training step (steps 2..N: step 1 holds one-time warm-up) and the
same per CPU second (this machine is shared, and CPU time is what contention distorts least); the reference pass,
where a tool makes one before training, in seconds beside them (part of the run's wall time, not of its steps);
the run's wall time from model load to the end of training (tunesmith's includes its own held-out evaluation and
saving the adapter); peak resident memory (the reference pass included); and the held-out DPO loss of the final
adapter, computed by one function for every tool (dpo_workers.heldout_dpo): each tool's saved adapter loaded into
the same fp32 base, one unpadded sequence at a time through plain transformers + PEFT, the sigmoid DPO loss on
bench/data/pairs_valid.jsonl (tunesmith's rendering) with the base as reference, beta 0.1. Targets, tunesmith
against TRL's default run: >= 2x its pairs/s at <= 0.5x its peak memory, held-out loss within 2% (at lr 1e-5 for
12 steps the loss moves only a little from log 2, so the difference in how far each tool moved it is printed
beside it). Results go to bench/results/dpo_vs_trl.json, with the machine, and the load average and free memory at
each run's start.

Run it on a quiet machine. Where other processes hold the cores, a process running two torch threads on two cores
waits a time slice at each parallel operation (an elementwise op on a 300-token sequence measured ~6 ms so, ~65 us
on one thread); tunesmith's OpenMP wait setting (src/tunesmith/cpus.py) softens that and TRL's defaults do not, so the
ratios measure the contention more than the tools (smoke runs on the busy 2-core machine: 10x to 23x).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from harness import machine, run_worker  # bench/ is this script's sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"speed": 2.0, "memory": 0.5, "val_loss_rel": 0.02}


OOM_HINT = ("; TRL's run of this job peaks at ~20 GB (its padded batch of 16 sequences keeps every activation): run "
            "it when the machine's memory is free, or with a smaller --batch")


def worker(spec: dict, label: str, log) -> dict:
    """One measurement in a fresh process (harness.run_worker)."""
    return run_worker("dpo_workers.py", spec, label, log, OOM_HINT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    p.add_argument("--batch", type=int, default=8, help="preference pairs per optimizer step (default 8)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate, both tools (default 1e-5)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-extras", action="store_true", help="skip the extra runs: only tunesmith and TRL's default")
    p.add_argument("--extras", default="precompute,trl_tcmalloc,unshared",
                   help="comma-separated extra runs (default all): precompute (TRL with precompute_ref_log_probs), "
                        "trl_tcmalloc (TRL's default run with tcmalloc preloaded: the allocator's share), unshared "
                        "(tunesmith with each answer holding its own copy of the prompt: what sharing it gains)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every training run (default: torch's)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders (adapters) in /tmp")
    p.add_argument("--out", default=str(RESULTS / "dpo_vs_trl.json"))
    args = p.parse_args()
    if not (HERE / "data" / "pairs_train.jsonl").is_file():
        sys.exit("bench/data/pairs_train.jsonl is missing: run python bench/make_pair_data.py")
    log = lambda m: print(m, flush=True)  # noqa: E731
    spec = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            **({"threads": args.threads} if args.threads else {})}

    log(f"DPO LoRA job: {args.steps} steps x {args.batch} pairs, taking turns")
    runs = {"tunesmith": worker({**spec, "kind": "tunesmith"}, "tunesmith", log),
            "trl": worker({**spec, "kind": "trl"}, "trl", log)}
    extras = set() if args.no_extras else set(args.extras.split(","))
    wanted = {"precompute": ("trl_precompute", {**spec, "kind": "trl", "precompute": True}, "trl precompute_ref_log_probs"),
              "trl_tcmalloc": ("trl_tcmalloc", {**spec, "kind": "trl", "allocator": "tcmalloc"}, "trl tcmalloc malloc"),
              "unshared": ("tunesmith_unshared", {**spec, "kind": "tunesmith", "layout": "packed"},
                           "tunesmith, prompt not shared")}
    failed = {}
    for key, (name, extra, label) in wanted.items():
        if key not in extras:
            continue
        try:  # an extra run that fails (out of memory on a shared machine) leaves the main comparison standing
            runs[name] = worker(extra, label, log)
        except RuntimeError as e:
            failed[name] = str(e)[-600:]
            log(f"  {label:26s} FAILED, left out: {str(e).splitlines()[0][:160]}")
    score = worker({"kind": "score", "adapters": {k: r["adapter"] for k, r in runs.items()}}, "held-out DPO loss",
                   log)["scores"]
    for name, r in runs.items():
        r["val_loss"], r["val_accuracy"] = score[name]["loss"], score[name]["accuracy"]
        if not args.keep:
            shutil.rmtree(r["workdir"], ignore_errors=True)

    summary = summarise(runs)
    summary["same_steps"] = same_steps(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine(), "targets": TARGETS, "summary": summary,
                               "runs": runs, "heldout": score, "failed_extras": failed}, indent=2))
    print_summary(summary, runs, score)
    log(f"\nwrote {out}")
    return 0


def same_steps(runs: dict) -> bool:
    """Whether every TRL run trained the pairs tunesmith trained, step by step: its scored tokens per step are
    tunesmith's plus one a sequence (the newline after <|im_end|>), as they are exactly when the pairs match."""
    ts = runs["tunesmith"]["step_answer_tokens"]
    for name, r in runs.items():
        extra = 0 if name.startswith("tunesmith") else 2 * r["batch"]
        if name != "tunesmith" and r["step_answer_tokens"] != [n + extra for n in ts]:
            print(f"warning: {name} trained other pairs than tunesmith in some step (scored tokens per step "
                  f"{r['step_answer_tokens']} against tunesmith's {ts})")
            return False
    return True


def summarise(runs: dict) -> dict:
    a = runs["tunesmith"]
    s: dict = {}
    for other in ("trl", "trl_precompute", "trl_tcmalloc"):
        b = runs.get(other)
        if not b:
            continue
        s[f"vs_{other}"] = {
            "speed_ratio": a["steady"]["pairs_per_s"] / b["steady"]["pairs_per_s"],
            "speed_ratio_cpu": a["steady"]["pairs_per_cpu_s"] / b["steady"]["pairs_per_cpu_s"],
            "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
            "wall_ratio": a["wall_s"] / b["wall_s"],
            "val_loss_rel_diff": (a["val_loss"] - b["val_loss"]) / b["val_loss"],
            # a few steps at lr 1e-5 move the loss little from log 2: how far each moved it is the stricter comparison
            "val_loss_drop_rel_diff": (a["val_loss"] - b["val_loss"]) / (math.log(2) - b["val_loss"]),
        }
    if "tunesmith_unshared" in runs:  # each pair's prompt once against twice, the same job otherwise
        b = runs["tunesmith_unshared"]
        s["prompt_sharing"] = {"speed_ratio": a["steady"]["pairs_per_s"] / b["steady"]["pairs_per_s"],
                               "speed_ratio_cpu": a["steady"]["pairs_per_cpu_s"] / b["steady"]["pairs_per_cpu_s"],
                               "reference_ratio": a["reference_s"] / b["reference_s"],
                               "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
                               "val_loss_rel_diff": (a["val_loss"] - b["val_loss"]) / b["val_loss"]}
    m = s["vs_trl"]
    m["meets"] = {"speed": m["speed_ratio"] >= TARGETS["speed"], "memory": m["memory_ratio"] <= TARGETS["memory"],
                  "val_loss": abs(m["val_loss_rel_diff"]) <= TARGETS["val_loss_rel"]}
    return s


def print_summary(s: dict, runs: dict, score: dict) -> None:
    print(f"\n{'run':16s} {'pairs/s':>8s} {'pairs/CPU-s':>11s} {'ans tok/s':>9s} {'reference':>10s} {'wall':>7s} "
          f"{'peak RSS':>9s} {'val loss':>9s} {'val acc':>7s} {'load start-end':>14s}")
    for name, r in runs.items():
        st = r["steady"]
        ref = f"{r['reference_s']:8.0f} s" if r.get("reference_s") is not None else f"{'in steps':>10s}"
        print(f"{name:16s} {st['pairs_per_s']:8.3f} {st['pairs_per_cpu_s']:11.3f} {st['answer_tokens_per_s']:9.1f} "
              f"{ref} {r['wall_s']:5.0f} s {r['peak_rss_mb']:7.0f}MB {r['val_loss']:9.4f} {r['val_accuracy']:7.3f} "
              f"{r['load_1min'][0]:6.2f}-{r['load_1min'][1]:.2f}")
    print(f"{'base (no training)':16s} {'':58s} {score['base']['loss']:9.4f} {score['base']['accuracy']:7.3f}")
    t = runs["tunesmith"]
    print(f"the same pairs in every step in every run: {'yes' if s['same_steps'] else 'NO'}")
    print(f"tunesmith's own held-out loss (its eval, same pairs): {t['own_val_loss']:.4f}; its reference pass: "
          f"{t['reference_pairs']} pairs (training + validation) in {t['reference_s']:.0f} s")
    for other, m in ((k, v) for k, v in s.items() if k.startswith("vs_")):
        line = (f"tunesmith/{other[3:]}: speed {m['speed_ratio']:.2f}x (per CPU-s {m['speed_ratio_cpu']:.2f}x), "
                f"memory {m['memory_ratio']:.2f}x, wall {m['wall_ratio']:.2f}x, held-out loss "
                f"{100 * m['val_loss_rel_diff']:+.2f}% (its drop from log 2 {100 * -m['val_loss_drop_rel_diff']:+.1f}% "
                "against TRL's)")
        if "meets" in m:
            meets = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in m["meets"].items())
            line += f"  [target >= 2x speed, <= 0.5x memory, loss within 2%: {meets}]"
        print(line)
    if "prompt_sharing" in s:
        m = s["prompt_sharing"]
        print(f"each pair's prompt once / twice (tunesmith): speed {m['speed_ratio']:.2f}x (per CPU-s "
              f"{m['speed_ratio_cpu']:.2f}x), reference pass {m['reference_ratio']:.2f}x the time, memory "
              f"{m['memory_ratio']:.2f}x, held-out loss {100 * m['val_loss_rel_diff']:+.3f}%")


if __name__ == "__main__":
    sys.exit(main())
