"""The baseline of bench_t2i_lora.py: diffusers' text-to-image LoRA training example, its loop and defaults.

Follows huggingface/diffusers examples/text_to_image/train_text_to_image_lora.py at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951 (2026-08-23): the same components and calls in the same order, its defaults
where the bench passes nothing (rank 4 with lora_alpha = rank, gaussian init, on to_k/to_q/to_v/to_out.0 of the UNet;
AdamW betas (0.9, 0.999), weight decay 1e-2, eps 1e-8; the constant schedule; clipping at 1.0; snr_gamma None, so
a plain MSE; no noise offset; epsilon or the scheduler's prediction type; mixed_precision "no"), and no caching: every
step encodes its images with the VAE (a fresh latent sample) and its captions with the text encoder.

What is left out does not run in a step of the example with the bench's settings, or is logging the bench replaces:
pushing to the hub, xformers, 8-bit Adam, resuming, validation images (no --validation_prompt), checkpoints (the
default --checkpointing_steps 500 is past the bench's steps), the tqdm bar and the trackers (tensorboard by
default), whose per-step logging is replaced by the step clock. torchvision's transforms are written out with PIL
and torch (torchvision is not a dependency here): Resize(resolution, lanczos) on the short side, RandomCrop (or
CenterCrop with --center_crop), RandomHorizontalFlip with --random_flip, ToTensor, Normalize([0.5], [0.5]).

    python bench/t2i_lora_baseline.py --pretrained_model_name_or_path PIPE --train_data_dir FOLDER \\
        --resolution 128 --train_batch_size 16 --max_train_steps 20 --learning_rate 1e-4 --seed 42 --output_dir OUT

Prints ``RESULT {json}``: images/s over the steps after the first, peak memory, train losses, the LoRA folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import choose_allocator  # noqa: E402  (torch-free)

if __name__ == "__main__":
    # the system's malloc and OpenMP settings, as diffusers' users run it; BENCH_PROCESS=tunesmith: the allocator and
    # OpenMP wait the tunesmith command sets (bench_t2i_lora.py's extra run that separates the loop from the process)
    choose_allocator({"kind": "tunesmith" if os.environ.get("BENCH_PROCESS") == "tunesmith" else "diffusers"})

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--train_data_dir", required=True)
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--output_dir", default="sd-model-finetuned-lora")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center_crop", action="store_true", default=False)
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_train_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    p.add_argument("--snr_gamma", type=float, default=None)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-08)
    p.add_argument("--max_grad_norm", default=1.0, type=float)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--prediction_type", default=None)
    p.add_argument("--noise_offset", type=float, default=0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--image_interpolation_mode", default="lanczos")
    return p.parse_args(argv)


def train_transforms(args, rng: random.Random):
    """torchvision's Resize + RandomCrop/CenterCrop + optional RandomHorizontalFlip + ToTensor + Normalize([.5], [.5])."""
    from PIL import Image

    resample = getattr(Image.Resampling, args.image_interpolation_mode.upper())

    def apply(image):
        w, h = image.size
        scale = args.resolution / min(w, h)
        if (w, h) != (round(w * scale), round(h * scale)):
            image = image.resize((round(w * scale), round(h * scale)), resample)
        w, h = image.size
        if args.center_crop:
            left, top = (w - args.resolution) // 2, (h - args.resolution) // 2
        else:
            left, top = rng.randint(0, w - args.resolution), rng.randint(0, h - args.resolution)
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        if args.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.5) / 0.5

    return apply


