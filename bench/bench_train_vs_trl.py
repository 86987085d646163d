"""Fine-tuning speed and memory: tunesmith against TRL's SFTTrainer + PEFT, the same job side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train_vs_trl.py              # the default run (~40 min idle)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_train_vs_trl.py --steps 4 --only lora   # a quicker look

The job: the built-in SmolLM2-135M-Instruct (the safetensors folder tunesmith converts from the shipped
GGUF; TRL is given that folder), the shipped chats in bench/data/ (make_chat_data.py: 33 to ~580 tokens),
fp32 on the CPU, assistant-only loss (TRL: conversational prompt-completion data, completion_only_loss),
LoRA r 16 / alpha 32 / dropout 0 on all linear layers, AdamW, lr 2e-4 (full: 2e-5), cosine schedule with
1 warmup step, 8 examples per step, clipping at 1.0, seed 42, the data in file order in both tools (so
both train on the same examples in the same steps), and each tool's other settings at their defaults
except gradient checkpointing, which is off in both (TRL turns it on by default: that run is added as
"trl (its defaults)"; tunesmith with train.compile is added too, its compile time in its wall time but not
in its steps 2..N). The tools take turns, each run in a fresh process so its peak memory is its own.
Each tool runs on the memory allocator its users get: tunesmith as the ``tunesmith`` command starts it
(tcmalloc when installed, src/tunesmith/allocator.py), TRL on the system's malloc; the swap is measured both
ways as extras ("tunesmith system malloc", "trl tcmalloc malloc"). tunesmith runs with model.dtype float32 (on a CPU
with AMX its auto would pick bf16-mixed) and, as an extra, with train.kernels off (the plain transformers/PEFT
computation: its speed and its validation loss against the kernels'). On a CPU that multiplies bf16 in hardware
(AVX512-BF16 or AMX: tunesmith.models.cpu_has_fast) both tools also run in bf16 mixed precision (tunesmith model.dtype
bf16-mixed, LoRA and full; TRL bf16=True with the LoRA base loaded in bf16), compared with tunesmith's fp32 run on the
same job (speed, memory, validation loss: auto's bar is faster at a validation loss within 1%); no MFU is given for
them (the peak is fp32's). ``--gpu`` (make test-gpu): both tools on a CUDA GPU in bf16 mixed precision, memory as
allocated GPU memory, MFU against the GPU's bf16 matmul peak.

Reported per run: trained (target, non-padding) tokens per second of training step (steps 2..N: step 1
holds one-time warm-up), the same per CPU second (this machine is shared, and CPU time is what contention
distorts least), peak resident memory, and the validation loss of the final model computed by one
function for both (token-weighted, tunesmith's rendering of bench/data/chat_valid.jsonl). Model FLOP
utilisation divides the FLOPs the job needs (train_workers.model_flops documents the count) by the
step time and by the best fp32 2048x2048 matmul rate measured in the same runs. The scaling table runs
tunesmith's step on random sequences, every token trained, for each sequence length and batch size.
Results go to bench/results/train_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import clean_env  # bench/ is this script's sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"lora_speed": 1.5, "lora_memory": 0.7, "lora_val_loss_rel": 0.02, "full_speed": 1.3, "full_memory": 1.0,
           "lora_mfu": 0.60}


def worker(spec: dict, log) -> dict:
    """Run one measurement in a fresh process; its last line is ``RESULT {json}``. ``spec["env"]``: variables added to
    the process's environment."""
    t = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "train_workers.py"), json.dumps(spec)], cwd=HERE.parent,
                          capture_output=True, text=True, env={**clean_env(), **spec.get("env", {})})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"worker {spec} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT "):])
    log(f"  {spec.get('label') or _label(spec):34s} done in {time.time() - t:5.0f} s")
    return result


def _label(spec: dict) -> str:
    if spec["kind"] == "scaling":
        extra = (" +ckpt" if spec.get("gradient_checkpointing") else "") + (f" {spec['threads']}thr" if spec.get("threads") else "")
        return f"scaling T={spec['seq_len']} B={spec['batch']} {spec.get('path', 'tunesmith')}{extra}"
    extra = []
    if spec["kind"] == "trl" and spec.get("gradient_checkpointing"):
        extra.append("(its defaults)")
    if spec["kind"] == "tunesmith" and spec.get("compile"):
        extra.append("train.compile")
    if spec["kind"] == "tunesmith" and not spec.get("packing", True):
        extra.append("no packing" + (", grouped" if spec.get("group_by_length") else ""))
    if spec.get("allocator"):
        extra.append(f"{spec['allocator']} malloc")
    if spec.get("dtype"):
        extra.append(spec["dtype"])
    return f"{spec['method']} {spec['kind']} {' '.join(extra)}".strip()


