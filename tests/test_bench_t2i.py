"""The text-to-image LoRA benchmark (bench/bench_t2i_lora.py) runs: its smoke mode, the real command on the tiny
pipeline, trains with both tools, and scores both LoRA files with one function after loading them the way diffusers
users do. And the baseline trains what diffusers' example trains: the same LoRA layers, rank and alpha as the
tunesmith run it is compared with."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("datasets", reason="the baseline reads its images with datasets (pip install -e '.[bench]')")
    out = tmp_path_factory.mktemp("bench-t2i")
    proc = subprocess.run([sys.executable, str(BENCH / "bench_t2i_lora.py"), "--smoke", "--work", str(out / "work"),
                           "--out", str(out / "t2i_lora.json")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((out / "t2i_lora.json").read_text()), proc.stdout


def test_smoke_mode_trains_both_tools_and_scores_both_files(smoke):
    result, stdout = smoke
    runs, steps = result["runs"], result["args"]["steps"]
    assert set(runs) == {"tunesmith", "diffusers"}
    for name, r in runs.items():
        assert len(r["train_losses"]) == steps and all(math.isfinite(x) for x in r["train_losses"]), name
        assert r["steps_timed"] == steps - 1 and r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0, name
        assert r["peak_rss_mb"] > 100, name  # torch alone is more
        # the LoRA file, loaded onto the base with load_lora_weights, changes the model: it was trained and read back
        assert math.isfinite(r["val_loss"]) and r["val_loss"] != result["base_val_loss"], name
    assert runs["tunesmith"]["precision"] == "float32" and runs["diffusers"]["mixed_precision"] == "no"
    pair = result["summary"]["same_precision_fp32"]
    assert pair["speed_ratio"] == pytest.approx(runs["tunesmith"]["images_per_s"] / runs["diffusers"]["images_per_s"])
    assert "same_precision_fp32: speed" in stdout


def test_both_tools_train_the_same_lora_layers(smoke):
    """The same adapters in both files: the example's to_q/to_k/to_v/to_out.0 of every attention, rank 4, alpha 4
    (tunesmith's PEFT key names and the example's diffusers names differ; the layers and shapes must not)."""
    from safetensors import safe_open

    result, _ = smoke
    layers = {}
    for name, r in result["runs"].items():
        with safe_open(str(Path(r["adapter"]) / "pytorch_lora_weights.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        # unet.<module>.lora_A.weight (PEFT's names) / unet.<module>.lora.down.weight (the example's, converted)
        layers[name] = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): s
                        for k, s in shapes.items()}
    assert layers["tunesmith"] == layers["diffusers"]
    modules = {k.split(".lora_")[0] for k in layers["tunesmith"]}
    assert {m.rsplit(".", 2 if m.endswith(".0") else 1)[1] for m in modules} == {"to_q", "to_k", "to_v", "to_out"}
    assert {s for k, s in layers["tunesmith"].items() if ".lora_A." in k} <= {(4, 32), (4, 64)}  # rank 4