def main(argv=None) -> dict:
    import diffusers
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from datasets import load_dataset
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    from t2i_workers import StepClock, peak_memory

    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=args.output_dir))
    diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    # Load scheduler, tokenizer and models; freeze them.
    path = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    # Mixed precision: the frozen weights (VAE, text encoder, the UNet's base) in half precision.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_layers, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # The dataset: an imagefolder (metadata.jsonl: file_name, text), transformed on the fly.
    dataset = load_dataset("imagefolder", data_files={"train": os.path.join(args.train_data_dir, "**")},
                           cache_dir=args.cache_dir)
    image_column, caption_column = args.image_column, args.caption_column
    transform = train_transforms(args, random.Random(args.seed))

    def tokenize_captions(examples, is_train=True):
        captions = []
        for caption in examples[caption_column]:
            if isinstance(caption, str):
                captions.append(caption)
            elif isinstance(caption, (list, np.ndarray)):
                captions.append(random.choice(caption) if is_train else caption[0])
            else:
                raise ValueError(f"Caption column `{caption_column}` should contain either strings or lists of strings.")
        inputs = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                           return_tensors="pt")
        return inputs.input_ids

    def preprocess_train(examples):
        images = [image.convert("RGB") for image in examples[image_column]]
        examples["pixel_values"] = [transform(image) for image in images]
        examples["input_ids"] = tokenize_captions(examples)
        return examples

    with accelerator.main_process_first():
        train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        pixel_values = pixel_values.to(memory_format=torch.contiguous_format).float()
        input_ids = torch.stack([example["input_ids"] for example in examples])
        return {"pixel_values": pixel_values, "input_ids": input_ids}

    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   num_workers=args.dataloader_num_workers)

    # Scheduler and math around the number of training steps.
    num_warmup_steps_for_scheduler = args.lr_warmup_steps * accelerator.num_processes
    if args.max_train_steps is None:
        len_train_dataloader_after_sharding = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(len_train_dataloader_after_sharding / args.gradient_accumulation_steps)
        num_training_steps_for_scheduler = args.num_train_epochs * num_update_steps_per_epoch * accelerator.num_processes
    else:
        num_training_steps_for_scheduler = args.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=num_warmup_steps_for_scheduler,
                                 num_training_steps=num_training_steps_for_scheduler)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    cuda = accelerator.device.type == "cuda"
    clock = StepClock(cuda)
    losses = []
    global_step = 0
    t0 = time.perf_counter()
    for epoch in range(args.num_train_epochs):
        unet.train()
        train_loss = 0.0
        for step, batch in enumerate(train_dataloader):
            with accelerator.accumulate(unet):
                # Convert images to latent space
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                # Sample noise that we'll add to the latents
                noise = torch.randn_like(latents)
                if args.noise_offset:
                    noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1),
                                                             device=latents.device)
                bsz = latents.shape[0]
                # Sample a random timestep for each image
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
                timesteps = timesteps.long()
                # Add noise to the latents according to the noise magnitude at each timestep
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                # Get the text embedding for conditioning
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                if args.prediction_type is not None:
                    noise_scheduler.register_to_config(prediction_type=args.prediction_type)
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
                # Predict the noise residual and compute loss
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                if args.snr_gamma is None:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(
                        dim=1)[0]
                    if noise_scheduler.config.prediction_type == "epsilon":
                        mse_loss_weights = mse_loss_weights / snr
                    elif noise_scheduler.config.prediction_type == "v_prediction":
                        mse_loss_weights = mse_loss_weights / (snr + 1)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                    loss = loss.mean()
                # Gather the losses across all processes for logging
                avg_loss = accelerator.gather(loss.repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps
                # Backpropagate
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    params_to_clip = lora_layers
                    accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                losses.append(train_loss)  # what the example logs as train_loss
                train_loss = 0.0
                clock.mark()
            if global_step >= args.max_train_steps:
                break
    wall = time.perf_counter() - t0
    memory = peak_memory(cuda)

    # Save the lora layers
    accelerator.wait_for_everyone()
    unet = unet.to(torch.float32)
    unwrapped_unet = accelerator.unwrap_model(unet)
    unet_lora_state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrapped_unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=args.output_dir, unet_lora_layers=unet_lora_state_dict,
                                              safe_serialization=True)
    accelerator.end_training()
    return {**memory, "wall_s": wall, "train_losses": losses, "adapter": args.output_dir,
            "steps": global_step, **clock.stats(args.train_batch_size)}


if __name__ == "__main__":
    result = main()
    from tunesmith import allocator

    result |= {"torch_threads": torch.get_num_threads(), "allocator": allocator.describe(),
               "versions": {"diffusers": __import__("diffusers").__version__}}
    print("RESULT " + json.dumps(result), flush=True)
