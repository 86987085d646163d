"""The image pipeline's pieces on a tiny random model: standard classes, diffusers' loader, the training loss, and
pre-training's resume."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, IFPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, T5Tokenizer

from tunesmith.images import measure, model as M, pretrain, synth
from tunesmith.images.card import render_card

TINY = M.ModelShape(channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    M.build_pipeline(TINY, seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def test_tokenizer_has_one_token_per_word_and_spells_unknown_words():
    tok = M.build_tokenizer()
    for word in synth.VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a magenta star", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) > 3
    ids, mask = M.tokenize(tok, ["two small red circles on a blue background", ""])
    assert ids.shape == mask.shape == (2, M.MAX_LENGTH)
    assert mask[0].sum() == 9 and mask[1].sum() == 1  # 8 words + </s>; "" is </s> alone


def test_saved_folder_loads_with_diffusers_own_loader(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline"
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder",
                                                            "tokenizer", "unet"]
    assert list(tiny_folder.glob("*/*.safetensors")) and not list(tiny_folder.glob("*/*.bin"))
    pipe = DiffusionPipeline.from_pretrained(tiny_folder)
    assert isinstance(pipe, IFPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, T5Tokenizer)
    fresh = M.build_pipeline(TINY, seed=0)
    for a, b in zip(pipe.unet.state_dict().values(), fresh.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert M.noise_scheduler(pipe).config.beta_schedule == "squaredcos_cap_v2"


def test_encode_captions_equals_the_pipelines_encode_prompt(tiny_folder):
    pipe = DiffusionPipeline.from_pretrained(tiny_folder)
    caps = ["two small red circles on a blue background", "A Large Purple Cross in the middle on a white background "]
    ours = M.encode_captions(pipe.tokenizer, pipe.text_encoder, caps)
    theirs, negative = pipe.encode_prompt(caps, do_classifier_free_guidance=True, device="cpu", clean_caption=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # (with and without autograd: other kernels)
    torch.testing.assert_close(M.encode_captions(pipe.tokenizer, pipe.text_encoder, ["", ""]), negative,
                               rtol=0, atol=1e-6)


def test_generate_is_seeded_and_gives_images(tiny_folder):
    pipe = measure.load(tiny_folder)
    caps = ["a small red circle on a blue background"] * 3
    a = measure.generate(pipe, caps, seed=1, steps=3, guidance=2.0, batch_size=2)
    b = measure.generate(pipe, caps, seed=1, steps=3, guidance=2.0, batch_size=2)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, measure.generate(pipe, caps, seed=2, steps=3, guidance=2.0, batch_size=2))


def _loss(prediction_type, snr_gamma):
    pipe = M.build_pipeline(TINY, seed=0)
    sched = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction_type})
    torch.manual_seed(1)
    pixels, caps = pretrain.batch(seed=0, step=0, size=4, p_drop=0.0)
    embeds = M.encode_captions(pipe.tokenizer, pipe.text_encoder, caps)
    noise, t = torch.randn_like(pixels), torch.tensor([10, 300, 600, 990])
    return pretrain.diffusion_loss(pipe.unet, sched, pixels, embeds, noise, t, snr_gamma), pipe, sched, (
        pixels, embeds, noise, t)


def test_loss_follows_the_schedulers_prediction_type():
    for kind, gamma in (("epsilon", None), ("epsilon", 5.0), ("v_prediction", None), ("v_prediction", 5.0)):
        loss, pipe, sched, (pixels, embeds, noise, t) = _loss(kind, gamma)
        pred = pipe.unet(sched.add_noise(pixels, noise, t), t, embeds).sample[:, :3]
        target = noise if kind == "epsilon" else sched.get_velocity(pixels, noise, t)
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        if gamma:
            alpha = sched.alphas_cumprod[t]
            snr = alpha / (1 - alpha)
            per = per * torch.clamp(snr, max=gamma) / (snr if kind == "epsilon" else snr + 1)
        torch.testing.assert_close(loss, per.mean())


def test_training_never_moves_the_variance_channels():
    """IF's learned-variance half of conv_out starts at 0 and gets no gradient, so DDPM sampling stays sane."""
    loss, pipe, _, _ = _loss("epsilon", 5.0)
    loss.backward()
    assert pipe.unet.conv_out.weight.grad[3:].abs().max() == 0 and pipe.unet.conv_out.bias.grad[3:].abs().max() == 0
    assert pipe.unet.conv_out.weight[3:].abs().max() == 0


