"""Using a text-to-image run from the command line, on a tiny seeded pipeline built here (the built-in model's layout,
16x16): the quick path `tunesmith train --objective denoise`, `check` on good and bad folders, `generate` (PNGs, image i
of a prompt from seed + i, the run's own images), `eval` (base versus tuned: the detector, a CLIP score from a tiny
random CLIP built here), `export --format diffusers|adapter` (loaded back by diffusers alone, the run's images; GGUF and
hf refused; a failed read-back keeps nothing), the built-in image alias."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tunesmith.images import model as M
from tunesmith.images import synth

TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)
EXE = str(Path(sys.executable).parent / "tunesmith")
PROMPT = "two small red crosses on a blue background"


def _run(*args, timeout=300):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The pipeline, a folder of captioned images, and a LoRA run trained by the quick path (every training value its
    default but --lr; the sampler steps of its image grids lowered to 4, for speed)."""
    import os

    root = tmp_path_factory.mktemp("image-cli")
    os.environ["TUNESMITH_CACHE_DIR"] = str(root / "cache")  # the caption-embedding cache, for the subprocesses too
    pipe = root / "pipe"
    M.build_pipeline(TINY, seed=0).save_pretrained(pipe, safe_serialization=True)
    data = synth.write_dataset(root / "data", "cross", n=10, seed=0, resolution=16)
    run = root / "run"
    proc = _run("train", "--objective", "denoise", "--data", data, "--model", pipe, "--method", "lora",
                "--max-steps", 2, "--lr", 5e-3, "--out", run, "--quiet", "--set", "objective.denoise.inference_steps=4")
    return {"root": root, "pipe": pipe, "data": data, "run": run, "train": proc}


def _pixels(folder: Path, names) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names])


# ---------------------------------------------------------------- train, check


def test_the_quick_path_trains_and_check_reports(world, tmp_path):
    """`tunesmith train --objective denoise --data FOLDER --model PIPE --method lora --max-steps N --out DIR` with
    the other values their defaults: a LoRA file delivered, the report, the detector's base-vs-tuned line printed;
    `tunesmith check` prints the data summary, and exits 2 naming each bad file and its code."""
    proc = world["train"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = world["run"]
    assert (run / "best" / "pytorch_lora_weights.safetensors").is_file() and (run / "report.html").is_file()
    assert "held-out captions drawn as captioned: base" in proc.stdout
    check = ["check", "--model", world["pipe"], "--set", "objective.name=denoise"]
    ok = _run(*check, "--data", world["data"], timeout=120)
    assert ok.returncode == 0 and "train        9" in ok.stdout and "caption words" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    src = world["data"]
    for name in ("0000.png", "0000.txt", "0001.png"):  # 0001 has no caption
        (bad / name).write_bytes((src / name).read_bytes())
    (bad / "0002.png").write_bytes((src / "0002.png").read_bytes()[:100])  # truncated
    (bad / "0002.txt").write_text("a cross")
    proc = _run(*check, "--data", bad, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "0001.png: E038" in proc.stdout and "0002.png: E037" in proc.stdout and "2 issue(s)" in proc.stdout
    as_json = json.loads(_run(*check, "--data", bad, "--json", timeout=120).stdout)
    assert not as_json["ok"] and {i["code"] for i in as_json["issues"]} == {"E037", "E038"}


# ---------------------------------------------------------------- generate


def test_generate_writes_the_runs_images_seed_plus_i(world, tmp_path):
    """Image i of each prompt from seed --seed + i: the PNGs are what the tuned pipeline draws from those seeds, not
    the base's; a prompts file gives one row of images per prompt."""
    from tunesmith.evaluate.images import generate_images
    from tunesmith.models.diffusion import load_pipeline, load_tuned_pipeline

    out = tmp_path / "gen"
    proc = _run("generate", world["run"], "--prompt", PROMPT, "--n", 2, "--seed", 5, "--steps", 3, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [5, 6] and all(r["prompt"] == PROMPT and r["steps"] == 3 for r in rows)
    got = _pixels(out, [r["file"] for r in rows])
    kw = dict(steps=3, guidance=4.0)
    tuned = generate_images(load_tuned_pipeline(world["run"] / "best"), [PROMPT] * 2, [5, 6], **kw)
    base = generate_images(load_pipeline(world["pipe"]), [PROMPT] * 2, [5, 6], **kw)
    assert np.array_equal(got, tuned) and not np.array_equal(got, base) and not np.array_equal(got[0], got[1])

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"caption": "a big green circle"}) + "\n"
                       + json.dumps({"text": PROMPT}) + "\n")
    out2 = tmp_path / "gen2"
    proc = _run("generate", world["run"] / "best", "--data", prompts, "--n", 1, "--seed", 5, "--steps", 3,
                "--out", out2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out2 / "images.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [5, 5, 5] and rows[1]["prompt"] == "a big green circle"
    assert np.array_equal(_pixels(out2, [rows[0]["file"]])[0], tuned[0])  # same prompt and seed: the same image
    assert _run("generate", world["run"], "--prompt", PROMPT).returncode == 2  # --out is required for images


def test_read_prompts_names_the_bad_line(tmp_path):
    from tunesmith.data import DataError
    from tunesmith.evaluate.image_cli import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n"b"\n{"text": "c"}\n{"other": 1}\n')
    with pytest.raises(DataError) as e:
        read_prompts(f)
    assert "p.jsonl:4" in str(e.value) and "E006" in str(e.value)
    f.write_text('{"prompt": "a"}\n"b"\n{"caption": "c"}\n')
    assert read_prompts(f) == ["a", "b", "c"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_prompts(txt) == ["one", "two"]


# ---------------------------------------------------------------- eval, CLIP


def _tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (16-wide, 1 layer) and its processor: a CLIPTokenizer over a character vocabulary written
    here, an image processor at 16 pixels."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_proc = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64, eos_token_id=end,
                                      bos_token_id=vocab["<|startoftext|>"], pad_token_id=end),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_proc, tok).save_pretrained(folder)
    return folder


