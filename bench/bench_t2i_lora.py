"""Text-to-image LoRA speed and memory: tunesmith against diffusers' train_text_to_image_lora.py, the same job.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_t2i_lora.py                  # the CPU run (14 min on 2 shared cores)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_t2i_lora.py --device cuda --dtype bf16      # on a GPU, one command
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_t2i_lora.py --smoke          # seconds: the tiny model, 3 steps

The job: a seeded random Stable Diffusion 1.x-class pipeline (StableDiffusionPipeline's own classes and SD 1.x's
layout: a 4-level UNet2DConditionModel with cross-attention in three levels, a 4-level AutoencoderKL, a CLIP text
encoder; t2i_workers.SIZES gives the widths: "cpu" 128 px, 34M-parameter UNet; "gpu" SD 1.5's real widths at 512 px),
built by the script, and a folder of captioned images of tunesmith's synthetic world (coloured shapes) at that
resolution, with a held-out folder. Both tools train the example's LoRA: rank 4, alpha 4, gaussian init, on the
UNet's to_q/to_k/to_v/to_out.0; AdamW (0.9, 0.999), weight decay 1e-2, eps 1e-8; constant learning rate; clipping at
1.0; plain MSE on the noise (snr_gamma None); the data shuffled; batch 16 (the example's default); the same learning
rate and step count. The baseline (t2i_lora_baseline.py) is the example's loop, with no caching: each step encodes its
images with the VAE and its captions with the text encoder. tunesmith runs its `train()` with the same settings:
caption embeddings and VAE latent distributions computed once before training (a fresh cache per run, so that cost
is in its wall time) and a fresh latent sample, noise and timestep per image and step.

Each run in its own process, taking turns: images per second over steps 2..N (step 1 holds one-time warm-up), per
wall second and per CPU second (this machine is shared: CPU time is what contention distorts least), the process's
peak resident memory (and on a GPU its most allocated GPU memory), the run's wall time (set-up and caching
included). On a CPU the runs are fp32 against fp32, and each tool as its users start it: tunesmith with model.dtype
auto (bf16-mixed where the CPU multiplies bf16 in hardware: AMX) against the example's default (no mixed precision),
and the example with --mixed_precision bf16 too. ``--device cuda --dtype bf16``: both in bf16 mixed precision on the
GPU (tunesmith model.dtype bf16-mixed, the example --mixed_precision bf16). The final validation loss: one process
loads each tool's LoRA file onto the base pipeline with diffusers' load_lora_weights and scores it with one function
(t2i_workers.validation_loss: held-out images at 4 fixed timesteps, fixed noise, plain MSE). Results go to
bench/results/t2i_lora.json (--out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, run_worker  # bench/ is this script's sys.path[0]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGETS = {"speed": 1.5, "memory": 0.7, "val_loss_rel": 0.02}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the example's unet_lora_config


def baseline(spec: dict, log) -> dict:
    """t2i_lora_baseline.py in a fresh process, with the example's command-line flags."""
    import subprocess

    from harness import clean_env

    flags = ["--pretrained_model_name_or_path", spec["model"], "--train_data_dir", spec["train"],
             "--resolution", str(spec["resolution"]), "--train_batch_size", str(spec["batch"]),
             "--max_train_steps", str(spec["steps"]), "--learning_rate", str(spec["lr"]), "--rank", str(spec["rank"]),
             "--seed", str(spec["seed"]), "--output_dir", spec["out"], "--cache_dir", spec["out"] + "-datasets"]
    if spec.get("mixed_precision"):
        flags += ["--mixed_precision", spec["mixed_precision"]]
    env = clean_env()
    if spec.get("process") == "tunesmith":
        env["BENCH_PROCESS"] = "tunesmith"
    if spec.get("device") != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks the GPU when there is one
    t = time.time()
    proc = subprocess.run([sys.executable, str(HERE / "t2i_lora_baseline.py"), *flags], cwd=HERE.parent,
                          capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"baseline {flags} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    log(f"  {spec['label']:34s} done in {time.time() - t:5.0f} s")
    return {**spec, **json.loads(lines[-1][len("RESULT "):])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="the precision of the main pair (default: fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--size", choices=["cpu", "gpu", "smoke"], default=None,
                   help="the pipeline's widths (t2i_workers.SIZES; default: the device's)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of each run (default 12)")
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16, the example's)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of both (default 1e-3)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank, alpha the same (default 4, the example's)")
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--valid-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch threads in tunesmith's runs (default: its own)")
    p.add_argument("--no-extras", action="store_true", help="only the main pair (no auto / bf16 runs on a CPU)")
    p.add_argument("--runs", default=None, help="comma-separated runs to make (default all): tunesmith, diffusers, "
                                                "tunesmith_auto, diffusers_bf16, diffusers_ts_process")
    p.add_argument("--smoke", action="store_true", help="the tiny model, 3 steps of 4 images: checks that it runs")
    p.add_argument("--work", default=None, help="where the model and data are built (default: a temporary folder)")
    p.add_argument("--out", default=str(RESULTS / "t2i_lora.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.batch, args.train_images, args.valid_images = "smoke", 3, 4, 8, 4
        args.no_extras = True
    cuda = args.device == "cuda"
    size = args.size or ("gpu" if cuda else "cpu")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    log = lambda m: print(m, flush=True)  # noqa: E731
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-t2i-"))

    from t2i_workers import SIZES, build_pipeline, write_images  # torch, diffusers: after the arguments parse

    resolution = SIZES[size]["resolution"]
    t = time.time()
    model = build_pipeline(work / f"sd-{size}", size)
    train = write_images(work / f"train-{resolution}", args.train_images, args.seed, resolution)
    valid = write_images(work / f"valid-{resolution}", args.valid_images, args.seed + 1, resolution)
    log(f"model ({size}) and data ({args.train_images} + {args.valid_images} images at {resolution} px) in {work}: "
        f"{time.time() - t:.0f} s")

    common = {"model": str(model), "train": str(train), "valid": str(valid), "resolution": resolution,
              "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank, "seed": args.seed,
              "device": args.device, "lora_targets": LORA_TARGETS}
    ts_dtype = {"fp32": "float32", "bf16": "bf16-mixed"}[dtype]
    runs_wanted = [("tunesmith", {"kind": "tunesmith", "dtype": ts_dtype}),
                   ("diffusers", {"kind": "diffusers", "mixed_precision": "bf16" if dtype == "bf16" else "no"})]
    if not cuda and not args.no_extras:  # each tool as its users start it, and the example in bf16 as well
        runs_wanted += [("tunesmith_auto", {"kind": "tunesmith", "dtype": "auto"}),
                        ("diffusers_bf16", {"kind": "diffusers", "mixed_precision": "bf16"}),
                        # the example's loop in the process tunesmith runs in (tcmalloc, OpenMP wait): how much of
                        # the difference is the loop (caching) and how much the process settings
                        ("diffusers_ts_process", {"kind": "diffusers", "mixed_precision": "no", "process": "tunesmith"})]
    if args.runs:
        runs_wanted = [(n, e) for n, e in runs_wanted if n in args.runs.split(",")]
    log(f"LoRA job: {args.steps} steps x {args.batch} images on {args.device}, taking turns")
    runs: dict[str, dict] = {}
    for name, extra in runs_wanted:
        spec = {**common, **extra, "label": name, "out": str(work / "runs" / name),
                **({"threads": args.threads} if args.threads and extra["kind"] == "tunesmith" else {})}
        shutil.rmtree(spec["out"], ignore_errors=True)
        runs[name] = (baseline(spec, log) if extra["kind"] == "diffusers" else
                      run_worker("t2i_workers.py", spec, name, log))
    scores = run_worker("t2i_workers.py", {"kind": "score", "model": str(model), "valid": str(valid),
                                           "device": args.device,
                                           "adapters": {n: r["adapter"] for n, r in runs.items()}}, "score", log)
    for name, r in runs.items():
        r["val_loss"] = scores["val_loss"][name]
    summary = summarise(runs, scores["val_loss"]["base"], dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine(), "targets": TARGETS, "summary": summary,
                               "runs": runs, "base_val_loss": scores["val_loss"]["base"]}, indent=2))
    print_summary(summary, runs, scores["val_loss"]["base"], cuda)
    log(f"\nwrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def ratio(a: dict, b: dict) -> dict:
    """tunesmith run ``a`` against baseline run ``b``: speed and memory as ratios, the validation loss as a relative
    difference; and whether each meets TARGETS."""
    r = {"speed_ratio": a["images_per_s"] / b["images_per_s"],
         "speed_ratio_cpu": a["images_per_cpu_s"] / b["images_per_cpu_s"],
         "memory_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
         "val_loss_rel_diff": (a["val_loss"] - b["val_loss"]) / b["val_loss"]}
    if "peak_gpu_mb" in a and "peak_gpu_mb" in b:
        r["gpu_memory_ratio"] = a["peak_gpu_mb"] / b["peak_gpu_mb"]
    memory = r.get("gpu_memory_ratio", r["memory_ratio"])
    r["meets"] = {"speed": r["speed_ratio"] >= TARGETS["speed"], "memory": memory <= TARGETS["memory"],
                  "val_loss": abs(r["val_loss_rel_diff"]) <= TARGETS["val_loss_rel"]}
    return r


def summarise(runs: dict, base_loss: float, dtype: str) -> dict:
    s = {}
    if "tunesmith" in runs and "diffusers" in runs:
        s[f"same_precision_{dtype}"] = ratio(runs["tunesmith"], runs["diffusers"])
    if "tunesmith_auto" in runs and "diffusers" in runs:  # each as its users start it
        s["defaults"] = ratio(runs["tunesmith_auto"], runs["diffusers"])
    if "tunesmith_auto" in runs and "diffusers_bf16" in runs:
        s["auto_vs_diffusers_bf16"] = ratio(runs["tunesmith_auto"], runs["diffusers_bf16"])
    if "tunesmith" in runs and "diffusers_ts_process" in runs:  # both fp32, both in tunesmith's process settings: the loop alone
        s["loop_only_fp32"] = ratio(runs["tunesmith"], runs["diffusers_ts_process"])
    s["val_loss_drop_from_base"] = {n: (base_loss - r["val_loss"]) / base_loss for n, r in runs.items()}
    return s


def print_summary(s: dict, runs: dict, base_loss: float, cuda: bool) -> None:
    mem = "peak GPU MiB" if cuda else "peak RSS MiB"
    print(f"\n{'run':18s} {'precision':12s} {'images/s':>9s} {'img/CPU-s':>9s} {mem:>13s} {'wall s':>7s} "
          f"{'val loss':>9s}")
    for name, r in runs.items():
        precision = r.get("precision") or r.get("mixed_precision") or r.get("dtype")
        print(f"{name:18s} {str(precision):12s} {r['images_per_s']:9.2f} {r['images_per_cpu_s']:9.2f} "
              f"{r.get('peak_gpu_mb', r['peak_rss_mb']):13.0f} {r['wall_s']:7.0f} {r['val_loss']:9.5f}")
    print(f"{'base (untrained)':18s} {'':12s} {'':9s} {'':9s} {'':13s} {'':7s} {base_loss:9.5f}")
    for key, r in s.items():
        if "meets" not in r:
            continue
        gpu = f", GPU memory {r['gpu_memory_ratio']:.2f}x" if "gpu_memory_ratio" in r else ""
        print(f"{key}: speed {r['speed_ratio']:.2f}x (per CPU second {r['speed_ratio_cpu']:.2f}x), peak RSS "
              f"{r['memory_ratio']:.2f}x{gpu}, val loss {100 * r['val_loss_rel_diff']:+.2f}%  "
              f"(targets >= {TARGETS['speed']}x, <= {TARGETS['memory']}x, within {100 * TARGETS['val_loss_rel']:.0f}%: "
              f"{', '.join(k for k, ok in r['meets'].items() if ok) or 'none'} met)")


if __name__ == "__main__":
    sys.exit(main())
