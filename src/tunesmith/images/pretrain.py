"""Pre-train the built-in image model from scratch on the synthetic world; reproduces the shipped weights.

The shipped model's command (also in its model card, src/tunesmith/images/builtin/README.md; about 85 minutes on
2 idle cores):

    python -m tunesmith.images.pretrain --out runs/image-base --seed 0 --steps 7000 --decay-steps 1000 --threads 2 \
        --channels 16,32,64,64,64 --pooled-text --text-lr-scale 0 --text-pretrain-steps 300 --p-position 1 \
        --position-first-steps 600

Every step draws a fresh batch of scenes from the seeded generator (step s uses generator seed (seed, s), so the data
does not depend on where a run was resumed), with the held-out shape and colour never drawn or named. The loss is
the one the scheduler's config calls for (v-prediction here) with min-SNR-5 weighting (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy"); captions are dropped to "" 10% of the time so
classifier-free guidance works. The learning rate is constant after a warm-up, then, with --decay-steps K, linear to
zero over the last K steps; a run stopped at the end of its constant part and resumed with a longer --steps equals
that command from scratch. The shipped weights are the EMA of the training weights.

With --text-pretrain-steps the text encoder is first trained alone to make every caption attribute readable from
its pooled output, and --text-lr-scale 0 then keeps it frozen while the UNet trains (the defaults train both
together). The same seed on the same CPU kernels gives the same weights; other CPUs sum in other orders, so they
give close, not bit-equal, weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from ..objectives.denoise import diffusion_target, min_snr_weights  # fine-tuning's own target and weights
from . import model as M
from . import synth

STATE = "train_state.pt"


def batch(seed: int, step: int, size: int, p_drop: float, p_position: float = 0.5,
          placed_only: bool = False) -> tuple[torch.Tensor, list[str]]:
    """(B, 3, 32, 32) pixels in [-1, 1] and their captions (some dropped to "") for one step, seeded by (seed, step).
    p_position: the share of single-object scenes whose caption states where the object is (synth.sample_scene);
    placed_only: every scene one object at a stated position (the curriculum's first steps, see train)."""
    rng = np.random.default_rng([seed, step])
    scenes = [synth.sample_scene(rng, count=1, position=synth.POSITIONS[rng.integers(len(synth.POSITIONS))])
              if placed_only else synth.sample_scene(rng, p_position=p_position) for _ in range(size)]
    pixels = torch.from_numpy(synth.render_batch(scenes)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    captions = ["" if rng.random() < p_drop else s.caption() for s in scenes]
    return pixels, captions


def diffusion_loss(unet, noise_scheduler, pixels, embeds, noise, timesteps, snr_gamma: float | None) -> torch.Tensor:
    """The training loss for one batch: the target the scheduler's prediction_type names; min-SNR-gamma weights.

    pixels, noise (B, 3, H, W); embeds (B, 77, D); timesteps (B,). A UNet with twice the input channels (IF's learned
    variance) is scored on its first half only, as diffusers' IF fine-tuning examples do."""
    noisy = noise_scheduler.add_noise(pixels, noise, timesteps)
    pred = unet(noisy, timesteps, embeds).sample
    if pred.shape[1] == 2 * pixels.shape[1]:
        pred = pred[:, : pixels.shape[1]]
    target = diffusion_target(noise_scheduler, pixels, noise, timesteps)
    per_example = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma:
        per_example = per_example * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_example.mean()


# What text-encoder pre-training teaches the encoder to say: each attribute a caption states, read linearly from the
# mean of its 77 outputs. Only the pre-training vocabulary: the held-out shape and colour are never named.
ATTRIBUTES = {"shape": synth.TRAIN_SHAPES, "colour": synth.TRAIN_COLOURS, "size": tuple(synth.SIZES),
              "count": tuple(synth.COUNT_WORDS), "background": synth.TRAIN_COLOURS, "position": (None, *synth.POSITIONS)}


def pretrain_text_encoder(text_encoder, tokenizer, seed: int, steps: int, batch_size: int = 64, lr: float = 1e-3,
                          log=lambda m: None) -> float:
    """Teach the text encoder, before any denoising, to make every attribute a caption states readable from the mean
    of its outputs (a linear head per attribute, cross-entropy; the heads are thrown away). Returns the last loss.

    Why (issue 25): Stable Diffusion and IF start from a text encoder trained elsewhere (CLIP, T5) and keep it frozen.
    A random one, frozen or trained with the UNet, left the position words ("on the left") all but invisible in the
    pooled caption the UNet reads: through 600-1,500 steps the model drew objects in the same place whatever the
    caption said, while the same UNet given the position as a class label placed them within 400-900 steps. After
    300 steps of this, frozen, the pooled caption carried the position like the class label did (objects 15.6
    pixels apart left to right at step 600). Captions are drawn like pre-training's, from generator seed
    (seed, 0x7E87, step), apart from the denoising steps' (seed, step)."""
    gen = torch.Generator().manual_seed(seed)
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in ATTRIBUTES.items()})
    with torch.no_grad():
        for head in heads.values():
            head.weight.normal_(0.0, width ** -0.5, generator=gen), head.bias.zero_()
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    text_encoder.train()
    loss = torch.zeros(())
    for step in range(steps):
        rng = np.random.default_rng([seed, 0x7E87, step])
        scenes = [synth.sample_scene(rng) for _ in range(batch_size)]
        pooled = M.encode_captions(tokenizer, text_encoder, [s.caption() for s in scenes]).mean(dim=1)
        loss = sum(torch.nn.functional.cross_entropy(
            heads[k](pooled), torch.tensor([values.index(getattr(s, k)) for s in scenes]))
            for k, values in ATTRIBUTES.items())
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log({"text_step": step + 1, "text_loss": round(loss.item(), 5)})
    return loss.item()


