"""One measured run of bench_t2i_lora.py, in its own process so that its peak memory is its own; and what both tools
share: the random Stable Diffusion 1.x-class pipeline, the captioned image folder, and the validation loss that scores
each tool's final LoRA file.

    python bench/t2i_workers.py '{"kind": "tunesmith", "model": ..., "train": ..., "valid": ..., ...}'
    python bench/t2i_workers.py '{"kind": "score", "model": ..., "valid": ..., "adapters": {"name": folder}}'

Prints one line ``RESULT {json}`` at the end. The diffusers baseline is its own script (t2i_lora_baseline.py); it
imports nothing from here but ``peak_memory`` and ``StepClock``.
"""

from __future__ import annotations

import json
import os
import resource
import string
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import choose_allocator, cpu_s  # noqa: E402  (torch-free; bench/ is sys.path[0])

if __name__ == "__main__":
    choose_allocator(json.loads(sys.argv[1]))

import torch  # noqa: E402

# ---------------------------------------------------------------- the model: Stable Diffusion 1.x's classes and layout

# SD 1.x's structure (stable-diffusion-v1-5's configs: 4 UNet levels, cross-attention in the first three, 2 layers a
# block, 8 heads; a 4-level VAE, 8x down to 4 latent channels; a CLIP text encoder whose width is the cross-attention
# width), at widths chosen per device. "cpu": finishes the default job in a few minutes on 2 cores; "gpu": the real
# SD 1.5 widths (860M-parameter UNet) at 512 px.
SIZES = {
    "cpu": {"unet": (64, 128, 256, 256), "vae": (32, 64, 128, 128), "text": (128, 4, 512), "resolution": 128},
    "gpu": {"unet": (320, 640, 1280, 1280), "vae": (128, 256, 512, 512), "text": (768, 12, 3072), "resolution": 512},
    "smoke": {"unet": (32, 32, 64, 64), "vae": (32, 32, 32, 32), "text": (32, 1, 64), "resolution": 32},
}


def clip_tokenizer(folder: Path, words):
    """A CLIPTokenizer (byte-pair merges) whose whole words are ``words``, anything else spelled letter by letter."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + "-',.")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            if cur not in vocab:
                vocab.append(cur)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_pipeline(folder: Path, size: str = "cpu", seed: int = 0) -> Path:
    """A seeded random StableDiffusionPipeline of SD 1.x's classes and layout at the widths of SIZES[size], saved as a
    diffusers folder (kept when it is already there)."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tunesmith.images import synth

    s = SIZES[size]
    torch.manual_seed(seed)
    tok = clip_tokenizer(folder.parent / f"{folder.name}-tokenizer-src", synth.VOCABULARY)
    width, layers, ffn = s["text"]
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=ffn,
                                        num_hidden_layers=layers, num_attention_heads=max(2, width // 64),
                                        max_position_embeddings=77, projection_dim=width, hidden_act="quick_gelu",
                                        pad_token_id=1, bos_token_id=0, eos_token_id=1))
    groups = 32 if min(s["unet"] + s["vae"]) >= 32 else 8
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae"],
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=groups, sample_size=s["resolution"],
                        scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=s["resolution"] // 8, in_channels=4, out_channels=4, block_out_channels=s["unet"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=width, norm_num_groups=groups)
    # stable-diffusion-v1-5's scheduler (PNDM for sampling); training noise is DDPM's from the same config
    sched = PNDMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    assert DDPMScheduler.from_config(sched.config).config.prediction_type == "epsilon"
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder, safe_serialization=True)
    return folder


def write_images(folder: Path, n: int, seed: int, resolution: int) -> Path:
    """``n`` captioned images of tunesmith's synthetic world (coloured shapes), drawn at ``resolution``, as a Hugging
    Face imagefolder: NNNN.png and metadata.jsonl (file_name, text), which both tools read as they are."""
    if (folder / "metadata.jsonl").is_file():
        return folder
    from tunesmith.images import synth

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, scene in enumerate(synth.sample_scenes(n, seed)):
            synth.render(scene, resolution).save(folder / f"{i:04d}.png")
            meta.write(json.dumps({"file_name": f"{i:04d}.png", "text": scene.caption()}) + "\n")
    return folder


# ---------------------------------------------------------------- measuring


