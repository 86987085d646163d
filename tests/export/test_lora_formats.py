"""`tunesmith export RUN --format adapter --style diffusers|kohya|comfyui|all` on LoRA runs of the two families
tunesmith trains, each on a tiny random pipeline built here: the built-in model's layout (IF's pixel-space
UNet2DConditionModel, CLIP text encoder, 16x16), Stable Diffusion 1.x (sd_helpers.tiny_sd: latent UNet with conv
projections, AutoencoderKL, CLIPTextModel/CLIPTokenizer, 32x32) and 2.x (linear projections, v-prediction). Adapters on the denoiser and the text encoder, alpha 8
at rank 4 (a wrong alpha would show). Each file is loaded back its users' way (diffusers' load_lora_weights; its kohya
converter; ComfyUI's keys through diffusers' LDM block mapper) and must draw the run's pixels exactly; the key names are
the ones the tools expect; a file that draws something else is not kept."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from sd_helpers import RESOLUTION, sd_cfg, tiny_sd  # noqa: E402

from tunesmith.export import ExportCheckFailed, ExportError, export_model  # noqa: E402
from tunesmith.export import lora_formats as lf  # noqa: E402
from tunesmith.images import model as M  # noqa: E402
from tunesmith.images import synth  # noqa: E402
from tunesmith.train import train  # noqa: E402

EXE = str(Path(sys.executable).parent / "tunesmith")
TINY = M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1, text_heads=2, text_ff=32)
LORA = ["objective.denoise.train_text_encoder=true", "train.max_steps=2", "eval.every_steps=2", "train.lr=2e-2",
        "method.lora.r=4", "method.lora.alpha=8"]


def _builtin_layout(folder: Path) -> Path:
    if not folder.exists():
        M.build_pipeline(TINY, seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-formats")
    out = {}
    sd2 = tiny_sd(root / "sd2", "DDIMScheduler", "v_prediction", linear_projection=True)
    for family, pipe, res in (("builtin", _builtin_layout(root / "if"), 16), ("sd1", tiny_sd(root / "sd1"), RESOLUTION),
                              ("sd2", sd2, RESOLUTION)):
        data = synth.write_dataset(root / f"data-{res}", "cross", n=8, seed=0, resolution=res)
        run = train(sd_cfg(pipe, data, root / f"run-{family}", *LORA), quiet=True)
        assert run.status == "completed"
        out[family] = {"run": run.output_dir, "pipe": pipe}
    return out


@pytest.mark.parametrize("family", ["builtin", "sd1", "sd2"])
def test_every_style_loads_back_drawing_the_runs_images(runs, family, tmp_path):
    res = export_model(runs[family]["run"], "adapter", tmp_path / "all", style="all")
    assert len(res.checks) == 3 and all(c.ok for c in res.checks), [str(c) for c in res.checks]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(list(lf.FILES.values()) + ["tunesmith.json"])
    manifest = json.loads((tmp_path / "all" / "tunesmith.json").read_text())
    assert manifest["lora_files"] == lf.FILES and manifest["kind"] == "text-to-image"
    for c in res.checks:
        assert "max |Δpixel| 0 of 255" in c.detail


def test_kohya_keys_are_the_a1111_layout(runs, tmp_path):
    """lora_unet_<diffusers module, dots as underscores>.lora_down/.lora_up/.alpha; lora_te_ for the text encoder;
    down = PEFT's A, up = B, alpha = the run's (8; rank 4)."""
    export_model(runs["sd1"]["run"], "adapter", tmp_path / "k", style="kohya")
    kohya = load_file(tmp_path / "k" / lf.FILES["kohya"])
    peft = load_file(runs["sd1"]["run"] / "best" / lf.FILES["diffusers"])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    a = peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    assert torch.equal(kohya[name + ".lora_down.weight"], a)
    assert torch.equal(kohya[name + ".lora_up.weight"],
                       peft["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"])
    assert float(kohya[name + ".alpha"]) == 8.0 and kohya[name + ".alpha"].dim() == 0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in kohya  # a conv 1x1 (SD 1.x)
    assert kohya["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].dim() == 4
    assert len(kohya) == 3 * (len(peft) // 2)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
    with safe_open(str(tmp_path / "k" / lf.FILES["kohya"]), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora" and f.metadata()["ss_network_dim"] == "4"


def test_comfyui_keys_are_its_ldm_names(runs, tmp_path):
    """The denoiser under diffusion_model.<LDM name> (down block 0's attention: input_blocks.1.1; the middle block's:
    middle_block.1; up block 1's two: output_blocks.2.1 and .3.1), the text encoder under kohya's lora_te_."""
    export_model(runs["sd1"]["run"], "adapter", tmp_path / "c", style="comfyui")
    comfy = load_file(tmp_path / "c" / lf.FILES["comfyui"])
    unet = sorted({k.split(".lora_")[0].rsplit(".alpha")[0] for k in comfy if k.startswith("diffusion_model.")})
    blocks = sorted({".".join(k.split(".")[1:4]) for k in unet})
    assert blocks == ["input_blocks.1.1", "middle_block.1.proj_in", "middle_block.1.proj_out",
                      "middle_block.1.transformer_blocks", "output_blocks.2.1", "output_blocks.3.1"]
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in comfy
    assert "diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.alpha" in comfy
    assert all(k.startswith(("diffusion_model.", "lora_te_text_model_")) for k in comfy)


def test_ldm_names_follow_comfyuis_block_numbering():
    arch = {"layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}  # SD 1.5's
    n = lambda m: lf.ldm_unet_name(m, arch)  # noqa: E731
    assert n("down_blocks.0.attentions.1.proj_in") == "input_blocks.2.1.proj_in"
    assert n("down_blocks.1.resnets.0.conv1") == "input_blocks.4.0.in_layers.2"
    assert n("down_blocks.2.downsamplers.0.conv") == "input_blocks.9.0.op"
    assert n("mid_block.resnets.1.time_emb_proj") == "middle_block.2.emb_layers.1"
    assert n("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k") == "output_blocks.5.1.transformer_blocks.0.attn2.to_k"
    assert n("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.1.conv"
    assert n("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert n("up_blocks.3.resnets.2.conv_shortcut") == "output_blocks.11.0.skip_connection"
    with pytest.raises(ExportError, match="no name in the LDM"):
        n("add_embedding.linear_1")


def test_rslora_alpha_is_rewritten_for_kohyas_scale(tmp_path):
    """PEFT's rsLoRA scales by alpha / sqrt(r); kohya by alpha / r: .alpha = alpha * sqrt(r) keeps the update."""
    state = {"a.to_q.lora_A.weight": torch.ones(4, 3), "a.to_q.lora_B.weight": torch.ones(5, 4)}
    out = lf.to_kohya(state, None, {"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert float(out["lora_unet_a_to_q.alpha"]) == pytest.approx(16.0)
    with pytest.raises(ExportError, match="DoRA"):
        lf.to_kohya(state, None, {"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(ExportError, match="--style 'a1111'"):
        lf.styles("a1111")


def test_a_file_that_draws_something_else_is_not_kept(runs, tmp_path, monkeypatch):
    real = lf.to_kohya

    def wrong_alpha(*a, **kw):  # a converter bug: alpha as if it were the rank
        out = real(*a, **kw)
        return {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in out.items()}

    monkeypatch.setattr(lf, "to_kohya", wrong_alpha)
    out = tmp_path / "bad"
    with pytest.raises(ExportCheckFailed, match="not kept"):
        export_model(runs["sd1"]["run"], "adapter", out, style="kohya")
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_the_cli_flag(runs, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([EXE, "export", str(runs["builtin"]["run"]), "--format", "adapter", "--style", "kohya",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok   lora_kohya.safetensors: pipe.load_lora_weights(kohya state dict)" in proc.stdout
    assert "lora_kohya.safetensors in A1111" in proc.stdout and (out / "lora_kohya.safetensors").is_file()
    proc = subprocess.run([EXE, "export", str(runs["builtin"]["run"]), "--format", "diffusers", "--style", "kohya",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "goes with --format adapter" in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("style", lf.STYLES)
def test_each_file_carries_both_networks_adapters(runs, style, tmp_path):
    """Loaded back, each file gives the text encoder and the denoiser the run's very outputs (not only the same
    pixels after sampling): no adapter dropped on the way, scales as trained."""
    from diffusers import DiffusionPipeline

    from tunesmith.models.diffusion import load_tuned_pipeline

    export_model(runs["sd1"]["run"], "adapter", tmp_path / style, style=style, verify=False)
    tuned = load_tuned_pipeline(runs["sd1"]["run"] / "best")
    loaded = DiffusionPipeline.from_pretrained(str(runs["sd1"]["pipe"]))
    lf.load_style(loaded, style, tmp_path / style)
    base = DiffusionPipeline.from_pretrained(str(runs["sd1"]["pipe"]))
    ids = tuned.tokenizer(["two small red crosses"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    with torch.no_grad():
        outs = [(p.text_encoder(ids)[0], p.unet(x, t, encoder_hidden_states=torch.ones(1, 77, 16)).sample)
                for p in (tuned, loaded, base)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.allclose(outs[0][0], outs[2][0]) and not torch.allclose(outs[0][1], outs[2][1])


def test_the_merged_pipeline_of_an_sd2_run(runs, tmp_path):
    """--format diffusers on the SD 2.x layout: the LoRA fused into a pipeline folder that draws the run's images
    (within PIXEL_TOLERANCE levels: the merge sums W + BA once)."""
    res = export_model(runs["sd2"]["run"], "diffusers", tmp_path / "merged")
    assert len(res.checks) == 2 and all(c.ok for c in res.checks), [str(c) for c in res.checks]
