"""DreamBooth on the built-in image model: a subject taught under a rare token, with and without prior preservation.

    python examples/dreambooth/run.py                 # about 4 minutes on 2 shared CPU cores; prints the figures
    python examples/dreambooth/run.py --steps 200 --n 64 --json figures.json

The subject: 5 images of one object (a large circle of a colour the base model never saw, on white, placed anywhere),
no captions: the instance prompt captions them. Its identifier is "purple", the one colour word of the model's
vocabulary that pre-training never used: a single token with no prior, the rare token DreamBooth asks for. ("sks" would
be spelled letter by letter into 4 tokens, and this model reads attributes by token position, so the rest of the
prompt would move 3 places and share nothing with the class prompt: with "a large sks circle on a white background"
the class prompt did not collapse even without prior preservation.) The class prompt is the instance prompt with a
colour the model knows in the identifier's place. Two fine-tunes with the same seed, steps and settings (full, text
encoder trained, lr 2e-4, 4 pairs a step), one with prior preservation (50 images the base model draws of the class
prompt, once, cached) and one without; then the detector (tunesmith.images.detector) reads images back:

- class prompt accuracy: class-prompt images read back as captioned (base, then each tuned model); the collapse that
  prior preservation prevents is this falling as the class prompt draws the subject instead;
- class drawn as the subject: class-prompt images read as the subject's colour;
- subject learned: instance-prompt images read as the subject (a large purple circle on white);
- other captions: in-distribution captions of the built-in world read back as captioned (what else is kept).

Every image comes from fixed seeds, the same for the base and both tuned models.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tunesmith.config import load_config
from tunesmith.images import BUILTIN, detector, measure, synth
from tunesmith.models.diffusion import load_tuned_pipeline
from tunesmith.train import train

INSTANCE = "a large purple circle on a white background"  # "purple": never trained
CLASS = "a large red circle on a white background"
SUBJECT = INSTANCE  # what the subject is, in words the detector reads
SUBJECT_COLOUR = "purple"


def write_subject(folder: Path, n: int, seed: int) -> Path:
    """n images of the subject (one object, its colour, size and background fixed; placed anywhere), no captions."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = synth.sample_scenes(n, seed, shape="circle", colour=SUBJECT_COLOUR, size="large", count=1,
                                 background="white", p_position=0.0)
    for i, scene in enumerate(scenes):
        synth.render(scene).save(folder / f"{i:02d}.png")
    return folder


def figures(pipe, n: int, seed: int) -> dict:
    """The detector's figures for one pipeline, every image from fixed seeds."""
    cls = measure.generate(pipe, [CLASS] * n, seed=seed)
    inst = measure.generate(pipe, [INSTANCE] * n, seed=seed + 100)
    others = measure.in_distribution_captions(n)
    other = measure.generate(pipe, others, seed=seed + 200)
    read_cls = detector.score(list(cls), [CLASS] * n)
    return {"class_accuracy": read_cls["all_correct"],
            "class_as_subject": float(np.mean([r["read"]["colour"] == SUBJECT_COLOUR for r in read_cls["rows"]])),
            "subject_learned": detector.score(list(inst), [SUBJECT] * n)["all_correct"],
            "other_accuracy": detector.score(list(other), others)["all_correct"]}


def config(data: Path, out: Path, prior: bool, steps: int, seed: int, class_images: int):
    return load_config(None, [
        f"model.name={BUILTIN}", f"data.train={data}", "data.valid_fraction=0", f"output_dir={out}",
        "objective.name=denoise", "method.name=full", "train.batch_size=4", f"train.max_steps={steps}",
        "train.lr=2e-4", "train.schedule=constant", "train.warmup_steps=10", f"train.seed={seed}",
        "train.log_every=25", "eval.compare_base=false", f"checkpoint.every_steps={steps}",
        "objective.denoise.train_text_encoder=true", "objective.denoise.caption_dropout=0.1",
        f"objective.denoise.dreambooth.instance_prompt={INSTANCE}",
        f"objective.denoise.dreambooth.class_prompt={CLASS}",
        f"objective.denoise.dreambooth.prior_preservation={str(prior).lower()}",
        f"objective.denoise.dreambooth.num_class_images={class_images}", "objective.denoise.dreambooth.class_seed=0"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--subject-images", type=int, default=5)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--n", type=int, default=48, help="images per figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the data and the runs (default: a temporary one)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="dreambooth-"))
    data = write_subject(work / "subject", args.subject_images, args.seed)
    result = {"settings": vars(args) | {"instance_prompt": INSTANCE, "class_prompt": CLASS},
              "base": figures(measure.load(), args.n, 7)}
    for name, prior in (("without_prior", False), ("with_prior", True)):
        t0 = time.time()
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        run = train(config(data, out, prior, args.steps, args.seed, args.class_images), quiet=True)
        pipe = load_tuned_pipeline(run.output_dir / "best")
        pipe.set_progress_bar_config(disable=True)
        result[name] = figures(pipe, args.n, 7) | {"seconds": round(time.time() - t0, 1)}
    print(f"DreamBooth on the built-in model: {args.subject_images} subject images, {args.steps} steps x 4 pairs, "
          f"{args.class_images} class images, {args.n} images per figure, seed {args.seed}")
    print(f"{'':28}{'base':>8}{'no prior':>10}{'prior':>8}")
    rows = (("class prompt accuracy", "class_accuracy"), ("class drawn as the subject", "class_as_subject"),
            ("subject learned", "subject_learned"), ("other captions accuracy", "other_accuracy"))
    for label, key in rows:
        print(f"{label:28}" + "".join(f"{result[k][key]:>{w}.1%}" for k, w in (("base", 8), ("without_prior", 10),
                                                                              ("with_prior", 8))))
    print(f"seconds (train + measure): no prior {result['without_prior']['seconds']}, prior "
          f"{result['with_prior']['seconds']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