def _cpu_bf16() -> bool:
    from tunesmith.models import cpu_has_fast
    import torch

    return cpu_has_fast(torch.bfloat16)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of the LoRA job (default 24)")
    p.add_argument("--full-steps", type=int, default=10, help="optimizer steps of the full fine-tuning job (default 10)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step (default 8)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--seq-lens", default="128,512,2048", help="scaling table: sequence lengths")
    p.add_argument("--batch-sizes", default="1,4", help="scaling table: batch sizes")
    p.add_argument("--max-scaling-tokens", type=int, default=4096, help="skip scaling cells above this many tokens")
    p.add_argument("--only", choices=["lora", "full", "scaling"], action="append", help="run only these parts")
    p.add_argument("--no-extras", action="store_true",
                   help="skip TRL with its defaults, tunesmith without packing, and the scaling extras")
    p.add_argument("--extras", default=None,
                   help="comma-separated extras to run (default all): compiled, no_packing, trl_defaults, system_malloc, "
                        "trl_tcmalloc, grouped, kernels_off, bf16 (tunesmith), trl_bf16, scaling")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="on a CUDA GPU: both tools in bf16 mixed precision (tunesmith "
                   "model.dtype auto, TRL bf16=True), memory as allocated GPU memory, MFU against the GPU's bf16 peak")
    p.add_argument("--out", default=str(RESULTS / "train_vs_trl.json"))
    args = p.parse_args()
    parts = args.only or ["lora", "full", "scaling"]
    wanted = None if args.extras is None else set(args.extras.split(","))
    extra = lambda name: not args.no_extras and (wanted is None or name in wanted)  # noqa: E731
    log = lambda m: print(m, flush=True)  # noqa: E731
    common = {"batch": args.batch, "seed": args.seed, **({"threads": args.threads} if args.threads else {}),
              **({"device": "cuda"} if args.gpu else {})}
    runs: dict[str, dict] = {}

    if "lora" in parts:
        log(f"LoRA job: {args.steps} steps x {args.batch} examples, taking turns")
        spec = {**common, "method": "lora", "steps": args.steps, "lr": 2e-4}
        runs["lora_tunesmith"] = worker({**spec, "kind": "tunesmith"}, log)
        runs["lora_trl"] = worker({**spec, "kind": "trl"}, log)
        if extra("compiled"):
            runs["lora_tunesmith_compiled"] = worker({**spec, "kind": "tunesmith", "compile": True}, log)
        if extra("no_packing"):
            runs["lora_tunesmith_no_packing"] = worker({**spec, "kind": "tunesmith", "packing": False}, log)
        if extra("trl_defaults"):
            runs["lora_trl_defaults"] = worker({**spec, "kind": "trl", "gradient_checkpointing": True}, log)
        # the allocator's share: tunesmith on the system malloc untouched, TRL with tcmalloc preloaded
        if extra("system_malloc"):
            runs["lora_tunesmith_system_malloc"] = worker({**spec, "kind": "tunesmith", "allocator": "system"}, log)
        if extra("trl_tcmalloc"):
            runs["lora_trl_tcmalloc"] = worker({**spec, "kind": "trl", "allocator": "tcmalloc"}, log)
        # shuffled, as length grouping is used: its steps hold other examples, so only its speed compares
        if extra("grouped"):
            runs["lora_tunesmith_grouped"] = worker({**spec, "kind": "tunesmith", "packing": False,
                                                     "group_by_length": True, "shuffle": True}, log)
        # train.kernels off: the plain transformers/PEFT computation, the same job
        if extra("kernels_off"):
            runs["lora_tunesmith_kernels_off"] = worker({**spec, "kind": "tunesmith", "kernels": "off"}, log)
        if extra("bf16") and _cpu_bf16() and not args.gpu:  # bf16 mixed precision where the CPU multiplies bf16 in hardware
            runs["lora_tunesmith_bf16"] = worker({**spec, "kind": "tunesmith", "dtype": "bf16-mixed"}, log)
        if extra("trl_bf16") and _cpu_bf16() and not args.gpu:
            runs["lora_trl_bf16"] = worker({**spec, "kind": "trl", "dtype": "bf16-mixed"}, log)
    if "full" in parts:
        log(f"full fine-tuning job: {args.full_steps} steps x {args.batch} examples, taking turns")
        spec = {**common, "method": "full", "steps": args.full_steps, "lr": 2e-5}
        runs["full_trl"] = worker({**spec, "kind": "trl"}, log)
        runs["full_tunesmith"] = worker({**spec, "kind": "tunesmith"}, log)
        if extra("bf16") and _cpu_bf16() and not args.gpu:
            runs["full_tunesmith_bf16"] = worker({**spec, "kind": "tunesmith", "dtype": "bf16-mixed"}, log)
    scaling = []
    if "scaling" in parts:
        log("scaling table (tunesmith LoRA step, every token trained)")
        cells = [(T, B) for B in map(int, args.batch_sizes.split(",")) for T in map(int, args.seq_lens.split(","))
                 if T * B <= args.max_scaling_tokens]
        specs = [{**common, "kind": "scaling", "method": "lora", "seq_len": T, "batch": B} for T, B in cells]
        if extra("scaling"):
            specs += [{**common, "kind": "scaling", "method": "lora", "seq_len": 512, "batch": 4,
                       "gradient_checkpointing": True},
                      {**common, "kind": "scaling", "method": "lora", "seq_len": 512, "batch": 4, "threads": 1},
                      {**common, "kind": "scaling", "method": "lora", "seq_len": 2048, "batch": 1, "path": "plain"}]
        scaling = [worker(s, log) for s in specs]

    summary = summarise(runs, scaling)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "targets": TARGETS, "summary": summary, "runs": runs,
                               "scaling": scaling}, indent=2))
    print_summary(summary, runs, scaling)
    log(f"\nwrote {out}")
    return 0