def train(out: Path, seed: int = 0, steps: int = 6000, batch_size: int = 32, lr: float = 1e-3, warmup: int = 200,
          p_drop: float = 0.1, snr_gamma: float = 5.0, ema_decay: float = 0.999, save_every: int = 250,
          threads: int = 1, shape: M.ModelShape = M.ModelShape(), text_lr_scale: float = 1.0,
          text_pretrain_steps: int = 0, p_position: float = 0.5, position_first_steps: int = 0,
          decay_steps: int = 0, log=lambda m: print(m, flush=True)) -> Path:
    """Train (resuming from out/train_state.pt when there), save EMA snapshots to out/step-N every save_every steps
    and the final pipeline to out/pipeline; returns that folder. The text encoder learns at lr * text_lr_scale (0:
    frozen: no gradient, not in the optimizer or the EMA): issue 25 measured the jointly trained encoder pushing the
    position words together (left/right 40x closer over the padding tokens than at initialisation) before the UNet
    could use them. text_pretrain_steps > 0: the encoder is first pre-trained on its own (pretrain_text_encoder).
    position_first_steps: the first steps draw only single objects at stated positions, then the usual mix (issue 25:
    with the usual mix, a sixth of the scenes placed, the UNet had not tied the position words to a place by step
    4,000; with placed scenes first it had by step 600, 15.6 pixels left to right, and kept it after the switch).
    The learning rate warms up over `warmup` steps, stays constant, and with decay_steps > 0 falls linearly to zero
    over the last decay_steps: a run that stopped at the end of its constant part and is resumed with a larger
    --steps and --decay-steps (steps - decay_steps = where it stopped) gives the weights the longer command gives
    from scratch."""
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    pipe = M.build_pipeline(shape, seed=seed)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = M.noise_scheduler(pipe)
    if text_pretrain_steps and not (out / STATE).exists():  # (a resumed run loads the encoder it trained)
        pretrain_text_encoder(text_encoder, tokenizer, seed, text_pretrain_steps, log=log)
    if text_lr_scale == 0:
        text_encoder.requires_grad_(False)
    params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
    groups = [{"params": params}] if text_lr_scale in (0.0, 1.0) else [  # one group: the shipped recipe's state
        {"params": list(unet.parameters())}, {"params": list(text_encoder.parameters()), "lr": lr * text_lr_scale}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup, decay_steps))
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    start, elapsed = 0, 0.0
    if (out / STATE).exists():
        state = torch.load(out / STATE, weights_only=True)  # tensors, numbers and lists only: nothing unpickled
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start, elapsed = state["step"], state["elapsed"]
        log(f"resumed at step {start}")
    unet.train(), text_encoder.train(text_lr_scale != 0)
    recipe = {"seed": seed, "batch_size": batch_size, "lr": lr, "text_lr_scale": text_lr_scale,
              "text_pretrain_steps": text_pretrain_steps, "p_position": p_position,
              "position_first_steps": position_first_steps, "decay_steps": decay_steps,
              "channels": list(shape.channels),
              "pooled_text": shape.pooled_text, "scale_shift": shape.scale_shift, "warmup": warmup,
              "p_drop": p_drop,
              "snr_gamma": snr_gamma, "ema_decay": ema_decay, "threads": threads, "torch": torch.__version__}
    t0 = time.time() - elapsed
    logf = open(out / "log.jsonl", "a")
    for step in range(start, steps):
        pixels, captions = batch(seed, step, batch_size, p_drop, p_position, placed_only=step < position_first_steps)
        noise = torch.randn_like(pixels)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        embeds = M.encode_captions(tokenizer, text_encoder, captions)
        loss = diffusion_loss(unet, noise_scheduler, pixels, embeds, noise, timesteps, snr_gamma)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        ema.step(params)
        if (step + 1) % 25 == 0 or step == start:
            rec = {"step": step + 1, "loss": round(loss.item(), 5), "grad_norm": round(grad_norm.item(), 4),
                   "elapsed_s": round(time.time() - t0, 1)}
            logf.write(json.dumps(rec) + "\n"), logf.flush()
            log(rec)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            _save_state(out, unet, text_encoder, opt, sched, ema, step + 1, time.time() - t0)
            _save_ema(pipe, ema, params, out / f"step-{step + 1}",
                      {**recipe, "steps": step + 1, "train_seconds": round(time.time() - t0)})
    final = out / "pipeline"
    _save_ema(pipe, ema, params, final, {**recipe, "steps": steps, "train_seconds": round(time.time() - t0)})
    return final


