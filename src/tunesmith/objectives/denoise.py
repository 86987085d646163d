"""Text-to-image fine-tuning (objective denoise): captioned images, the diffusion loss, images drawn at evaluation.

Each training image is noised to a random timestep of the pipeline's schedule and the denoiser predicts what the
scheduler's ``prediction_type`` names: the noise (epsilon), the velocity (v_prediction) or the clean input (sample);
the loss is the squared error per image, with min-SNR-gamma weights (Hang et al. 2023) by default, summed and divided by
the step's images in the loop (so accumulation equals one large batch). A flow-matching model (SD3, Flux) is trained
as diffusers' ``train_dreambooth_lora_sd3.py`` does it (rectified flow, Esser et al. 2024): the timestep drawn from
the density ``weighting_scheme`` names (logit-normal by default), x_t = (1 - sigma) x0 + sigma noise with sigma from
the scheduler, the target noise - x0, the loss weighted by compute_loss_weighting_for_sd3. For a latent model (a VAE
in the pipeline) the input is the VAE's latent sample, for a pixel model (the built-in one) the pixels in [-1, 1].

Every random draw of an image at a step (crop, flip, caption dropout, timestep, noise, the VAE's sample) comes from a
generator of its own seeded by (run seed, step, image): the same on any process and batch size, and again after a
resume, so a resumed run is bit-exact and several processes train as one. Validation images are scored at
``eval_timesteps`` fixed, evenly spaced timesteps with fixed noise, so validation losses compare across evaluations.

With the text encoder frozen (the default) each caption's embedding is computed once, before training, and kept on
disk under the cache folder keyed by the encoder's weights and the caption; with ``train_text_encoder`` captions are
encoded in each forward pass.

Each evaluation also draws a grid of images with fixed seeds for the validation prompts (and control prompts: what the
base model already drew), saved to samples/ and shown in report.html, and where the captions are the built-in model's
the detector reads them back (``caption_accuracy``, ``control_accuracy``). At the end compare.json holds base versus
tuned on held-out captions: the detector's accuracy with a paired bootstrap CI, and both grids.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..events import Message
from . import Evaluation, stream_seed

CACHE_FOLDER = "caption-embeddings"
LATENT_FOLDER = "image-latents"
CONTROL_PROMPTS = 8  # control prompts drawn for the built-in model by default


@dataclass(frozen=True)
class ImageItem:
    """A captioned image of a split; ``step``: the training step whose random draws it carries (None: not drawn yet;
    -1: validation, scored at fixed timestep number ``slot``); ``prior``: DreamBooth's class image trained beside it
    (its index in ``Denoise.class_records``), None without prior preservation."""

    record: object  # data.ImageRecord
    key: int  # its place in its split
    step: int | None = None
    slot: int = 0
    prior: int | None = None


@dataclass
class Denoise:
    settings: object  # config.DenoiseConfig
    name: str = "denoise"
    unit: str = "images"
    model_kind: str = "text-to-image pipeline"
    figures: tuple[str, ...] = ("mse", "caption_accuracy", "control_accuracy", "concept_rate", "class_accuracy")
    # set by load / prepare
    resolution: int = 0
    seed: int = 0
    splits: object = None
    out: Path | None = None
    num_timesteps: int = 1000
    latent_shape: tuple[int, int, int] = (3, 32, 32)
    latent: bool = False
    flow: bool = False  # flow matching (SD3, Flux) instead of a DDPM-family noise schedule
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # caption -> embeds (L, D), pooled
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # image hash -> VAE mean, std
    pixels: dict[str, tuple] = field(default_factory=dict)  # image key -> ((3, H, W), crop): centre crop, no flip
    class_records: list = field(default_factory=list)  # DreamBooth's class images (prior preservation)
    bucket_sizes: list = field(default_factory=list)  # aspect-ratio buckets (height, width); empty: square images
    bucket_of: dict[str, int] = field(default_factory=dict)  # training or validation image -> its bucket
    batch_size: int = 1  # train.batch_size: the micro-batch a bucket group fills
    tokenize: object = None
    model: object = None  # the DiffusionModel (unwrapped): its pipeline draws the evaluation images
    steps_done: int = 0
    eval_samples: int = 3

    # ---------------------------------------------------------------- data

    def load(self, cfg, emit):
        """The captioned images of data.train / data.valid, every image decoded and checked before a model loads."""
        from ..data import images

        self.resolution = self.settings.resolution or pipeline_resolution(cfg.model.name)
        self.seed, self.out, self.eval_samples = cfg.train.seed, Path(cfg.output_dir), cfg.eval.samples
        # with buckets an image is checked against its bucket (below), not the square
        self.splits = images.load_image_splits(cfg.data, cfg.train.seed,
                                               None if self.settings.buckets else self.resolution,
                                               modes=self.settings.image_modes,
                                               caption=self.settings.dreambooth.instance_prompt)
        if self.settings.buckets:
            self._assign_buckets(cfg, emit)
        for w in self.splits.warnings:
            emit(Message("warning", w.format()))
        return self.splits

    def _assign_buckets(self, cfg, emit) -> None:
        """Each image's aspect-ratio bucket (data/buckets.py), from the sizes read at the checks; E040 for an image
        smaller than its bucket."""
        from collections import Counter

        from ..data.buckets import make_buckets, nearest_bucket, size_issues
        from ..data.errors import DataError

        s = self.settings
        step = s.bucket_step or pipeline_downscale(cfg.model.name)
        self.bucket_sizes = make_buckets(self.resolution, step, s.bucket_max_aspect)
        issues = size_issues(self.splits.train + self.splits.valid, self.bucket_sizes)
        if issues:
            raise DataError(issues)
        self.bucket_of = {_record_id(r): nearest_bucket(r.size, self.bucket_sizes)
                          for r in self.splits.train + self.splits.valid}
        self.batch_size = cfg.train.batch_size
        used = Counter(self.bucket_of[_record_id(r)] for r in self.splits.train)
        emit(Message("info", f"denoise: aspect-ratio buckets of about {self.resolution}x{self.resolution} pixels, sides "
                             f"multiples of {step}: " + ", ".join(f"{self.bucket_sizes[b][1]}x{self.bucket_sizes[b][0]} "
                                                                  f"({n})" for b, n in sorted(used.items())) +
                             " (width x height: training images in each)"))

    def target(self, item: ImageItem) -> tuple[int, int]:
        """(height, width) an item's images are trained and scored at: its image's bucket, else the square."""
        if self.bucket_sizes and _record_id(item.record) in self.bucket_of:
            return self.bucket_sizes[self.bucket_of[_record_id(item.record)]]
        return self.resolution, self.resolution

    def epoch_order(self, items: Sequence[ImageItem], seed: int, epoch: int, shuffle: bool) -> list[int] | None:
        """With buckets, the epoch's order in whole micro-batches of one bucket each (data/buckets.py); else None
        (the loop's own order)."""
        if not self.bucket_sizes:
            return None
        from ..data.buckets import bucket_order

        return bucket_order([self.bucket_of[_record_id(it.record)] for it in items], self.batch_size, seed, epoch,
                            shuffle)

    def eval_chunks(self, items: Sequence[ImageItem], batch_size: int) -> list[list[int]] | None:
        """With buckets, validation batches of one bucket each (in bucket order); else None (the loop's own)."""
        if not self.bucket_sizes:
            return None
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(self.bucket_of[_record_id(it.record)], []).append(i)
        return [g[k:k + batch_size] for b in sorted(groups) for g in (groups[b],) for k in range(0, len(g), batch_size)]

    def epoch_examples(self, items: Sequence[ImageItem]) -> int:
        """Examples an epoch trains on: with buckets each bucket rounds up to whole micro-batches."""
        if not self.bucket_sizes:
            return len(items)
        from ..data.buckets import epoch_examples

        return epoch_examples([self.bucket_of[_record_id(it.record)] for it in items], self.batch_size)

    def write_preflight(self, out, cfg, tokenizer, emit) -> None:
        from ..data import images
        from ..report import PREFLIGHT

        summary = images.summarize_images(self.splits).to_dict() | {"objective": "denoise",
                                                                    "resolution": self.resolution}
        (Path(out) / PREFLIGHT).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")

    def render(self, records: Sequence, tokenizer, cfg, emit, split: str, quiet: bool = False) -> list[ImageItem]:
        if split == "valid":  # each validation image once per fixed timestep
            return [ImageItem(r, i, -1, j) for i, r in enumerate(records) for j in range(self.settings.eval_timesteps)]
        if self.settings.dreambooth.with_prior and records:  # diffusers' pairs: (subject i mod n, class i mod m)
            from .dreambooth import pair_count

            m = self.settings.dreambooth.num_class_images
            return [ImageItem(records[i % len(records)], i, prior=i % m) for i in range(pair_count(len(records),
                                                                                                    self.settings))]
        return [ImageItem(r, i) for i, r in enumerate(records)]

    def references(self, records: Sequence) -> list:
        return []  # no text answers: each evaluation draws images instead

    # ---------------------------------------------------------------- before training

    def prepare(self, model, items: dict[str, list], tokenizer, cfg, model_path, accelerator, compute, emit,
                precision: str) -> dict[str, list]:
        """Read the model's shapes, and embed every caption once when the text encoder is frozen."""
        net = accelerator.unwrap_model(model)
        self.model, self.tokenize = net, net.tokenize
        self.num_timesteps = int(net.noise_scheduler.config.num_train_timesteps)
        self.latent, self.flow = net.latent, net.family.flow
        side = self.resolution // net.vae_scale
        channels = net.vae.config.latent_channels if net.vae is not None else net.denoiser.config.in_channels
        self.latent_shape = (channels, side, side)
        if self.settings.dreambooth.with_prior:  # drawn once by the base model (the main process), then read back
            from .dreambooth import class_images

            from ..models.diffusion import has_lora

            # before the first step a fully trained model is still the base; a LoRA one draws with its adapters off
            with accelerator.main_process_first(), (base_pipeline(net, model_path) if has_lora(net)
                                                     else nullcontext(net.pipeline)) as pipe:
                self.class_records = class_images(net, pipe, self.settings, emit)
        if not self.settings.train_text_encoder:
            captions = sorted({r.caption for split in (self.splits.train, self.splits.valid, self.class_records)
                               for r in split} | {""} | set(self.settings.validation_prompts))
            self.embeddings = embed_captions(net, captions, accelerator.device, emit)
        if self.latent and not (self.settings.random_crop or self.settings.random_flip):
            # each image is the same tensor at every step: its latent distribution once, cached on disk
            wanted = [(r, self.target(ImageItem(r, 0, -1))) for r in self.splits.valid] + [
                (r, self.target(ImageItem(it.record, 0, 0))) for it in items["train"]
                for r in ([it.record] + ([self.class_records[it.prior]] if it.prior is not None else []))]
            self.latents = encode_latents(net, wanted, self.resolution, accelerator.device, emit)
        s = self.settings
        loss = (f"flow matching (velocity noise - x0), weighting_scheme {s.weighting_scheme}" if self.flow else
                f"prediction {net.noise_scheduler.config.prediction_type}, min-SNR-gamma {s.snr_gamma}")
        emit(Message("info", f"denoise: {len(self.splits.train)} training images at {self.resolution}x"
                             f"{self.resolution}, {net.family.name} family, {'latent' if self.latent else 'pixel'} "
                             f"space, {loss}, caption dropout "
                             f"{self.settings.caption_dropout:g}, text encoder "
                             f"{'trained' if self.settings.train_text_encoder else 'frozen (captions embedded once)'}"))
        db = self.settings.dreambooth
        if db.instance_prompt is not None:
            emit(Message("info", f"dreambooth: instance prompt {db.instance_prompt!r}; " + (
                f"prior preservation on {len(self.class_records)} class images of {db.class_prompt!r}, prior loss "
                f"weight {db.prior_loss_weight:g}, {len(items['train'])} (subject, class) pairs an epoch"
                if db.with_prior else "no prior preservation")))
        return items

    def prepare_step(self, model, items: list, indices: list[int], tokenizer, compute, step: int, accelerator) -> list:
        """The step's images, marked with the step whose random draws they carry (collate draws them)."""
        self.steps_done = step + 1
        out = list(items)
        for i in indices:
            out[i] = replace(items[i], step=step)
        if not indices and items:  # a process with no image in a short last step: its pass with no loss
            out[0] = replace(items[0], step=step)
        return out

    # ---------------------------------------------------------------- the loss

    def weight(self, item) -> int:
        return 1

    def length(self, item) -> int:
        return 1

    def trained_tokens(self, item) -> int:
        return 0

    def collate(self, items: Sequence[ImageItem], tokenizer, layout: str) -> dict[str, torch.Tensor]:
        """Pixels, noise, timesteps and caption embeddings (or ids) of the images, each drawn from its own stream.

        With DreamBooth's prior preservation the items' class images follow the subject images (2B images for B
        pairs, as diffusers' collate_fn): ``weight`` is 1 for a subject image and prior_loss_weight for a class image,
        ``prior`` marks the class images."""
        s = self.settings
        drawn = [self._draw(it.record, it.step, it.key, it.slot, self.target(it)) for it in items]
        pairs = [it for it in items if it.prior is not None and it.step is not None and it.step >= 0]
        # a class image is cut to its subject image's bucket, so the pair shares one tensor shape
        drawn += [self._draw(self.class_records[it.prior], it.step, it.key, 1, self.target(it)) for it in pairs]
        pixels, noise, eps, timesteps, captions, records, crops = zip(*drawn)
        width = [self.target(it)[1] for it in items] + [self.target(it)[1] for it in pairs]
        prior = torch.tensor([0.0] * len(items) + [1.0] * len(pairs))
        batch = {"noise": torch.stack(noise), "timesteps": torch.tensor(timesteps, dtype=torch.long),
                 "weight": 1.0 + prior * (s.dreambooth.prior_loss_weight - 1.0), "live": torch.ones(())}
        if pairs:
            batch["prior"] = prior
        # SDXL's micro-conditioning (what the model families read): (height, width) before resizing, (top, left)
        batch["original_size"] = torch.tensor([c.original for c in crops], dtype=torch.long)  # (B, 2)
        batch["crop_top_left"] = torch.tensor([c.top_left(w) for c, w in zip(crops, width)], dtype=torch.long)
        if self.latents:  # the cached latent distribution of each image
            key = [_image_key(r, (n.shape[-2] * self._factor(), n.shape[-1] * self._factor()))
                   for r, n in zip(records, noise)]
            batch["latent_mean"] = torch.stack([self.latents[k][0] for k in key])
            batch["latent_std"] = torch.stack([self.latents[k][1] for k in key])
        else:
            batch["pixels"] = torch.stack(pixels)
        if self.latent:
            batch["vae_eps"] = torch.stack(eps)
        if self.embeddings:
            for k in self.embeddings[captions[0]]:
                batch[k] = torch.stack([self.embeddings[c][k] for c in captions])
        else:
            batch |= self.tokenize(list(captions))
        return batch

    def _draw_timestep(self, g: torch.Generator) -> int:
        """A training timestep's index into the schedule: uniform for a DDPM-family schedule; for flow matching
        drawn from the density ``weighting_scheme`` names (diffusers' compute_density_for_timestep_sampling, as its
        SD3 scripts: logit-normal by default)."""
        if not self.flow:
            return int(torch.randint(0, self.num_timesteps, (1,), generator=g))
        from diffusers.training_utils import compute_density_for_timestep_sampling

        s = self.settings
        u = compute_density_for_timestep_sampling(s.weighting_scheme, 1, logit_mean=s.logit_mean,
                                                  logit_std=s.logit_std, mode_scale=s.mode_scale, generator=g)
        return min(int(u[0] * self.num_timesteps), self.num_timesteps - 1)

    def _factor(self) -> int:
        """Pixels per latent cell (the VAE's downscaling; 1 for a pixel model)."""
        return max(1, self.resolution // self.latent_shape[-1])

    def _draw(self, record, step: int | None, key: int, slot: int, target: tuple[int, int]) -> tuple:
        """(pixels or None, noise, VAE eps or None, timestep, caption, record, crop) of one image at ``target``
        (height, width): at a training step from the stream (run seed, step, key, slot), in validation at fixed
        timestep number ``slot``."""
        from ..data.buckets import cover_crop

        s = self.settings
        training = step is not None and step >= 0
        g = torch.Generator().manual_seed(stream_seed(self.seed, -1 if step is None else step, key, slot))
        if self.latents:  # cached: the centre crop, kept
            pixels, crop = None, cover_crop(record.size, target)
        else:
            pixels, crop = self._pixels(record, g if training else None, target)
        if training:
            timestep = self._draw_timestep(g)
            dropped = s.caption_dropout and float(torch.rand((1,), generator=g)) < s.caption_dropout
        else:  # validation: evenly spaced fixed timesteps (flow matching: evenly spaced points of its schedule)
            timestep = int((slot + 0.5) * self.num_timesteps / s.eval_timesteps)
            dropped = False
        f = self._factor()
        shape = (self.latent_shape[0], target[0] // f, target[1] // f)
        noise = torch.randn(shape, generator=g)
        eps = torch.randn(shape, generator=g) if self.latent else None  # the VAE's sample: mean + std * eps
        return pixels, noise, eps, timestep, "" if dropped else record.caption, record, crop

    def _pixels(self, record, g: torch.Generator | None, target: tuple[int, int]):
        """((3, H, W) in [-1, 1], its crop) at ``target``: the training augmentation drawn from ``g``; without it the
        centre crop, kept."""
        from ..data.images import image_crop

        s = self.settings
        if g is not None and (s.random_crop or s.random_flip):
            return image_crop(record, target, center_crop=not s.random_crop, flip=s.random_flip, rng=g)
        key = _image_key(record, target)
        if key not in self.pixels:
            self.pixels[key] = image_crop(record, target)
        return self.pixels[key]

    def no_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch, weight=torch.zeros_like(batch["weight"]), live=torch.zeros_like(batch["live"]))
        if "prior" in batch:
            out["prior"] = torch.zeros_like(batch["prior"])
        return out

    def loss(self, model, batch: dict[str, torch.Tensor], compute) -> tuple[torch.Tensor, dict[str, float]]:
        net = getattr(model, "module", model)  # a DDP wrapper's model: its scheduler and VAE
        sched = net.noise_scheduler
        if "latent_mean" in batch:  # cached
            x0 = scaled_latents(net.vae, batch["latent_mean"], batch["latent_std"], batch["vae_eps"])
        elif net.vae is not None:
            with torch.no_grad():
                dist = net.vae.encode(batch["pixels"].to(net.vae.dtype)).latent_dist
                x0 = scaled_latents(net.vae, dist.mean.float(), dist.std.float(), batch["vae_eps"])
        else:
            x0 = batch["pixels"]
        noise, t = batch["noise"].to(x0.dtype), batch["timesteps"]
        if net.family.flow:  # x_t = (1 - sigma) x0 + sigma noise; the velocity noise - x0 (diffusers' SD3 scripts)
            sigmas = sched.sigmas.to(x0.device)[t].to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
            noisy, target, t = (1.0 - sigmas) * x0 + sigmas * noise, noise - x0, sched.timesteps.to(x0.device)[t]
        else:
            noisy, target = sched.add_noise(x0, noise, t), diffusion_target(sched, x0, noise, t)
        cond = {k: v for k, v in batch.items() if k in ("embeds", "pooled") or k.startswith(("input_ids", "attention"))}
        if net.family.name == "sdxl":  # micro-conditioning: the image's original size and crop where the data says
            scale = net.vae_scale
            cond["time_ids"] = net.time_ids(len(x0), x0.shape[-2] * scale, x0.shape[-1] * scale,
                                            batch.get("original_size"), batch.get("crop_top_left")).to(x0.device)
        with torch.autocast(x0.device.type, dtype=compute.autocast, enabled=compute.autocast is not None):
            pred = model(noisy, t, cond)
        mse = ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))  # (B,)
        weight = batch["weight"]
        # DreamBooth: class images carry weight prior_loss_weight, so summed over a step's B pairs and divided by B
        # the loss is mean instance loss + prior_loss_weight x mean prior loss (diffusers' train_dreambooth.py; its
        # prior term skips min-SNR weighting, here both halves are the same per-image loss, so the weight alone sets
        # their balance)
        if net.family.flow:
            per_image = mse * flow_weights(self.settings.weighting_scheme, sigmas)
        elif self.settings.snr_gamma:
            per_image = mse * min_snr_weights(sched, t, self.settings.snr_gamma)
        else:
            per_image = mse
        loss = (per_image * weight).sum()
        if "prior" not in batch:
            return loss, {"mse": float((mse.detach() * weight).sum())}
        prior = batch["prior"]
        return loss, {"mse": float((mse.detach() * weight * (1 - prior)).sum()),
                      "prior_mse": float((mse.detach() * prior).sum())}

    def per_unit(self, stats: dict[str, float], weight: float) -> dict[str, float]:
        return {k: v / max(1.0, weight) for k, v in stats.items()}

    # ---------------------------------------------------------------- held out

    def evaluate(self, model, batches: list[dict], accelerator, compute) -> Evaluation:
        """The validation loss (every process), and on the main process the evaluation grid, read back."""
        from .preference import held_out

        with torch.no_grad():
            ev = held_out(self, model, batches, accelerator, compute, "weight", ("mse",))
        if accelerator.is_main_process:
            stats, samples = self._draw_grid(compute)
            ev.stats |= stats
            ev.samples = samples
        return ev

    def _prompts(self) -> tuple[list[str], list[str]]:
        """(validation prompts, control prompts) drawn at each evaluation."""
        s = self.settings
        prompts = list(s.validation_prompts) or list(dict.fromkeys(r.caption for r in self.splits.valid))[
            :max(1, self.eval_samples)]
        return prompts, control_prompts(s, prompts)

    def _draw_grid(self, compute) -> tuple[dict[str, float], list[dict]]:
        from ..evaluate.images import caption_accuracy, held_out_concept_rate, save_grid

        prompts, control = self._prompts()
        db = self.settings.dreambooth
        # DreamBooth: the class prompt too, drawn last (the other rows keep their seeds), to watch it drift to the subject
        classes = [db.class_prompt] if db.instance_prompt is not None and db.class_prompt else []
        n = self.settings.images_per_prompt
        everything = prompts + control + classes
        images = self.draw(self.model.pipeline, everything, compute)
        name = f"samples/step-{self.steps_done:06d}.png"
        save_grid(images, self.out / name, columns=n)
        stats = {}
        cut = (len(prompts) + len(control)) * n
        for key, caps, part in (("caption_accuracy", prompts, images[:len(prompts) * n]),
                                ("control_accuracy", control, images[len(prompts) * n:cut]),
                                ("class_accuracy", classes, images[cut:])):
            ok = caption_accuracy(part, [c for c in caps for _ in range(n)]) if caps else None
            if ok is not None:
                stats[key] = float(np.mean(ok))
        drawn = held_out_concept_rate(images[:len(prompts) * n], [c for c in prompts for _ in range(n)])
        if drawn is not None:  # the built-in model learning a concept it never saw: how often it draws it now
            stats["concept_rate"] = drawn[1]
        samples = [{"prompt": p, "image": name, "row": i, "control": i >= len(prompts)}
                   for i, p in enumerate(everything)]
        return stats, samples

    def draw(self, pipe, prompts: list[str], compute) -> np.ndarray:
        """``images_per_prompt`` images per prompt, image j of prompt p from seed (run seed, p, j): the same seeds at
        every evaluation and for base and tuned."""
        from ..evaluate.images import generate_images

        s, n = self.settings, self.settings.images_per_prompt
        seeds = [stream_seed(self.seed, -2, p, j) for p in range(len(prompts)) for j in range(n)]
        with _autocast(compute, pipe):
            return generate_images(pipe, [p for p in prompts for _ in range(n)], seeds, steps=s.inference_steps,
                                   guidance=s.guidance_scale)

    def compare(self, out, model, tokenizer, cfg, splits, model_path, emit, compute) -> dict | None:
        """Base versus tuned on held-out captions (data.test, else the validation split): images from the same
        seeds, the detector's accuracy of each with a paired bootstrap CI where it can judge, both grids saved."""
        from ..data import images as tsimages
        from ..evaluate.images import detector_comparison, detector_lines, save_grid

        records = (tsimages.read_image_rows(cfg.data.test, modes=self.settings.image_modes)[0] if cfg.data.test
                   else splits.valid)
        prompts = list(dict.fromkeys(r.caption for r in records))[:cfg.eval.compare_examples]
        if not prompts:
            emit(Message("warning", "no held-out captions: base-versus-tuned comparison skipped"))
            return None
        control = control_prompts(self.settings, prompts, max(CONTROL_PROMPTS, len(prompts)))
        n = self.settings.images_per_prompt
        tuned = self.draw(model.pipeline, prompts + control, compute)
        with base_pipeline(model, model_path) as base_pipe:
            base = self.draw(base_pipe, prompts + control, compute)
        result = {"images": {"prompts": len(prompts), "images_per_prompt": n, "source": cfg.data.test or
                             "validation split", "base_grid": "compare/base.png", "tuned_grid": "compare/tuned.png"}}
        save_grid(base, Path(out) / "compare" / "base.png", columns=n)
        save_grid(tuned, Path(out) / "compare" / "tuned.png", columns=n)
        figures = detector_comparison(base, tuned, prompts, control, n)  # shared with `tunesmith eval`
        result["images"] |= figures
        for line in detector_lines(figures):
            emit(Message("info", line))
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return result


