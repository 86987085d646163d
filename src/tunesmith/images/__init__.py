"""Text-to-image: the built-in image model and the synthetic world it is trained and judged on.

- `synth`: seeded captioned scenes of shapes (a shape and a colour held out of pre-training), fine-tuning folders
- `detector`: reads an image back into attributes; scores images against captions
- `model`: the pipeline's standard parts (diffusers IFPipeline layout: T5 encoder, UNet2DConditionModel, scheduler)
- `pretrain`: reproduces the shipped weights (`python -m tunesmith.images.pretrain --out DIR --seed 0`)
- `measure`: `quality(pipe)` and `python -m tunesmith.images.measure`, the detector's figures for a pipeline
- `builtin/`: the shipped pipeline folder, with its model card

`load_builtin()` and `quality()` are here too; torch and diffusers are imported only when they are used.
"""

from pathlib import Path

BUILTIN = Path(__file__).parent / "builtin"


def load_builtin():
    """The built-in image pipeline (a diffusers IFPipeline), loaded from the package."""
    from .measure import load

    return load(BUILTIN)


def quality(pipe, **kwargs) -> dict:
    """The detector's figures for a pipeline; see `tunesmith.images.measure.quality`."""
    from .measure import quality as _quality

    return _quality(pipe, **kwargs)