def lr_factor(step: int, steps: int, warmup: int, decay_steps: int = 0) -> float:
    """The learning rate of 0-based `step` relative to the peak: linear warm-up, constant, then (decay_steps > 0)
    linear to zero over the last decay_steps (the first of them still at the peak)."""
    factor = min(1.0, (step + 1) / warmup)
    if decay_steps:
        factor = min(factor, (steps - step) / decay_steps)
    return max(0.0, factor)


def _save_state(out, unet, text_encoder, opt, sched, ema, step, elapsed):
    state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "ema": ema.state_dict(), "rng": torch.get_rng_state(), "step": step,
             "elapsed": elapsed}
    torch.save(state, out / (STATE + ".tmp"))
    (out / (STATE + ".tmp")).replace(out / STATE)  # a state file is complete or absent


def _save_ema(pipe, ema, params, folder: Path, recipe: dict):
    """The pipeline with the EMA weights, as safetensors (the training weights are put back afterwards), and
    pretrain.json: how it was made (`--steps` = its step: the same command with it gives the same weights)."""
    ema.store(params)
    ema.copy_to(params)
    pipe.save_pretrained(folder, safe_serialization=True)
    ema.restore(params)
    (folder / "pretrain.json").write_text(json.dumps(recipe, indent=1) + "\n")


def parser() -> argparse.ArgumentParser:
    """The pre-training command line (also read by recipe_flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed when it has a train state)")
    p.add_argument("--seed", type=int, default=0, help="the one seed: weights, scenes, noise")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="images a step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate after warm-up")
    p.add_argument("--save-every", type=int, default=250, help="EMA snapshot (out/step-N) and train state every N steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (the shipped weights: 1; on a shared machine one thread is faster than two, "
                        "and another count sums gradients in another order: close, not bit-equal, weights)")
    p.add_argument("--channels", type=lambda v: tuple(int(c) for c in v.split(",")), default=M.ModelShape().channels,
                   help="UNet block widths, comma-separated, one level per halving of the image (default: the shipped "
                        "16,32,64; issue 25: a 2x2 bottom, 16,32,64,64,64, learned positions from a class label faster)")
    p.add_argument("--pooled-text", action="store_true", help="ModelShape.pooled_text (IF's addition_embed_type=text)")
    p.add_argument("--scale-shift", action="store_true", help="ModelShape.scale_shift (IF's resnet_time_scale_shift)")
    p.add_argument("--text-lr-scale", type=float, default=1.0, help="text encoder lr relative to the UNet's (0: frozen)")
    p.add_argument("--text-pretrain-steps", type=int, default=0,
                   help="pre-train the text encoder on the captions' attributes first, this many steps "
                        "(pretrain_text_encoder; issue 25: 300, then --text-lr-scale 0, placed objects where captions say)")
    p.add_argument("--p-position", type=float, default=0.5,
                   help="share of single-object scenes captioned with their position (default 0.5: a sixth of all)")
    p.add_argument("--position-first-steps", type=int, default=0,
                   help="the first N steps draw only single objects at stated positions (issue 25: 600)")
    p.add_argument("--decay-steps", type=int, default=0,
                   help="the learning rate falls linearly to zero over the last N steps (default 0: constant after "
                        "warm-up)")
    return p


def recipe_flags(recipe: dict) -> str:
    """The command-line flags that reproduce a recipe (pretrain.json): --seed and --steps always, every other flag
    whose value differs from its default. The model card prints the command from it."""
    defaults = vars(parser().parse_args(["--out", "-"]))
    out = []
    for dest, default in defaults.items():
        if dest == "out" or dest not in recipe:
            continue
        value = recipe[dest]
        value = tuple(value) if isinstance(value, list) else value
        if value == default and dest not in ("seed", "steps"):
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(default, bool):
            if value:
                out.append(flag)
        elif isinstance(value, tuple):
            out.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            out.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(out)


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    shape = M.ModelShape(channels=a.channels, pooled_text=a.pooled_text, scale_shift=a.scale_shift)
    final = train(a.out, seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, save_every=a.save_every,
                  threads=a.threads, shape=shape, text_lr_scale=a.text_lr_scale,
                  text_pretrain_steps=a.text_pretrain_steps, p_position=a.p_position,
                  position_first_steps=a.position_first_steps, decay_steps=a.decay_steps)
    print(f"pipeline: {final}", flush=True)


if __name__ == "__main__":
    main()