# ---------------------------------------------------------------- the formulas


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to predict, as the scheduler's prediction_type says (diffusers' training scripts)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"the scheduler's prediction_type {kind!r} is not one tunesmith trains (epsilon, v_prediction, "
                     "sample)")


def flow_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-image loss weights (B,) of flow matching, diffusers' compute_loss_weighting_for_sd3 (SD3 paper, Esser et al.
    2024): 1 for logit_normal, mode and none; sigma^-2 for sigma_sqrt; 2 / (pi (1 - 2 sigma + 2 sigma^2)) for cosmap.
    Constant across an image, so weighting its mean squared error equals diffusers' weighting of each element."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas).float().reshape(len(sigmas), -1)[:, 0]


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per image: min(SNR, gamma) / SNR for epsilon prediction,
    / (SNR + 1) for v-prediction, min(SNR, gamma) for sample prediction; SNR = alpha_bar / (1 - alpha_bar)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


# ---------------------------------------------------------------- helpers


def pipeline_resolution(model_ref: str) -> int:
    """The image side a pipeline folder is made for, from its configs alone (before the model loads)."""
    from .. import models

    path = Path(models.ensure_local(model_ref))
    denoiser = path / "unet" if (path / "unet").is_dir() else path / "transformer"
    size = json.loads((denoiser / "config.json").read_text(encoding="utf-8")).get("sample_size")
    if size is None and (path / "vae" / "config.json").is_file():  # Flux's transformer has none: the VAE's size
        return int(json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))["sample_size"])
    size = size or 64
    size = size[0] if isinstance(size, list) else size
    vae = Path(path) / "vae" / "config.json"
    if vae.is_file():
        size *= 2 ** (len(json.loads(vae.read_text(encoding="utf-8")).get("block_out_channels", [0])) - 1)
    return int(size)