def test_pretraining_resumed_equals_uninterrupted(tmp_path):
    kw = dict(seed=0, batch_size=4, lr=1e-3, warmup=2, save_every=2, threads=1, shape=TINY, log=lambda m: None)
    whole = pretrain.train(tmp_path / "whole", steps=4, **kw)
    pretrain.train(tmp_path / "split", steps=2, **kw)
    split = pretrain.train(tmp_path / "split", steps=4, **kw)
    for sub, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        from safetensors.torch import load_file

        a, b = load_file(whole / sub / name), load_file(split / sub / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # the k-step snapshot of a longer run is the run with --steps k (constant learning rate after warm-up)
    a = load_file(tmp_path / "whole" / "step-2" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split" / "step-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((whole / "pretrain.json").read_text())
    assert info["steps"] == 4 and info["seed"] == 0
    assert json.loads((tmp_path / "whole" / "step-2" / "pretrain.json").read_text())["steps"] == 2


def test_text_encoder_pretraining_makes_the_captions_attributes_readable():
    """pretrain_text_encoder: every stated attribute, the position above all, becomes linearly readable from the mean
    of the encoder's outputs (the heads' loss falls from chance), seeded: the same seed gives the same encoder."""
    def encoder():
        pipe = M.build_pipeline(TINY, seed=0)
        return pipe.text_encoder, pipe.tokenizer

    te, tok = encoder()
    chance = sum(np.log(len(v)) for v in pretrain.ATTRIBUTES.values())
    first = pretrain.pretrain_text_encoder(te, tok, seed=0, steps=1, batch_size=32)
    last = pretrain.pretrain_text_encoder(te, tok, seed=0, steps=100, batch_size=32, lr=3e-3)
    assert first > 0.8 * chance and last < 0.5 * chance, (first, last, chance)
    assert "cross" not in pretrain.ATTRIBUTES["shape"] and "purple" not in pretrain.ATTRIBUTES["colour"]
    a, b = encoder()[0], encoder()[0]
    pretrain.pretrain_text_encoder(a, tok, seed=1, steps=3, batch_size=8)
    pretrain.pretrain_text_encoder(b, tok, seed=1, steps=3, batch_size=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretraining_with_a_pretrained_frozen_text_encoder(tmp_path):
    """--text-pretrain-steps N --text-lr-scale 0 --position-first-steps K: the encoder pre-trained first, then frozen
    (no gradient, not in the optimizer or EMA) while the UNet trains; resuming neither pre-trains it again nor moves
    it, and the run resumed inside the placed-only steps equals the uninterrupted one."""
    from safetensors.torch import load_file

    kw = dict(seed=0, batch_size=4, lr=1e-3, warmup=2, save_every=2, threads=1, shape=TINY, log=lambda m: None,
              text_lr_scale=0.0, text_pretrain_steps=5, position_first_steps=3)
    whole = pretrain.train(tmp_path / "whole", steps=4, **kw)
    pretrain.train(tmp_path / "split", steps=2, **kw)
    split = pretrain.train(tmp_path / "split", steps=4, **kw)
    pipe = M.build_pipeline(TINY, seed=0)
    pretrain.pretrain_text_encoder(pipe.text_encoder, pipe.tokenizer, seed=0, steps=5)
    expected = pipe.text_encoder.state_dict()
    initial = M.build_pipeline(TINY, seed=0).text_encoder.state_dict()
    for folder in (whole, split, tmp_path / "whole" / "step-2"):
        saved = load_file(folder / "text_encoder" / "model.safetensors")
        assert all(torch.equal(saved[k], expected[k]) for k in saved), folder
    assert not all(torch.equal(expected[k], initial[k]) for k in expected)  # pre-training moved it
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((whole / "pretrain.json").read_text())
    assert info["text_pretrain_steps"] == 5 and info["text_lr_scale"] == 0.0 and info["channels"] == list(TINY.channels)
    assert info["position_first_steps"] == 3  # (resumed at step 2, inside the placed-only steps: still equal above)
    figures = {"n": 4, "seed": 0, "steps": 2, "guidance": 4.0, "seconds_16_images": 1.0, "threads": 1,
               "in_distribution": {"all_correct": 0.5, "per_attribute": {"shape": 0.5, "position": 0.25}},
               "held_out": {"cross": {"drawn": 0.0, "all_correct": 0.0}}}
    card = render_card(whole, figures, "a test CPU")
    assert all(f in card for f in ("--text-pretrain-steps 5", "--text-lr-scale 0", "--position-first-steps 3"))
    assert "first 3 steps drew only single objects at stated positions" in " ".join(card.split())
    assert "17% of the scenes placed" in " ".join(card.split())  # p_position 0.5 of the single objects, a third
    assert "pre-trained alone for 5 steps" in " ".join(card.split()) and "under the project's target" in card


def test_learning_rate_decay_and_a_run_extended_into_it(tmp_path):
    """--decay-steps K: warm-up, constant, then linear to zero over the last K steps; a run stopped at the end of its
    constant part and resumed with --steps N+K --decay-steps K equals that command run from scratch."""
    assert [pretrain.lr_factor(s, 10, 2) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [pretrain.lr_factor(s, 10, 2, 4) for s in (0, 5, 6, 7, 9)] == [0.5, 1.0, 1.0, 0.75, 0.25]
    from safetensors.torch import load_file

    kw = dict(seed=0, batch_size=4, lr=1e-3, warmup=2, save_every=2, threads=1, shape=TINY, log=lambda m: None)
    whole = pretrain.train(tmp_path / "whole", steps=6, decay_steps=2, **kw)
    pretrain.train(tmp_path / "extended", steps=4, **kw)
    extended = pretrain.train(tmp_path / "extended", steps=6, decay_steps=2, **kw)
    a = load_file(whole / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(extended / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((extended / "pretrain.json").read_text())["decay_steps"] == 2
    constant = load_file(pretrain.train(tmp_path / "constant", steps=6, **kw) / "unet" /
                         "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], constant[k]) for k in a)  # the decay changed the last steps


def test_recipe_flags_give_back_the_recipe():
    """The model card's command (recipe_flags of pretrain.json) parses back to the recipe: --seed and --steps always,
    the other flags where they differ from their defaults; the shipped model's recipe needs no other flag."""
    recipe = {"seed": 3, "steps": 6000, "batch_size": 32, "lr": 1e-3, "text_lr_scale": 0.0, "text_pretrain_steps": 300,
              "p_position": 0.5, "position_first_steps": 600, "channels": [16, 32, 64, 64, 64], "pooled_text": True,
              "scale_shift": False, "warmup": 200, "threads": 1, "torch": "2.13.0+cpu", "train_seconds": 4200}
    flags = pretrain.recipe_flags(recipe)
    a = pretrain.parser().parse_args(["--out", "x", *flags.split()])
    assert (a.seed, a.steps, a.channels, a.pooled_text, a.scale_shift) == (3, 6000, (16, 32, 64, 64, 64), True, False)
    assert (a.text_lr_scale, a.text_pretrain_steps, a.position_first_steps, a.p_position) == (0.0, 300, 600, 0.5)
    assert "--batch-size" not in flags and "--p-position" not in flags and "--scale-shift" not in flags
    shipped = json.loads((measure.BUILTIN / "pretrain.json").read_text())  # the shipped model's card command
    a = vars(pretrain.parser().parse_args(["--out", "x", *pretrain.recipe_flags(shipped).split()]))
    for key, value in shipped.items():
        if key in a:
            assert a[key] == (tuple(value) if isinstance(value, list) else value), key


def test_pretraining_batches_are_seeded_by_step_and_hold_out_concepts():
    a, caps_a = pretrain.batch(seed=0, step=7, size=16, p_drop=0.5)
    b, caps_b = pretrain.batch(seed=0, step=7, size=16, p_drop=0.5)
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert "" in caps_a and any(caps_a)
    _, caps = pretrain.batch(seed=0, step=8, size=256, p_drop=0.0)
    assert not any({"cross", "crosses", "purple"} & set(c.split()) for c in caps)
    # p_position: the share of single-object captions that say where the object is
    for p, lo, hi in ((0.0, 0.0, 0.0), (0.5, 0.3, 0.7), (1.0, 1.0, 1.0)):
        _, caps = pretrain.batch(seed=0, step=8, size=256, p_drop=0.0, p_position=p)
        single = [c for c in caps if c.startswith("a ")]
        placed = sum(any(ph in c for ph in synth.POSITION_PHRASES.values()) for c in single) / len(single)
        assert lo <= placed <= hi, (p, placed)
    # placed_only (the curriculum's first steps): one object, its position stated, in every caption
    _, caps = pretrain.batch(seed=0, step=8, size=64, p_drop=0.0, placed_only=True)
    assert all(c.startswith("a ") and any(ph in c for ph in synth.POSITION_PHRASES.values()) for c in caps)


def test_quality_reports_every_figure(tiny_folder):
    figures = measure.quality(measure.load(tiny_folder), n=2, steps=2, guidance=2.0)
    assert figures["n"] == 2 and figures["steps"] == 2 and figures["seconds_16_images"] > 0
    assert 0 <= figures["in_distribution"]["all_correct"] <= 1
    assert set(figures["held_out"]) == {"cross", "purple"}
    assert all(0 <= h["drawn"] <= 1 for h in figures["held_out"].values())
    assert "read back as captioned" in measure.report(figures)


class _PlacingUNet(torch.nn.Module):
    """A stand-in denoiser that knows the answer: for each probe caption it returns the v-prediction whose image
    estimate is that caption's drawn scene (a large red circle on white at the stated position)."""

    def __init__(self, pipe, scheduler):
        super().__init__()
        self.config = pipe.unet.config
        self.scheduler = scheduler
        self.keys = {}
        for pos, phrase in measure.PROBE_PHRASES.items():
            embeds = M.encode_captions(pipe.tokenizer, pipe.text_encoder, [f"a large red circle {phrase} on a white background"])
            scene = synth.sample_scene(np.random.default_rng(0), shape="circle", colour="red", size="large", count=1,
                                       background="white", position=pos)
            image = torch.from_numpy(synth.render_batch([scene])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            self.keys[pos] = (embeds[0], image, scene.objects[0])

    def forward(self, x, t, embeds):
        pos = next(p for p, (e, _, _) in self.keys.items() if torch.equal(embeds[0], e))
        x0 = self.keys[pos][1].expand_as(x)
        alpha_bar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # the noise that makes x from x0
        v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
        return type("Out", (), {"sample": torch.cat([v, torch.zeros_like(v)], 1)})()


def test_position_probe_reads_where_the_image_estimate_puts_the_object(tiny_folder):
    pipe = measure.load(tiny_folder)
    pipe.unet = _PlacingUNet(pipe, pipe.scheduler)
    probe = measure.position_probe(pipe, timestep=900, n=4)
    for pos, (cx, cy) in probe["centroids"].items():
        obj = pipe.unet.keys[pos][2]
        assert abs(cx - obj.cx) < 0.6 and abs(cy - obj.cy) < 0.6, (pos, cx, cy, obj)
    assert probe["dx"] > 12 and probe["dy"] > 12


def test_position_probe_and_word_separation_of_a_random_model(tiny_folder):
    pipe = measure.load(tiny_folder)
    a, b = measure.position_probe(pipe, n=2), measure.position_probe(pipe, n=2)
    assert a == b and set(a["centroids"]) == {"left", "right", "top", "bottom"}
    sep = measure.word_separation(pipe)
    # at random initialisation every word is its own random vector: both pairs clearly apart
    assert sep["position"]["at_word"] > 0.05 and sep["colour"]["at_word"] > 0.05
    assert set(sep) == {"position", "colour"} and all(set(v) == {"at_word", "padding"} for v in sep.values())


def test_pooled_text_and_scale_shift_are_ifs_own_unet_options_and_the_pipeline_runs_them(tmp_path):
    shape = M.ModelShape(channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32,
                         pooled_text=True, scale_shift=True)
    M.build_pipeline(shape, seed=0).save_pretrained(tmp_path / "p", safe_serialization=True)
    pipe = measure.load(tmp_path / "p")  # diffusers' own loader, IFPipeline unchanged
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text" and cfg.resnet_time_scale_shift == "scale_shift"
    assert M.build_unet(TINY).config.addition_embed_type is None  # the shipped shape keeps cross-attention only
    # the pooled caption reaches the time embedding: two captions differing only in the position word differ there
    e = M.encode_captions(pipe.tokenizer, pipe.text_encoder, ["a large red circle on the left on a white background",
                                                              "a large red circle on the right on a white background"])
    pooled = pipe.unet.add_embedding(e)  # (2, time_embed_dim)
    assert pooled.shape == (2, 4 * 8) and not torch.allclose(pooled[0], pooled[1])
    images = measure.generate(pipe, ["a small red circle on the left on a blue background"], steps=2, guidance=2.0)
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_pretraining_with_a_frozen_text_encoder_moves_only_the_unet(tmp_path):
    kw = dict(seed=0, batch_size=2, lr=1e-3, warmup=1, save_every=2, threads=1, shape=TINY, log=lambda m: None,
              ema_decay=0.0)
    from safetensors.torch import load_file

    fresh = M.build_pipeline(TINY, seed=0)
    out = pretrain.train(tmp_path / "frozen", steps=2, text_lr_scale=0.0, **kw)
    te = load_file(out / "text_encoder" / "model.safetensors")
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(te[k], v) for k, v in fresh.text_encoder.state_dict().items() if k in te)
    assert any(not torch.equal(unet[k], v) for k, v in fresh.unet.state_dict().items() if k in unet)
    assert json.loads((out / "pretrain.json").read_text())["text_lr_scale"] == 0.0


def test_pretrain_command_line_takes_the_shape_and_the_text_learning_rate(tmp_path):
    pretrain.main(["--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--save-every", "1",
                   "--channels", "8,16", "--pooled-text", "--scale-shift", "--text-lr-scale", "0"])
    cfg = json.loads((tmp_path / "run" / "pipeline" / "unet" / "config.json").read_text())
    assert cfg["block_out_channels"] == [8, 16] and cfg["addition_embed_type"] == "text"
    assert cfg["resnet_time_scale_shift"] == "scale_shift"
    assert json.loads((tmp_path / "run" / "pipeline" / "pretrain.json").read_text())["text_lr_scale"] == 0.0