def peak_memory(cuda: bool) -> dict:
    """The process's resident-memory high-water mark (MiB), and on a GPU the most GPU memory it allocated."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


class StepClock:
    """Wall and CPU time at the end of each optimizer step; ``stats(images_per_step)`` is images/s over the steps
    after the first (the first holds one-time warm-up), per wall and per CPU second (this machine is shared)."""

    def __init__(self, cuda: bool = False):
        self.cuda, self.wall, self.cpu, self.usage = cuda, [], [], []

    def mark(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(cpu_s())
        self.usage.append(resource.getrusage(resource.RUSAGE_SELF))

    def __call__(self, event):  # as a tunesmith event sink
        if type(event).__name__ == "StepEnd":
            self.mark()

    def close(self):
        pass

    def stats(self, images_per_step: int) -> dict:
        n = len(self.wall) - 1
        secs, cpu = self.wall[-1] - self.wall[0], self.cpu[-1] - self.cpu[0]
        first, last = self.usage[0], self.usage[-1]
        return {"steps_timed": n, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                "images_per_s": n * images_per_step / secs, "images_per_cpu_s": n * images_per_step / cpu,
                "step_s": [round(b - a, 3) for a, b in zip(self.wall, self.wall[1:])],
                # where the CPU time went: the kernel's share (page faults of fresh memory among it) and the faults
                "system_cpu_seconds": round(last.ru_stime - first.ru_stime, 2),
                "minor_faults_per_step": (last.ru_minflt - first.ru_minflt) / n}


@torch.no_grad()
def validation_loss(pipe, folder: Path, timesteps: int = 4, seed: int = 1234, batch: int = 8) -> float:
    """The plain epsilon-prediction MSE (the example's loss with snr_gamma None) of ``pipe``'s UNet on the captioned
    images of ``folder``, each at ``timesteps`` evenly spaced timesteps with fixed noise and a fixed VAE sample: the
    same function, the same draws, for every tool's final weights."""
    import numpy as np
    from diffusers import DDPMScheduler
    from PIL import Image

    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for s in range(0, len(rows), batch):
        part = rows[s:s + batch]
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / r["file_name"]).convert("RGB"),
                                                          dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                              for r in part]).to(device, pipe.vae.dtype)
        dist = pipe.vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([r["text"] for r in part], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        embeds = pipe.text_encoder(ids)[0]
        for k in range(timesteps):
            t = torch.full((len(part),), int((k + 0.5) * sched.config.num_train_timesteps / timesteps),
                           dtype=torch.long, device=device)
            noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
            pred = pipe.unet(sched.add_noise(latents, noise, t).to(dtype), t, embeds.to(dtype)).sample
            total += float(((pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3)).sum())
            count += len(part)
    return total / count


def run_score(spec: dict) -> dict:
    """The validation loss of the base pipeline and of each LoRA folder loaded onto it (diffusers' load_lora_weights,
    as a user of either tool loads the file), in fp32 on the spec's device."""
    from diffusers import StableDiffusionPipeline

    device = spec.get("device", "cpu")
    scores = {}
    for name, adapter in {"base": None, **spec["adapters"]}.items():
        pipe = StableDiffusionPipeline.from_pretrained(spec["model"], torch_dtype=torch.float32).to(device)
        pipe.set_progress_bar_config(disable=True)
        if adapter is not None:
            pipe.load_lora_weights(adapter)
        scores[name] = validation_loss(pipe, Path(spec["valid"]), spec.get("timesteps", 4))
    return {"val_loss": scores}


# ---------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict) -> dict:
    """tunesmith.train.train on the job the baseline runs (bench_t2i_lora.py: JOB), its precision as given (auto: what
    tunesmith picks on this machine). Caption embeddings and image latents go to a fresh cache, so computing them is
    in the run's wall time."""
    from tunesmith.config import load_config
    from tunesmith.train import train

    out = Path(spec["out"])
    os.environ["TUNESMITH_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-t2i-cache-")
    steps = spec["steps"]
    targets = json.dumps(spec["lora_targets"])
    cfg = load_config(None, [
        f"model.name={spec['model']}", f"model.dtype={spec.get('dtype', 'float32')}", "objective.name=denoise",
        f"data.train={spec['train']}", f"data.valid={spec['valid']}", f"output_dir={out}", "data.shuffle=true",
        "method.name=lora", f"method.lora.r={spec['rank']}", f"method.lora.alpha={spec['rank']}",
        "method.lora.dropout=0.0", f"method.lora.target_modules={targets}",
        f"train.max_steps={steps}", f"train.batch_size={spec['batch']}", "train.grad_accum=1",
        f"train.lr={spec['lr']}", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0.01",
        "train.max_grad_norm=1.0", f"train.seed={spec['seed']}",
        "objective.denoise.snr_gamma=null", "objective.denoise.caption_dropout=0.0",
        "objective.denoise.random_crop=false", "objective.denoise.random_flip=false",
        # one evaluation, after the last step (outside the timed steps): one image, one sampler step
        f"eval.every_steps={steps}", "eval.samples=1", "objective.denoise.images_per_prompt=1",
        "objective.denoise.inference_steps=1", "eval.compare_base=false", f"checkpoint.every_steps={steps}"])
    clock = StepClock(spec.get("device") == "cuda")
    t0 = time.perf_counter()
    train(cfg, quiet=True, overwrite=True, sinks=[clock])
    wall = time.perf_counter() - t0
    memory = peak_memory(spec.get("device") == "cuda")
    trains = [json.loads(line) for line in open(out / "metrics.jsonl")]
    losses = [e["loss"] for e in trains if e["kind"] == "train"]
    from tunesmith.models.resolver import run_output

    return {**memory, "wall_s": wall, "train_losses": losses, "adapter": str(run_output(out)),
            "precision": _precision(out), **clock.stats(spec["batch"])}


def _precision(out: Path) -> str | None:
    try:
        precision = json.loads((out / "run.json").read_text()).get("precision")
        return precision.get("name") if isinstance(precision, dict) else precision
    except (OSError, ValueError):
        return None


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = {"tunesmith": run_tunesmith, "score": run_score}[spec["kind"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    from tunesmith import allocator

    result["allocator"] = allocator.describe()
    print("RESULT " + json.dumps({**spec, **result}), flush=True)


if __name__ == "__main__":
    main()