def pipeline_downscale(model_ref: str) -> int:
    """Pixels per cell of the denoiser's coarsest grid, from the pipeline folder's configs (before the model loads):
    the VAE's downscaling (1 without a VAE) times the UNet's (2 per down block after the first). Image sides that are
    multiples of it map onto whole latent and UNet grids."""
    from .. import models

    path = Path(models.ensure_local(model_ref))
    unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    factor = 2 ** (len(unet.get("down_block_types") or [0]) - 1)
    vae = path / "vae" / "config.json"
    if vae.is_file():
        factor *= 2 ** (len(json.loads(vae.read_text(encoding="utf-8")).get("block_out_channels", [0])) - 1)
    return int(factor)


def control_prompts(settings, prompts: Sequence[str], count: int = CONTROL_PROMPTS) -> list[str]:
    """The prompts drawn beside ``prompts`` to show old concepts kept: the settings' control_prompts, else for the
    built-in world the first ``count`` of a fixed list of its in-distribution captions, else none. Evaluations draw
    CONTROL_PROMPTS of them; the base-versus-tuned comparisons as many as held-out prompts (at least that), so the
    old concepts' figure rests on as many images as the new one's."""
    control = list(settings.control_prompts)
    if not control and builtin_world(prompts):
        from ..images import measure

        control = measure.in_distribution_captions(count)
    return control


