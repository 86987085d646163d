"""The shipped built-in image model: its folder, its size, and that it draws what it is asked (a quick sample; the
full figures are `python -m tunesmith.images.measure`, in its model card)."""

import json

import torch
from diffusers import IFPipeline

from tunesmith.images import detector, measure, synth


def test_builtin_folder_is_small_and_complete():
    folder = measure.BUILTIN
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 50e6
    assert {f.relative_to(folder).as_posix() for f in files} >= {
        "model_index.json", "README.md", "pretrain.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    card = (folder / "README.md").read_text()
    assert "Measured quality" in card and "**cross**" in card and "**purple**" in card
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "IFPipeline"


def test_builtin_draws_what_it_is_asked_and_not_the_held_out_shape():
    torch.set_num_threads(2)
    pipe = measure.load()
    assert isinstance(pipe, IFPipeline)
    captions = measure.in_distribution_captions(8, seed=7)
    result = detector.score(measure.generate(pipe, captions, seed=0), captions)
    # measured on 96 images: every attribute 100% but count, 91.7%; these 8 on an AMD EPYC: all 6 of 8 (count 6 of 8),
    # every other attribute 8 of 8. One image of slack each for CPUs that sum in another order.
    per = result["per_attribute"]
    assert min(per[k] for k in ("shape", "colour", "size", "background")) >= 7 / 8, result["rows"]
    assert result["all_correct"] >= 5 / 8, result["rows"]
    crosses = measure.heldout_captions(synth.HELD_OUT["shape"], 8, seed=7)
    res = detector.score(measure.generate(pipe, crosses, seed=0), crosses)
    assert measure.concept_rate(res, "cross") <= 2 / 8, res["rows"]


def test_loading_the_builtin_model_prints_nothing():
    """In a fresh process, tunesmith's two loaders of the built-in model print nothing: not diffusers' warning that
    IFPipeline's annotation expects a T5EncoderModel (the built-in CLIPTextModel serves the pipeline's one call; that
    warning and only that one is dropped), not transformers' torchvision fallback notice, no progress bars."""
    import logging
    import subprocess
    import sys

    from tunesmith.models.diffusion import _BuiltinAnnotationFilter

    code = ("from tunesmith.images import measure; from tunesmith.models.diffusion import load_pipeline; "
            "load_pipeline(measure.BUILTIN); measure.load(); print('loaded')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "loaded\n", proc.stderr[-2000:]
    for noise in ("Expected types", "requires torchvision", "Loading weights", "Loading pipeline components"):
        assert noise not in proc.stderr, proc.stderr[-2000:]

    def record(text):
        return logging.LogRecord("diffusers.pipelines.pipeline_utils", logging.WARNING, __file__, 0, text, None, None)

    keep = _BuiltinAnnotationFilter().filter
    assert not keep(record("Expected types for text_encoder: (<class 'transformers.models.t5.modeling_t5."
                           "T5EncoderModel'>,), got <class 'transformers.models.clip.modeling_clip.CLIPTextModel'>."))
    assert keep(record("Expected types for unet: (<class 'diffusers.UNet2DConditionModel'>,), got <class 'int'>."))
    assert keep(record("Expected types for text_encoder: (<class 'transformers.models.t5.modeling_t5."
                       "T5EncoderModel'>,), got <class 'transformers.models.bert.modeling_bert.BertModel'>."))
