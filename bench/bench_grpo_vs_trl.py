"""Reinforcement fine-tuning (GRPO) speed and memory: tunesmith against TRL's GRPOTrainer + PEFT, the same LoRA job.

    python bench/make_prompt_data.py                                 # the prompts (written already; deterministic)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_grpo_vs_trl.py      # the default run (~15 min: see Time below)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_grpo_vs_trl.py --steps 3 --prompts 2 --generations 2 \
        --max-new-tokens 16 --no-extras                              # a quick look

The job: the built-in SmolLM2-135M-Instruct (the safetensors folder tunesmith converts from the shipped GGUF; TRL is
given that folder), the date prompts of bench/data/prompts_train.jsonl in file order (make_prompt_data.py: a date
written as people write it, to be answered in ISO 8601; the reference answer in a field of its own), fp32 on the CPU,
LoRA r 16 / alpha 32 / dropout 0 on all linear layers, AdamW lr 1e-5, cosine schedule with 1 warmup step, no weight
decay, clipping at 1.0, seed 42, no gradient checkpointing in either (TRL turns it on by default). Each step: 4
prompts (--prompts), 4 answers sampled per prompt (--generations) with transformers' generate and its KV cache, in one
generate call of 16 (TRL: per_device_train_batch_size 16 completions, generation_batch_size 16, steps_per_generation
1, num_iterations 1; tunesmith: eval.batch_size 16, the batch it samples in), at temperature 1.0, top_p 1, top_k 0
(off in both), up to 32 new tokens (--max-new-tokens); each answer graded by the same function (grpo_workers.reward:
1 for the exact date, else partial credit up to 0.5 less a small length penalty; TRL gets it as reward_funcs, tunesmith
as the grader "grpo_workers:reward"); advantages relative to the group, divided by its reward std (scale_rewards
group); the DAPO loss (token losses summed over the step's answer tokens, divided by their number), epsilon 0.2, beta
0 (no reference model, no KL), answers cut at the length limit left out of the loss (mask_truncated_completions, TRL's
default is off). One update per sample batch, so the probability ratio is 1 in both. The prompts per step are checked
to be the same in both tools (each grade records its question: grpo_workers.SEEN; TRL: shuffle_dataset False).

What cannot be made equal: the sampled answers. The tools seed differently (tunesmith by (seed, step) before each
step's sampling, so a resumed run samples the same answers; TRL seeds once at the start and its sampling draws from
the global generator), so the same seed gives other answers in each tool, other rewards and answer lengths step by
step, and so other gradients: compare the mean reward and mean answer length over the run, not step by step, and
remember that a step's cost depends on the length of its answers (generation stops when every answer of the batch has
ended; the training pass is as long as the longest). tunesmith's step time is its loop's clock (tokens / tokens_per_s
of each StepEnd: sampling, grading and the update; evaluation and checkpoints excluded), its sampling + grading time
the step's ``generation_s``; TRL's step time is from its step-begin to its step-end callback, its sampling + grading
time measured by wrapping GRPOTrainer._generate_and_score_completions (generate, decode, the reward call, advantages;
TRL logs a ``step_time`` but no generation time of its own). Training time is the step's time less that. tunesmith's
wall time includes its held-out evaluation at the end (greedy answers to prompts_valid, graded) and saving the
adapter; TRL's includes saving the adapter.

Reported per run: training steps per second over steps 2..N (step 1 holds one-time warm-up) and per CPU second (this
machine is shared; CPU time is what contention distorts least); seconds per step spent sampling + grading and
training; the run's wall time from model load to the end; peak resident memory; the mean reward of the training
answers and their mean length in tokens (the eos included); and the held-out reward of the final adapter, computed
by one function for every tool (grpo_workers.heldout_reward): each saved adapter loaded into the same fp32 base,
greedy answers to bench/data/prompts_valid.jsonl one prompt at a time through plain transformers + PEFT, graded by
the same reward; the base is graded too. At lr 1e-5 for a dozen steps the adapters move the model little, and the
held-out reward of 32 prompts differs between runs by sampling chance: it shows that both trained something sane,
not which tool trains better. Targets, tunesmith against TRL's run: >= 1.5x its steps/s at <= 0.7x its peak memory.
Results go to bench/results/grpo_vs_trl.json, with the machine, and the load average and free memory at each run's
start. The tools take turns, each run in a fresh process so its peak memory is its own, on the allocator its users get
(tunesmith tcmalloc when installed, as the ``tunesmith`` command starts it; TRL the system's malloc). Extras: TRL with
tcmalloc preloaded (the allocator's share), tunesmith with each answer holding its own copy of the prompt (what
sharing the prompt within a group gains).

Time: the default run takes ~15 minutes on a quiet 2-core machine, ~8 with --no-extras (estimated from a smoke of 2
steps x 2 prompts x 2 answers of 16 tokens: ~1.9 s a step in tunesmith, ~2.3 s in TRL, half or more of it sampling;
the default steps sample 4x the answers at twice the length and train ~5x the tokens: ~6 to 10 s a step). Nearly
half of it is the held-out grading: 32 prompts x 32 greedy tokens for the base and each adapter, one thread, ~65 ms
a token. On this model and task ~1 sampled answer in 8 ends within 32 tokens (the base model explains rather than
answers), so most answers are cut and left out of the loss in both tools: the updates are small, the speed figures
are not affected (both tools still run every answer through the forward and backward pass). Run it on a quiet
machine: see bench_dpo_vs_trl.py on how contention for the cores distorts the ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from harness import machine, run_worker  # bench/ is this script's sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"speed": 1.5, "memory": 0.7}


def worker(spec: dict, label: str, log) -> dict:
    """One measurement in a fresh process (harness.run_worker)."""
    return run_worker("grpo_workers.py", spec, label, log)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step (default 4)")
    p.add_argument("--generations", type=int, default=4, help="answers sampled per prompt, the group (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens sampled per answer (default 32)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate, both tools (default 1e-5)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-extras", action="store_true", help="skip the extra runs: only tunesmith and TRL")
    p.add_argument("--extras", default="trl_tcmalloc,unshared",
                   help="comma-separated extra runs (default all): trl_tcmalloc (TRL with tcmalloc preloaded: the "
                        "allocator's share), unshared (tunesmith with each answer holding its own copy of the "
                        "prompt: what sharing it gains)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every training run (default: torch's)")
    p.add_argument("--keep", action="store_true", help="keep the runs' folders (adapters) in /tmp")
    p.add_argument("--out", default=str(RESULTS / "grpo_vs_trl.json"))
    args = p.parse_args()
    if not (HERE / "data" / "prompts_train.jsonl").is_file():
        sys.exit("bench/data/prompts_train.jsonl is missing: run python bench/make_prompt_data.py")
    log = lambda m: print(m, flush=True)  # noqa: E731
    spec = {"steps": args.steps, "prompts": args.prompts, "generations": args.generations,
            "max_new_tokens": args.max_new_tokens, "lr": args.lr, "seed": args.seed,
            **({"threads": args.threads} if args.threads else {})}

    log(f"GRPO LoRA job: {args.steps} steps x {args.prompts} prompts x {args.generations} answers of up to "
        f"{args.max_new_tokens} tokens, taking turns")
    runs = {"tunesmith": worker({**spec, "kind": "tunesmith"}, "tunesmith", log),
            "trl": worker({**spec, "kind": "trl"}, "trl", log)}
    extras = set() if args.no_extras else set(args.extras.split(","))
    if "trl_tcmalloc" in extras:
        runs["trl_tcmalloc"] = worker({**spec, "kind": "trl", "allocator": "tcmalloc"}, "trl tcmalloc malloc", log)
    if "unshared" in extras:
        runs["tunesmith_unshared"] = worker({**spec, "kind": "tunesmith", "layout": "packed"},
                                            "tunesmith, prompt not shared", log)
    score = worker({"kind": "score", "max_new_tokens": args.max_new_tokens,
                    "adapters": {k: r["adapter"] for k, r in runs.items()}}, "held-out reward", log)["scores"]
    for name, r in runs.items():
        r["heldout"] = score[name]
        if not args.keep:
            shutil.rmtree(r["workdir"], ignore_errors=True)

    summary = summarise(runs)
    summary["same_prompts"] = same_prompts(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine(), "targets": TARGETS, "summary": summary,
                               "runs": runs, "heldout": score}, indent=2))
    print_summary(summary, runs, score)
    log(f"\nwrote {out}")
    return 0


def same_prompts(runs: dict) -> bool:
    """Whether every run trained on tunesmith's prompts, step by step (the questions its grades recorded)."""
    ts = runs["tunesmith"]["step_prompts"]
    for name, r in runs.items():
        if r["step_prompts"] != ts:
            print(f"warning: {name} trained other prompts than tunesmith in some step")
            return False
    return True


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summarise(runs: dict) -> dict:
    a = runs["tunesmith"]
    s: dict = {}
    for name, r in runs.items():  # what the sampling gave each run: compare these over the run, not step by step
        s[f"{name}_answers"] = {"mean_reward": _mean(r["step_rewards"]),
                                "mean_completion_length": _mean(r["completion_lengths"])}
    for other in ("trl", "trl_tcmalloc"):
        b = runs.get(other)
        if not b:
            continue
        sa, sb = a["steady"], b["steady"]
        s[f"vs_{other}"] = {
            "speed_ratio": sa["steps_per_s"] / sb["steps_per_s"],
            "speed_ratio_cpu": sa["steps_per_cpu_s"] / sb["steps_per_cpu_s"],
            "generation_ratio": sb["generation_s_per_step"] / sa["generation_s_per_step"],  # > 1: tunesmith faster
            "training_ratio": sb["training_s_per_step"] / sa["training_s_per_step"],
            "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
            "wall_ratio": a["wall_s"] / b["wall_s"],
            "heldout_reward_diff": a["heldout"]["reward"] - b["heldout"]["reward"],
            # answers' lengths drive a step's cost; the sampling makes them differ between the tools
            "completion_length_ratio": (s["tunesmith_answers"]["mean_completion_length"]
                                        / s[f"{other}_answers"]["mean_completion_length"]),
        }
    if "tunesmith_unshared" in runs:  # each group's prompt once against once per answer, the same job otherwise
        b = runs["tunesmith_unshared"]
        sa, sb = a["steady"], b["steady"]
        s["prompt_sharing"] = {"speed_ratio": sa["steps_per_s"] / sb["steps_per_s"],
                               "training_ratio": sb["training_s_per_step"] / sa["training_s_per_step"],
                               "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"]}
    m = s["vs_trl"]
    m["meets"] = {"speed": m["speed_ratio"] >= TARGETS["speed"], "memory": m["memory_ratio"] <= TARGETS["memory"]}
    return s