def summarise(runs: dict, scaling: list) -> dict:
    peak = max([r["matmul_gflops"] for r in list(runs.values()) + scaling] or [0.0])
    s: dict = {"matmul_peak_gflops": peak}
    for method in ("lora", "full"):
        a, b = runs.get(f"{method}_tunesmith"), runs.get(f"{method}_trl")
        if not (a and b):
            continue
        s[method] = {
            "speed_ratio": a["steady"]["trained_tokens_per_s"] / b["steady"]["trained_tokens_per_s"],
            "speed_ratio_cpu": a["steady"]["trained_tokens_per_cpu_s"] / b["steady"]["trained_tokens_per_cpu_s"],
            "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
            "val_loss_rel_diff": (a["val_loss"] - b["val_loss"]) / b["val_loss"],
            "mfu": a["steady"]["model_gflop_per_s"] / peak if peak else None,
            "mfu_cpu": a["steady"]["model_gflop_per_cpu_s"] / (peak / a["torch_threads"]) if peak else None,
            "trl_mfu": b["steady"]["model_gflop_per_s"] / peak if peak else None,
        }
    for method in ("lora", "full"):  # bf16-mixed against fp32, the same job; no MFU: the peak above is fp32's
        a, b, fp32 = runs.get(f"{method}_tunesmith_bf16"), runs.get(f"{method}_trl_bf16"), runs.get(f"{method}_tunesmith")
        if a and fp32:
            s[f"{method}_bf16"] = {
                "speed_vs_fp32": a["steady"]["trained_tokens_per_s"] / fp32["steady"]["trained_tokens_per_s"],
                "memory_vs_fp32": a["peak_rss_mb"] / fp32["peak_rss_mb"],
                "val_loss_vs_fp32": (a["val_loss"] - fp32["val_loss"]) / fp32["val_loss"],
                **({"speed_ratio_vs_trl_bf16": a["steady"]["trained_tokens_per_s"] / b["steady"]["trained_tokens_per_s"],
                    "memory_ratio_vs_trl_bf16": a["peak_rss_mb"] / b["peak_rss_mb"],
                    "trl_bf16_val_loss_vs_fp32": (b["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]} if b else {}),
            }
    off, on = runs.get("lora_tunesmith_kernels_off"), runs.get("lora_tunesmith")
    if off and on:
        s["kernels_off"] = {"speed_vs_on": off["steady"]["trained_tokens_per_s"] / on["steady"]["trained_tokens_per_s"],
                            "memory_vs_on": off["peak_rss_mb"] / on["peak_rss_mb"],
                            "val_loss_vs_on": (off["val_loss"] - on["val_loss"]) / on["val_loss"],
                            "train_loss_max_rel_diff": max(abs(x - y) / abs(y) for x, y in
                                                           zip(off["train_losses"], on["train_losses"]))}
    if "lora" in s:
        L = s["lora"]
        L["meets"] = {"speed": L["speed_ratio"] >= TARGETS["lora_speed"],
                      "memory": L["memory_ratio"] <= TARGETS["lora_memory"],
                      "val_loss": abs(L["val_loss_rel_diff"]) <= TARGETS["lora_val_loss_rel"],
                      "mfu": L["mfu"] is not None and L["mfu"] >= TARGETS["lora_mfu"]}
    if "full" in s:
        F = s["full"]
        F["meets"] = {"speed": F["speed_ratio"] >= TARGETS["full_speed"],
                      "memory": F["memory_ratio"] <= TARGETS["full_memory"]}
    return s


def print_summary(s: dict, runs: dict, scaling: list) -> None:
    print(f"\nfp32 matmul peak measured in these runs: {s['matmul_peak_gflops']:.0f} GFLOP/s")
    print(f"{'run':34s} {'trained tok/s':>13s} {'tok/CPU-s':>10s} {'all tok/s':>10s} {'GFLOP/s':>8s} "
          f"{'peak RSS':>9s} {'val loss':>9s}")
    for name, r in runs.items():
        st = r["steady"]
        print(f"{name:34s} {st['trained_tokens_per_s']:13.1f} {st['trained_tokens_per_cpu_s']:10.1f} "
              f"{st['tokens_per_s']:10.1f} {st['model_gflop_per_s']:8.1f} {r['peak_rss_mb']:7.0f}MB {r['val_loss']:9.4f}")
    for method, bar in (("lora", "1.5x speed, 0.7x memory, val loss within 2%, MFU 60%"), ("full", "1.3x speed, 1.0x memory")):
        if method in s:
            m = s[method]
            meets = ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in m["meets"].items())
            print(f"{method}: tunesmith/TRL speed {m['speed_ratio']:.2f}x (per CPU-s {m['speed_ratio_cpu']:.2f}x), "
                  f"memory {m['memory_ratio']:.2f}x, val loss {100 * m['val_loss_rel_diff']:+.2f}%, "
                  f"MFU {100 * m['mfu']:.0f}% (per CPU-s {100 * m['mfu_cpu']:.0f}%; TRL {100 * m['trl_mfu']:.0f}%)"
                  f"  [target {bar}: {meets}]")
    for method in ("lora", "full"):
        if f"{method}_bf16" in s:
            m = s[f"{method}_bf16"]
            trl = (f"; tunesmith/TRL (both bf16 mixed) speed {m['speed_ratio_vs_trl_bf16']:.2f}x, memory "
                   f"{m['memory_ratio_vs_trl_bf16']:.2f}x, TRL's val loss {100 * m['trl_bf16_val_loss_vs_fp32']:+.2f}% vs "
                   "tunesmith fp32" if "speed_ratio_vs_trl_bf16" in m else "")
            ok = m["speed_vs_fp32"] > 1 and abs(m["val_loss_vs_fp32"]) <= 0.01
            print(f"{method}, model.dtype bf16-mixed (this CPU has bf16 units): {m['speed_vs_fp32']:.2f}x the fp32 speed, "
                  f"memory {m['memory_vs_fp32']:.2f}x, val loss {100 * m['val_loss_vs_fp32']:+.2f}% vs fp32 "
                  f"[auto's bar: faster, val loss within 1%: {'PASS' if ok else 'FAIL'}]{trl}")
    if "kernels_off" in s:
        m = s["kernels_off"]
        print(f"lora, train.kernels off (plain transformers/PEFT): {m['speed_vs_on']:.2f}x the speed with kernels, memory "
              f"{m['memory_vs_on']:.2f}x, val loss {100 * m['val_loss_vs_on']:+.4f}%, per-step train losses within "
              f"{m['train_loss_max_rel_diff']:.1e}")
    if scaling:
        print(f"\n{'scaling (LoRA, all tokens trained)':40s} {'tok/s':>7s} {'tok/CPU-s':>10s} {'GFLOP/s':>8s} {'peak RSS':>9s}")
        for r in scaling:
            print(f"{_label(r):40s} {r['tokens_per_s']:7.1f} {r['tokens_per_cpu_s']:10.1f} {r['model_gflop_per_s']:8.1f} "
                  f"{r['peak_rss_mb']:7.0f}MB")


if __name__ == "__main__":
    sys.exit(main())