def builtin_world(captions: Sequence[str]) -> bool:
    """Whether the captions are the built-in model's world (the detector can read its images)."""
    from ..evaluate.images import readable

    return readable(captions)


def embed_captions(net, captions: list[str], device, emit, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Each caption's embedding (``embeds`` (L, D), and ``pooled`` (P,) for SDXL and SD3) under the frozen text
    encoders, from the disk cache where it was computed before (keyed by the encoders' weights, the tokenizers and the
    caption), else computed now and stored."""
    from safetensors.torch import load_file, save_file

    from .. import models

    folder = models.cache_dir() / CACHE_FOLDER / fingerprint(net)
    folder.mkdir(parents=True, exist_ok=True)
    out, todo = {}, []
    for c in captions:
        f = folder / (hashlib.sha256(c.encode("utf-8")).hexdigest()[:32] + ".safetensors")
        if f.is_file():
            t = load_file(f)
            out[c] = {"embeds": t["embedding"]} | ({"pooled": t["pooled"]} if "pooled" in t else {})
        else:
            todo.append(c)
    with torch.no_grad():
        for b in range(0, len(todo), batch_size):
            part = todo[b:b + batch_size]
            encoded = net.encode_text({k: v.to(device) for k, v in net.tokenize(part).items()})
            encoded = {k: v.float().cpu() for k, v in encoded.items()}
            for i, c in enumerate(part):
                out[c] = {k: v[i].contiguous() for k, v in encoded.items()}
                f = folder / (hashlib.sha256(c.encode("utf-8")).hexdigest()[:32] + ".safetensors")
                save_file({"embedding": out[c]["embeds"]} | ({"pooled": out[c]["pooled"]} if "pooled" in out[c]
                                                               else {}), f)
    if todo:
        emit(Message("info", f"denoise: {len(todo)} captions embedded ({len(captions) - len(todo)} from the cache "
                             f"{folder})"))
    return out


def scaled_latents(vae, mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The VAE's latent sample mean + std * eps, shifted and scaled as the pipeline expects (scaling_factor, and
    shift_factor where the VAE has one)."""
    x = mean + std * eps.to(mean.dtype)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        x = x - shift
    return x * vae.config.scaling_factor


def _record_id(record) -> str:
    return record.sha256 or str(record.path)


def _image_key(record, target: int | tuple[int, int]) -> str:
    """An image's cache key at a square side or a (height, width) bucket (a square keeps the older key)."""
    h, w = (target, target) if isinstance(target, int) else target
    return f"{_record_id(record)}-{h}" if h == w else f"{_record_id(record)}-{h}x{w}"


def encode_latents(net, records: Sequence, resolution: int, device, emit,
                   batch_size: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each image's latent distribution (mean, std), centre-cropped at ``resolution`` (or at the (height, width) of an
    aspect-ratio bucket, where ``records`` holds (record, (height, width)) pairs), under the frozen VAE: from the disk
    cache where it was computed before (keyed by the VAE's weights, the image's content hash and the size), else
    computed now and stored."""
    from safetensors.torch import load_file, save_file

    from .. import models
    from ..data.images import image_crop

    folder = models.cache_dir() / LATENT_FOLDER / module_fingerprint(net.vae)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [r if isinstance(r, tuple) else (r, (resolution, resolution)) for r in records]
    out, todo = {}, []
    for key, (r, size) in {_image_key(r, size): (r, size) for r, size in wanted}.items():
        f = folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")
        if f.is_file():
            t = load_file(f)
            out[key] = (t["mean"], t["std"])
        else:
            todo.append((key, r, size, f))
    todo.sort(key=lambda t: t[2])  # one shape per VAE batch
    with torch.no_grad():
        for size in dict.fromkeys(t[2] for t in todo):
            same = [t for t in todo if t[2] == size]
            for b in range(0, len(same), batch_size):
                part = same[b:b + batch_size]
                pixels = torch.stack([image_crop(r, size)[0] for _, r, _, _ in part]).to(device, net.vae.dtype)
                dist = net.vae.encode(pixels).latent_dist
                for (key, _, _, f), mean, std in zip(part, dist.mean.float().cpu(), dist.std.float().cpu()):
                    out[key] = (mean.contiguous(), std.contiguous())
                    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, f)
    if todo:
        emit(Message("info", f"denoise: {len(todo)} images encoded by the VAE ({len(out) - len(todo)} from the cache "
                             f"{folder})"))
    return out


def module_fingerprint(module, *extra: str) -> str:
    """A short hash of a module's weights (and ``extra`` strings): a cache key that changes when they do."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:20]


def fingerprint(net) -> str:
    """The caption cache's key: the text encoders' weights, the tokenizers' vocabularies, the pipeline class (IF
    lower-cases captions) and whether the encoder sees the padding mask."""
    pipe = net.pipeline
    others = [module_fingerprint(m) for n, m in net.text_encoders().items() if n != "text_encoder"]
    vocabs = [json.dumps(sorted(getattr(pipe, t).get_vocab().items())) for t in ("tokenizer_2", "tokenizer_3")
              if getattr(pipe, t, None) is not None]
    return module_fingerprint(net.text_encoder, json.dumps(sorted(net.tokenizer.get_vocab().items())),
                              type(pipe).__name__, f"mask={net.masks_captions}", *others, *vocabs)


@contextmanager
def base_pipeline(model, model_path):
    """The base pipeline for the block: the tuned one with its LoRA adapters off, or the base folder loaded."""
    from ..models.diffusion import has_lora, load_pipeline

    if has_lora(model):
        adapted = [m for m in model.children() if any("lora_" in n for n, _ in m.named_parameters())]
        for m in adapted:
            m.disable_adapters()
        try:
            yield model.pipeline
        finally:
            for m in adapted:
                m.enable_adapters()
        return
    weights = next(model.denoiser.parameters())
    pipe = load_pipeline(model_path, weights.dtype).to(weights.device)
    try:
        yield pipe
    finally:
        del pipe


def _autocast(compute, pipe):
    from ..models.diffusion import pipeline_denoiser

    device = next(pipeline_denoiser(pipe).parameters()).device.type
    return torch.autocast(device, dtype=compute.autocast, enabled=compute.autocast is not None)
