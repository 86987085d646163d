"""Text-to-image fine-tuning (objective denoise) on a tiny seeded pipeline built here (the built-in model's layout:
IF's pixel-space UNet2DConditionModel and a T5 encoder, 16x16): the loss against a plain implementation of each
prediction type's formula, golden per-step losses, draws that depend on the image and the step alone, a run end to end
(report grids, comparison, the delivered LoRA loaded by diffusers itself drawing the run's images), LoRA changing
adapter tensors only, resume bit-exact, full fine-tuning's pipeline folder, the caption embedding cache, and a model
of the wrong kind refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.images import model as M
from tunesmith.images import synth
from tunesmith.models.diffusion import LORA_FILE, load_diffusion_model, load_tuned_pipeline
from tunesmith.objectives.denoise import CONTROL_PROMPTS, Denoise, ImageItem, embed_captions
from tunesmith.train import train
from tunesmith.train.loop import TrainingError
from tunesmith.train.steps import Compute

TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():  # module scope: before the module's runs, so that every run here sums in the same order
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    if not folder.exists():
        pipe = M.build_pipeline(TINY, seed=0)
        pipe.scheduler.register_to_config(prediction_type=prediction_type)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise")
    return {"root": root, "pipe": _pipeline(root / "pipe"),
            "data": synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=16)}


def _cfg(world, out, *extra):
    return load_config(None, [
        f"model.name={world['pipe']}", f"data.train={world['data']}", f"output_dir={out}", "objective.name=denoise",
        "method.name=lora", "method.lora.r=4", "method.lora.dropout=0.0", "train.batch_size=4", "train.max_steps=4",
        "train.lr=1e-3", "train.warmup_steps=0", "eval.every_steps=2", "eval.samples=2", "eval.compare_examples=2",
        "data.valid_fraction=0.2", "checkpoint.every_steps=2", "objective.denoise.inference_steps=2",
        "objective.denoise.caption_dropout=0.1",  # opt-in since issue 25's demo; the goldens drop captions
        *extra])


def _events(run, kind):
    return [e for e in map(json.loads, open(Path(run) / "metrics.jsonl")) if e["kind"] == kind]


# ---------------------------------------------------------------- the loss


def _objective(pipe_dir, data, prediction_type, snr_gamma):
    from tunesmith.config import DenoiseConfig
    from tunesmith.data.images import read_image_rows

    net = load_diffusion_model(_pipeline(pipe_dir, prediction_type))
    obj = Denoise(DenoiseConfig(snr_gamma=snr_gamma, caption_dropout=0.0))
    records = read_image_rows(data, resolution=16)[0]
    obj.resolution, obj.latent_shape, obj.num_timesteps = 16, (3, 16, 16), 1000
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records} | {""}), "cpu", lambda e: None)
    return net, obj, records


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_loss_is_each_prediction_types_formula(world, prediction_type, snr_gamma):
    """sqrt(abar) x0 + sqrt(1 - abar) n noised; the target: n (epsilon), sqrt(abar) n - sqrt(1 - abar) x0 (v), x0
    (sample); squared error per image; min-SNR weights min(SNR, g) / SNR, / (SNR + 1), min(SNR, g)."""
    net, obj, records = _objective(world["root"] / f"pipe-{prediction_type}", world["data"], prediction_type, snr_gamma)
    batch = obj.collate([ImageItem(r, i, step=3) for i, r in enumerate(records[:3])], None, "padded")
    loss, stats = obj.loss(net, batch, Compute())

    abar = net.noise_scheduler.alphas_cumprod.double()[batch["timesteps"]][:, None, None, None]
    x0, n = batch["pixels"].double(), batch["noise"].double()
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * n
    target = {"epsilon": n, "v_prediction": abar.sqrt() * n - (1 - abar).sqrt() * x0, "sample": x0}[prediction_type]
    with torch.no_grad():
        pred = net.unet(noisy.float(), batch["timesteps"], encoder_hidden_states=batch["embeds"]).sample[:, :3]
    mse = ((pred.double() - target) ** 2).mean(dim=(1, 2, 3))
    snr = (abar / (1 - abar)).flatten()
    weight = 1.0 if snr_gamma is None else {"epsilon": snr.clamp(max=snr_gamma) / snr,
                                            "v_prediction": snr.clamp(max=snr_gamma) / (snr + 1),
                                            "sample": snr.clamp(max=snr_gamma)}[prediction_type]
    assert float(loss) == pytest.approx(float((mse * weight).sum()), rel=1e-5)
    assert stats["mse"] == pytest.approx(float(mse.sum()), rel=1e-5)


# Per-step training losses of a 3-step LoRA run at lr 1e-2, one per prediction type, on the tiny pipeline of the
# built-in model's layout (CLIP text encoder; measured on an Intel Xeon with AVX-512; other CPUs sum in other orders,
# hence rel 1e-4). A change to the data pipeline, the draws, the targets or the
# weighting moves them far more.
GOLDEN = {"epsilon": [0.9603012, 0.8227238, 0.8532706], "v_prediction": [0.3973339, 0.1308322, 0.2652773],
          "sample": [1.5053627, 0.9335788, 1.2299715]}


@pytest.mark.parametrize("prediction_type", list(GOLDEN))
def test_golden_per_step_losses(world, prediction_type):
    w = dict(world, pipe=_pipeline(world["root"] / f"pipe-{prediction_type}", prediction_type))
    res = train(_cfg(w, world["root"] / f"golden-{prediction_type}", "train.max_steps=3", "eval.every_steps=3",
                     "eval.compare_base=false", "train.lr=1e-2"), quiet=True)
    assert [e["loss"] for e in _events(res.output_dir, "train")] == pytest.approx(GOLDEN[prediction_type], rel=1e-4)


def test_what_an_image_draws_depends_on_it_and_the_step_alone(world):
    """Noise, timestep and crop of an image at a step are the same in any batch (and on any process); another step
    draws others; validation images sit at fixed, evenly spaced timesteps."""
    from tunesmith.config import DenoiseConfig

    _, obj, records = _objective(world["root"] / "pipe-epsilon", world["data"], "epsilon", None)
    obj.settings = DenoiseConfig(random_crop=True, random_flip=True, caption_dropout=0.5)
    items = [ImageItem(r, i, step=5) for i, r in enumerate(records[:4])]
    together = obj.collate(items, None, "padded")
    alone = obj.collate(items[2:3], None, "padded")
    for k in ("pixels", "noise", "timesteps", "embeds"):
        assert torch.equal(together[k][2:3], alone[k]), k
    later = obj.collate([ImageItem(records[2], 2, step=6)], None, "padded")
    assert not torch.equal(later["noise"], alone["noise"])
    valid = obj.collate([ImageItem(records[0], 0, -1, j) for j in range(4)], None, "padded")
    assert valid["timesteps"].tolist() == [125, 375, 625, 875]


def test_caption_embeddings_are_cached_and_equal_the_pipelines_own(world):
    net = load_diffusion_model(world["pipe"])
    captions = ["two small red circles on a blue background", "one tiny green square on a red background"]
    messages = []
    first = embed_captions(net, captions, "cpu", messages.append)
    again = embed_captions(net, captions, "cpu", messages.append)
    assert len(messages) == 1 and "2 captions embedded" in messages[0].text  # the second call read the cache
    for c in captions:
        assert first[c].keys() == {"embeds"} and torch.equal(first[c]["embeds"], again[c]["embeds"])
    with torch.no_grad():
        own, _ = net.pipeline.encode_prompt(captions, do_classifier_free_guidance=False, clean_caption=False)
    assert torch.allclose(torch.stack([first[c]["embeds"] for c in captions]), own, atol=1e-6)


# ---------------------------------------------------------------- through train()


@pytest.fixture(scope="module")
def lora_run(world):
    return train(_cfg(world, world["root"] / "lora"), quiet=True)


def test_a_run_trains_draws_reports_and_compares(world, lora_run):
    run = lora_run.output_dir
    assert lora_run.status == "completed"
    steps = _events(run, "train")
    assert len(steps) == 4 and all(np.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
    evals = _events(run, "eval")
    assert [e["step"] for e in evals] == [2, 4]
    grids = [e["samples"][0]["image"] for e in evals]
    assert grids == ["samples/step-000002.png", "samples/step-000004.png"] and all((run / g).is_file() for g in grids)
    assert all("caption_accuracy" in e["stats"] and "control_accuracy" in e["stats"] for e in evals)
    report = (run / "report.html").read_text()
    assert 'id="image-grids"' in report and 'id="image-comparison"' in report and 'id="image-accuracy"' in report
    assert 'id="comparison-table"' not in report and "None held-out" not in report  # no empty text-metric table
    images = json.loads((run / "compare.json").read_text())["images"]
    assert images["prompts"] == 2 and images["ci_low"] <= images["diff"] <= images["ci_high"]
    assert images["control_images"] == CONTROL_PROMPTS * images["images_per_prompt"]  # never fewer than 8 prompts
    assert images["control_ci_low"] <= images["control_diff"] <= images["control_ci_high"]
    assert 'id="control-accuracy"' in report
    preflight = json.loads((run / "preflight.json").read_text())
    assert preflight["objective"] == "denoise" and preflight["resolution"] == 16


def test_the_delivered_lora_loads_with_diffusers_and_draws_the_runs_images(world, lora_run):
    """best/ is the diffusers LoRA file that pipe.load_lora_weights reads: diffusers alone (base pipeline + that file)
    and tunesmith's loader draw the same images from the same seeds, and not the base model's."""
    from tunesmith.evaluate.images import generate_images

    best = lora_run.output_dir / "best"
    assert (best / LORA_FILE).is_file() and json.loads((best / "tunesmith.json").read_text())["format"] == "diffusers-lora"
    tuned = load_tuned_pipeline(best)  # base from tunesmith.json + load_lora_weights
    from diffusers import DiffusionPipeline

    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    plain.load_lora_weights(str(best))  # diffusers alone, as a user would
    kw = dict(steps=2, guidance=4.0)
    prompts = ["a large black cross on a yellow background"] * 2
    a = generate_images(tuned, prompts, [1, 2], **kw)
    b = generate_images(plain, prompts, [1, 2], **kw)
    base = generate_images(DiffusionPipeline.from_pretrained(str(world["pipe"])), prompts, [1, 2], **kw)
    assert np.array_equal(a, b) and not np.array_equal(a, base)


def test_the_delivered_lora_is_the_runs_model(world, lora_run):
    """Loaded by diffusers (base pipeline + best/'s LoRA file), the denoiser computes what the run's own model computed
    at its best step (its weights rebuilt from that checkpoint): rank, alpha and targets travel in the file's
    metadata (alpha 32 at rank 4 here; diffusers would take alpha = rank without it)."""
    from diffusers import DiffusionPipeline

    from tunesmith.models.diffusion import adapt_diffusion

    cfg = _cfg(world, world["root"] / "unused")
    net, _ = adapt_diffusion(load_diffusion_model(world["pipe"]), cfg.method)
    saved = load_file(lora_run.output_dir / "checkpoints" / f"step-{lora_run.best_step:06d}" / "trainable.safetensors")
    params = dict(net.named_parameters())
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)
    loaded = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    loaded.load_lora_weights(str(lora_run.output_dir / "best"))
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        want = net.unet(x, t, encoder_hidden_states=e).sample
        got = loaded.unet(x, t, encoder_hidden_states=e).sample
        base = load_diffusion_model(world["pipe"]).unet(x, t, encoder_hidden_states=e).sample
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)


def test_lora_changes_adapter_tensors_only(world, lora_run):
    saved = load_file(lora_run.output_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert saved and all("lora" in k for k in saved)
    lora = load_file(lora_run.output_dir / "best" / LORA_FILE)
    assert lora and all("lora" in k for k in lora)


def test_a_resumed_run_is_the_uninterrupted_one_bit_for_bit(world, lora_run):
    cut = world["root"] / "lora-parts"
    polls = []
    stopped = train(_cfg(world, cut), quiet=True, stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    assert stopped.status == "interrupted" and stopped.steps == 2
    train(_cfg(world, cut), resume=True, quiet=True)
    assert [e["loss"] for e in _events(cut, "train")] == [e["loss"] for e in _events(lora_run.output_dir, "train")]
    assert [e["val_loss"] for e in _events(cut, "eval")] == [e["val_loss"] for e in _events(lora_run.output_dir, "eval")]
    a, b = load_file(cut / "best" / LORA_FILE), load_file(lora_run.output_dir / "best" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tuning_delivers_a_pipeline_folder(world):
    from diffusers import DiffusionPipeline

    res = train(_cfg(world, world["root"] / "full", "method.name=full", "train.max_steps=2", "eval.every_steps=2",
                     "eval.compare_base=false"), quiet=True)
    pipe = DiffusionPipeline.from_pretrained(str(res.output_dir / "best"))
    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed and all(torch.equal(v, base.text_encoder.state_dict()[k])
                           for k, v in pipe.text_encoder.state_dict().items())  # the text encoder stayed frozen


def test_a_model_of_the_wrong_kind_is_refused(world, tmp_path, tiny_model_dir):
    with pytest.raises(TrainingError, match="set objective.name=denoise"):
        train(_cfg(world, tmp_path / "a", "objective.name=sft"), quiet=True)
    with pytest.raises(TrainingError, match="diffusers text-to-image pipeline"):
        train(_cfg(world, tmp_path / "b", f"model.name={tiny_model_dir}"), quiet=True)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_gradient_checkpointing_gives_the_same_steps(world, lora_run):
    res = train(_cfg(world, world["root"] / "checkpointed", "train.gradient_checkpointing=true", "eval.compare_base=false"),
                quiet=True)
    got, want = _events(res.output_dir, "train"), _events(lora_run.output_dir, "train")
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in want], rel=1e-6)
    assert [e["grad_norm"] for e in got] == pytest.approx([e["grad_norm"] for e in want], rel=1e-5)


def test_ema_weights_are_averaged_evaluated_delivered_and_resumed(world):
    """train.ema_decay: the checkpoint's shadows follow shadow <- lerp(shadow, w, 1 - d), d = min(decay, (1 + k) /
    (10 + k)); the delivered adapter is the shadow of the best step; a resumed run ends with the same shadows."""
    out = world["root"] / "ema"
    res = train(_cfg(world, out, "train.ema_decay=0.3", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                     "eval.compare_base=false"), quiet=True)
    ck = out / "checkpoints"
    for k in (2, 3, 4):
        before = load_file(ck / f"step-{k - 1:06d}" / "ema.safetensors")
        now = load_file(ck / f"step-{k:06d}" / "ema.safetensors")
        weights = load_file(ck / f"step-{k:06d}" / "trainable.safetensors")
        assert int(now["updates"]) == k
        d = min(0.3, (1 + k) / (10 + k))
        for name, w in weights.items():
            want = before[f"shadow.{name}"] + (1 - d) * (w - before[f"shadow.{name}"])
            assert torch.allclose(now[f"shadow.{name}"], want, rtol=1e-6, atol=1e-7), name
            assert not torch.equal(now[f"shadow.{name}"], w)  # the average, not the weights
    best = load_file(ck / "best.safetensors")
    shadow = load_file(ck / f"step-{res.best_step:06d}" / "ema.safetensors")
    assert all(torch.equal(t, shadow[f"shadow.{n}"]) for n, t in best.items())
    cut = world["root"] / "ema-parts"
    polls = []
    train(_cfg(world, cut, "train.ema_decay=0.3", "eval.compare_base=false"), quiet=True,
          stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    train(_cfg(world, cut, "train.ema_decay=0.3", "eval.compare_base=false"), resume=True, quiet=True)
    a, b = load_file(cut / "best" / LORA_FILE), load_file(out / "best" / LORA_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_held_out_concept_rate_reads_what_the_images_show():
    """Drawn scenes of the held-out shape read back as it, other shapes not; captions that do not all ask for one
    held-out concept have no rate."""
    from tunesmith.evaluate.images import held_out_concept_rate

    crosses = synth.heldout_scenes("cross", 6, seed=3)
    others = synth.sample_scenes(6, seed=4)
    pixels = lambda scenes: np.stack([np.asarray(synth.render(s)) for s in scenes])  # noqa: E731
    asked = [s.caption() for s in crosses]
    assert held_out_concept_rate(pixels(crosses), asked) == ("cross", 1.0)
    assert held_out_concept_rate(pixels(others), asked) == ("cross", 0.0)
    assert held_out_concept_rate(pixels(others), [s.caption() for s in others]) is None
    assert held_out_concept_rate(pixels(crosses), ["a photo of a cat"] * 6) is None


def test_the_comparison_gives_the_control_captions_a_paired_ci():
    """Controls drawn right (base) against controls drawn as other scenes (tuned): the old concepts' loss is read with
    its paired bootstrap CI and image count, as the held-out captions' gain is; and the comparisons draw as many
    control prompts as held-out ones (at least the evaluations' 8), the evaluations' 8 first."""
    from tunesmith.evaluate.images import detector_comparison, detector_lines
    from tunesmith.images import measure
    from tunesmith.config import DenoiseConfig
    from tunesmith.images import detector
    from tunesmith.objectives.denoise import control_prompts

    pixels = lambda scenes: np.stack([np.asarray(synth.render(s)) for s in scenes])  # noqa: E731
    asked = synth.heldout_scenes("cross", 2, seed=3)
    control = synth.sample_scenes(4, seed=5)
    wrong = synth.sample_scenes(4, seed=6)
    base = np.concatenate([pixels(asked), pixels(control)])
    tuned = np.concatenate([pixels(asked), pixels(wrong)])
    f = detector_comparison(base, tuned, [s.caption() for s in asked], [s.caption() for s in control], n=1)
    right = np.mean([all(detector.matches(detector.detect(np.asarray(synth.render(w))), c.caption()).values())
                     for w, c in zip(wrong, control)])
    assert f["control_base_accuracy"] == 1.0 and f["control_tuned_accuracy"] == right < 1.0
    assert f["control_diff"] == right - 1.0 and f["control_ci_low"] <= f["control_diff"] <= f["control_ci_high"] <= 0
    assert f["control_images"] == 4
    assert any("control captions" in line and "95% CI" in line and "4 images" in line for line in detector_lines(f))
    settings = DenoiseConfig()
    held_out = [s.caption() for s in synth.heldout_scenes("cross", 20, seed=3)]
    wide = control_prompts(settings, held_out, max(CONTROL_PROMPTS, len(held_out)))
    assert len(wide) == 20 and wide[:CONTROL_PROMPTS] == control_prompts(settings, held_out)
    assert wide == measure.in_distribution_captions(20)
    assert control_prompts(settings, ["a photo of a cat"], 20) == []  # not the built-in world: no controls


# ---------------------------------------------------------------- a latent model (Stable Diffusion's layout)


def _tiny_stable_diffusion(folder: Path) -> Path:
    """A seeded random StableDiffusionPipeline: a 2-level AutoencoderKL (16 px -> 8 px latents, 4 channels), a CLIP
    text encoder and a UNet2DConditionModel, epsilon prediction (SD 1.x's)."""
    if folder.exists():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = M.build_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=1))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_a_latent_model_trains_on_cached_latents_equal_to_encoding_each_step(world):
    """Stable Diffusion's layout: each image's VAE latent distribution is computed once and cached on disk (read back
    by a second run), and a step's loss on the cached latents equals the loss of encoding the pixels in the step."""
    sd = _tiny_stable_diffusion(world["root"] / "sd")
    w = dict(world, pipe=sd)
    res = train(_cfg(w, world["root"] / "sd-run", "eval.compare_base=false"), quiet=True)
    assert res.status == "completed"
    messages = [e["text"] for e in _events(res.output_dir, "message")]
    assert any("images encoded by the VAE" in m for m in messages)
    again = train(_cfg(w, world["root"] / "sd-run-2", "eval.compare_base=false"), quiet=True)
    assert not any("images encoded by the VAE" in e["text"] for e in _events(again.output_dir, "message"))  # cached
    assert [e["loss"] for e in _events(again.output_dir, "train")] == [e["loss"] for e in _events(res.output_dir, "train")]

    from tunesmith.config import DenoiseConfig
    from tunesmith.data.images import read_image_rows
    from tunesmith.objectives.denoise import encode_latents

    net = load_diffusion_model(sd)
    records = read_image_rows(world["data"], resolution=16)[0][:3]
    obj = Denoise(DenoiseConfig(caption_dropout=0.0))
    obj.resolution, obj.latent, obj.latent_shape, obj.num_timesteps = 16, True, (4, 8, 8), 1000
    obj.embeddings = embed_captions(net, sorted({r.caption for r in records}), "cpu", lambda e: None)
    items = [ImageItem(r, i, step=2) for i, r in enumerate(records)]
    plain = obj.collate(items, None, "padded")
    obj.latents = encode_latents(net, records, 16, "cpu", lambda e: None)
    cached = obj.collate(items, None, "padded")
    assert "pixels" in plain and "latent_mean" in cached and "pixels" not in cached
    a, _ = obj.loss(net, plain, Compute())
    b, _ = obj.loss(net, cached, Compute())
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_lora_on_the_text_encoder_too_trains_and_loads_back(world):
    """objective.denoise.train_text_encoder: captions encoded in each forward (no cache), adapters on the encoder's
    attention as well, written to the diffusers LoRA file under text_encoder.* and loaded back by diffusers."""
    from diffusers import DiffusionPipeline

    from tunesmith.evaluate.images import generate_images

    res = train(_cfg(world, world["root"] / "te", "objective.denoise.train_text_encoder=true", "train.max_steps=2",
                     "eval.every_steps=2", "eval.compare_base=false", "train.lr=1e-2"), quiet=True)
    lora = load_file(res.output_dir / "best" / LORA_FILE)
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("unet.") for k in lora)
    messages = [e["text"] for e in _events(res.output_dir, "message")]
    assert not any("captions embedded" in m for m in messages) and any("text encoder trained" in m for m in messages)
    tuned = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    tuned.load_lora_weights(str(res.output_dir / "best"))
    ours = load_tuned_pipeline(res.output_dir / "best")
    kw = dict(steps=2, guidance=4.0)
    assert np.array_equal(generate_images(tuned, ["one large red cross on a blue background"], [3], **kw),
                          generate_images(ours, ["one large red cross on a blue background"], [3], **kw))
    base = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    with torch.no_grad():
        a, _ = base.encode_prompt(["one large red cross"], do_classifier_free_guidance=False, clean_caption=False)
        b, _ = tuned.encode_prompt(["one large red cross"], do_classifier_free_guidance=False, clean_caption=False)
    assert not torch.equal(a, b)  # the encoder's adapters are in use