def test_the_clip_score_is_torchmetrics_formula(tmp_path):
    """100 x max(cos(image, text), 0) per image, the cosine read here from CLIPModel's own forward
    (logits_per_image / logit_scale)."""
    from transformers import CLIPModel, CLIPProcessor

    from tunesmith.evaluate.clip import ClipScorer, clip_score

    folder = _tiny_clip(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    captions = ["two small red crosses", "a big blue circle", "three green squares", "a yellow triangle"]
    scorer = ClipScorer(folder)
    got = scorer.scores(images, captions)
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**proc(text=captions, images=list(images), return_tensors="pt", padding=True))
    cos = out.logits_per_image.diag() / model.logit_scale.exp()
    assert got == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-4)
    assert clip_score(scorer, images, captions) == pytest.approx(float(np.mean(got)))


def test_eval_compares_base_and_tuned_with_the_detector_and_clip(world, tmp_path):
    """Held-out captions from an image folder: both sides drawn from the same seeds, the detector's figures with a
    CI (the captions are the built-in world's), a CLIP score per side, eval.json, eval.md and both grids."""
    clip = _tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    proc = _run("eval", world["run"], "--data", world["data"], "--limit", 3, "--n", 1, "--steps", 3,
                "--clip-model", clip, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["prompts"] == 3 and result["baseline"] == str(world["pipe"])
    d, c = result["detector"], result["clip"]
    assert 0 <= d["base_accuracy"] <= 1 and d["ci_low"] <= d["diff"] <= d["ci_high"] and d["judged_images"] == 3
    assert result["control_prompts"] == 8 and d["control_images"] == 8  # at least 8 control prompts, 1 image each
    assert d["control_ci_low"] <= d["control_diff"] <= d["control_ci_high"]
    assert 0 <= c["base"] <= 100 and 0 <= c["tuned"] <= 100 and c["ci_low"] <= c["diff"] <= c["ci_high"]
    assert "CLIP score" in proc.stdout and "detector accuracy" in proc.stdout
    assert (out / "base.png").is_file() and (out / "tuned.png").is_file() and (out / "eval.md").is_file()
    assert not np.array_equal(np.asarray(Image.open(out / "base.png")), np.asarray(Image.open(out / "tuned.png")))
    # a prompts file, no baseline: the tuned side alone
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n")
    proc = _run("eval", world["pipe"], "--data", prompts, "--n", 1, "--steps", 2, "--clip-model", clip,
                "--json", "--out", tmp_path / "e2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = json.loads(proc.stdout)
    assert alone["baseline"] is None and alone["detector"] is None and 0 <= alone["clip"]["tuned"] <= 100


# ---------------------------------------------------------------- export


def test_export_diffusers_and_adapter_load_back_as_the_run(world, tmp_path):
    """--format diffusers: a pipeline folder diffusers loads alone, LoRA fused (its weights moved from the base's),
    drawing the run's images; --format adapter: the LoRA file pipe.load_lora_weights reads, the run's images exactly;
    GGUF and hf refused (exit 2, nothing written)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from tunesmith.evaluate.images import generate_images
    from tunesmith.models.diffusion import load_tuned_pipeline

    kw = dict(steps=3, guidance=4.0)
    run_images = generate_images(load_tuned_pipeline(world["run"] / "best"), [PROMPT] * 2, [1, 2], **kw)

    pipe_out = tmp_path / "pipe-export"
    proc = _run("export", world["run"], "--format", "diffusers", "--out", pipe_out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok   reloaded pipeline folder vs the run" in proc.stdout and "FAIL" not in proc.stdout
    loaded = DiffusionPipeline.from_pretrained(str(pipe_out))
    assert not any("lora" in n for n, _ in loaded.unet.named_parameters())
    merged = load_file(pipe_out / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(world["pipe"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    assert np.abs(generate_images(loaded, [PROMPT] * 2, [1, 2], **kw).astype(int) - run_images).max() <= 4

    lora_out = tmp_path / "lora-export"
    proc = _run("export", world["run"], "--format", "adapter", "--out", lora_out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = DiffusionPipeline.from_pretrained(str(world["pipe"]))
    plain.load_lora_weights(str(lora_out))
    assert np.array_equal(generate_images(plain, [PROMPT] * 2, [1, 2], **kw), run_images)

    for fmt, words in (("gguf", "GGUF files hold language models"), ("hf", "allowed: diffusers, adapter")):
        proc = _run("export", world["run"], "--format", fmt, "--out", tmp_path / f"x.{fmt}", timeout=120)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / f"x.{fmt}").exists()


def test_an_export_that_does_not_draw_the_runs_images_is_not_kept(world, tmp_path, monkeypatch):
    from tunesmith.export import ExportCheckFailed, export_model
    from tunesmith.export import images as ex

    real = ex.draw
    calls = []

    def drifting(pipe, settings):
        calls.append(1)
        images = real(pipe, settings)
        return images if len(calls) == 1 else 255 - images  # the read-back draws something else

    monkeypatch.setattr(ex, "draw", drifting)
    out = tmp_path / "lora"
    with pytest.raises(ExportCheckFailed, match="not kept"):
        export_model(world["run"], "adapter", out)
    assert not out.exists() and not list(tmp_path.glob(".lora*"))


# ---------------------------------------------------------------- the built-in alias


def test_the_builtin_image_alias(world, tmp_path, monkeypatch):
    """`tunesmith models` lists it as text-to-image; it resolves to the package's pipeline folder, and says what to do
    while that folder is not there."""
    from tunesmith.models import ModelError, ensure_local, list_models
    from tunesmith.models import registry
    from tunesmith.models.diffusion import text_to_image_folder
    from tunesmith.models.registry import IMAGE_ALIAS

    row = next(r for r in list_models() if r.alias == IMAGE_ALIAS)
    assert row.kind == "text-to-image"
    listed = json.loads(_run("models", "--json", timeout=120).stdout)
    assert any(r["alias"] == IMAGE_ALIAS and r["kind"] == "text-to-image" for r in listed)
    monkeypatch.setattr(registry, "builtin_folder", lambda: tmp_path / "missing")
    with pytest.raises(ModelError, match="tunesmith.images.pretrain"):
        ensure_local(IMAGE_ALIAS)
    monkeypatch.setattr(registry, "builtin_folder", lambda: world["pipe"])
    assert ensure_local(IMAGE_ALIAS) == world["pipe"] and text_to_image_folder(IMAGE_ALIAS) == world["pipe"]
    assert text_to_image_folder("smollm2-135m-instruct") is None