def print_summary(s: dict, runs: dict, score: dict) -> None:
    print(f"\n{'run':18s} {'steps/s':>8s} {'steps/CPU-s':>11s} {'gen s/step':>10s} {'train s/step':>12s} {'wall':>7s} "
          f"{'peak RSS':>9s} {'reward':>7s} {'ans tok':>7s} {'held-out':>8s} {'load start-end':>14s}")
    for name, r in runs.items():
        st = r["steady"]
        print(f"{name:18s} {st['steps_per_s']:8.4f} {st['steps_per_cpu_s']:11.4f} {st['generation_s_per_step']:10.2f} "
              f"{st['training_s_per_step']:12.2f} {r['wall_s']:5.0f} s {r['peak_rss_mb']:7.0f}MB "
              f"{_mean(r['step_rewards']):7.3f} {_mean(r['completion_lengths']):7.1f} {r['heldout']['reward']:8.3f} "
              f"{r['load_1min'][0]:6.2f}-{r['load_1min'][1]:.2f}")
    print(f"{'base (no training)':18s} {'':79s} {score['base']['reward']:8.3f}")
    t = runs["tunesmith"]
    print(f"the same prompts in every step in every run: {'yes' if s['same_prompts'] else 'NO'}")
    print(f"tunesmith's own held-out reward (its evaluation, batched): {t['own_val_reward']:.3f}; held-out exact "
          "answers: " + ", ".join(f"{k} {v['exact']:.2f}" for k, v in score.items()))
    for other, m in ((k, v) for k, v in s.items() if k.startswith("vs_")):
        line = (f"tunesmith/{other[3:]}: speed {m['speed_ratio']:.2f}x (per CPU-s {m['speed_ratio_cpu']:.2f}x; "
                f"sampling {m['generation_ratio']:.2f}x, training {m['training_ratio']:.2f}x as fast), memory "
                f"{m['memory_ratio']:.2f}x, wall {m['wall_ratio']:.2f}x, answers {m['completion_length_ratio']:.2f}x "
                f"as long, held-out reward {m['heldout_reward_diff']:+.3f}")
        if "meets" in m:
            meets = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in m["meets"].items())
            line += f"  [target >= 1.5x speed, <= 0.7x memory: {meets}]"
        print(line)
    if "prompt_sharing" in s:
        m = s["prompt_sharing"]
        print(f"each group's prompt once / once per answer (tunesmith): speed {m['speed_ratio']:.2f}x, training "
              f"{m['training_ratio']:.2f}x as fast, memory {m['memory_ratio']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
