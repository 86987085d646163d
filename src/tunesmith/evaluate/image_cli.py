"""`tunesmith generate` and `tunesmith eval` for a text-to-image model (a run, its best/, a pipeline folder, the
built-in image alias); cli.py and cli_eval.py hand over here when ``models.diffusion.text_to_image_folder`` finds one.

generate: ``--n`` PNGs per prompt, image i of every prompt drawn from seed ``--seed + i`` (so one prompt's images differ,
the same seed gives the same image again, and two models compare image for image), listed in DIR/images.jsonl.

eval: base versus tuned on held-out prompts, the images of both from the same seeds (those of the run's end-of-run
comparison: objectives.denoise.Denoise.draw, seeded by the run's train.seed), judged by the detector where the captions
are the built-in world's (and control prompts of that world, to show old concepts kept), and by a CLIP score with
``--clip-model FOLDER``. Files in --out (default RUN/eval/NAME for a run): eval.json, eval.md, base.png, tuned.png.

Prompts (--data) are read before any model loads: a folder of captioned images or its metadata file (the captions),
a rows file (.jsonl/.csv/.parquet) of images and captions, a JSONL file of prompts (a ``prompt``, ``text`` or
``caption`` field per line, or a JSON string), or a .txt file with one prompt a line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

PROMPT_FIELDS = ("prompt", "text", "caption")
DEFAULT_IMAGES = 4  # generate --n


# ---------------------------------------------------------------- prompts


def read_prompts(path) -> list[str]:
    """The prompts of ``path`` in order (see the module docstring); DataError naming the file and line otherwise."""
    from ..data.errors import DataError, Issue
    from ..data.images import IMAGE_COLUMNS, read_image_rows

    src = Path(path).expanduser()
    if not src.exists():
        raise DataError([Issue("E016", "file or folder not found", str(src))])
    if src.is_dir() or src.name.startswith("metadata.") or src.suffix.lower() in (".csv", ".parquet") or (
            src.suffix.lower() == ".jsonl" and _has_image_column(src, IMAGE_COLUMNS)):
        records, _, issues = read_image_rows(src)
        if issues:
            raise DataError(issues)
        return [r.caption for r in records]
    if src.suffix.lower() == ".txt":
        return [line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts, issues = [], []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            issues.append(Issue("E003", f"malformed JSON: {e}", str(src), n))
            continue
        text = row if isinstance(row, str) else next(
            (row[k] for k in PROMPT_FIELDS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if not text or not text.strip():
            issues.append(Issue("E006", f"no prompt: give a {' / '.join(PROMPT_FIELDS)} field (a string)", str(src), n))
        else:
            prompts.append(text.strip())
    if issues:
        raise DataError(issues)
    if not prompts:
        raise DataError([Issue("E001", "no prompts in the file", str(src))])
    return prompts


def _has_image_column(path: Path, columns) -> bool:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                return False
            return isinstance(row, dict) and any(c in row for c in columns)
    return False


# ---------------------------------------------------------------- settings


def run_settings(folder: Path):
    """(DenoiseConfig, seed) of the run that delivered ``folder`` (its best/ or final/), else the defaults and 0."""
    import yaml

    from ..config import DenoiseConfig

    resolved = folder.parent / "config.resolved.yaml"
    if not resolved.is_file():
        return DenoiseConfig(), 0
    cfg = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
    return (DenoiseConfig.model_validate(((cfg.get("objective") or {}).get("denoise")) or {}),
            int((cfg.get("train") or {}).get("seed", 0)))


def _base_ref(folder: Path) -> str | None:
    from ..models import MANIFEST

    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError):
        return None


def _image_folder(ref: str, what: str) -> Path:
    from ..models import ModelError
    from ..models.diffusion import text_to_image_folder

    folder = text_to_image_folder(ref)
    if folder is None:
        raise ModelError(f"{what} {ref!r} is not a text-to-image model (a diffusers pipeline folder, a run that tuned "
                         "one, or the built-in image alias)")
    return folder


# ---------------------------------------------------------------- generate


def generate(args, folder: Path) -> int:
    """`tunesmith generate` for the text-to-image model in ``folder``: PNGs and DIR/images.jsonl."""
    from ..config import ConfigError
    from ..models.diffusion import load_tuned_pipeline
    from .images import generate_images

    if not args.out:
        raise ConfigError("--out DIR is required for a text-to-image model: the folder the PNGs are written to")
    n = DEFAULT_IMAGES if args.n is None else args.n
    if n < 1 or (args.steps is not None and args.steps < 1):
        raise ConfigError("--n and --steps must be at least 1")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.data)  # before the model loads
    settings, _ = run_settings(folder)
    steps = args.steps or settings.inference_steps
    guidance = settings.guidance_scale if args.guidance is None else args.guidance
    _status(f"drawing {n} image(s) for each of {len(prompts)} prompt(s) with {folder}: {steps} steps, guidance "
            f"{guidance:g}, image i of a prompt from seed {args.seed} + i")
    pipe = load_tuned_pipeline(folder)
    seeds = [args.seed + i for _ in prompts for i in range(n)]
    images = generate_images(pipe, [p for p in prompts for _ in range(n)], seeds, steps=steps, guidance=guidance)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    with open(out / "images.jsonl", "w", encoding="utf-8") as f:
        for k, (im, seed) in enumerate(zip(images, seeds)):
            p, i = divmod(k, n)
            name = f"{p:03d}-{_slug(prompts[p])}-{i}.png"
            Image.fromarray(im).save(out / name)
            f.write(json.dumps({"file": name, "prompt": prompts[p], "seed": seed, "steps": steps,
                                "guidance": guidance, "model": str(folder)}, ensure_ascii=False) + "\n")
    print(f"wrote {len(images)} images to {out} (listed in {out / 'images.jsonl'})")
    return 0


def _slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "prompt"


# ---------------------------------------------------------------- eval


def evaluate(args, folder: Path) -> int:
    """`tunesmith eval` for the text-to-image model in ``folder``: base versus tuned on --data's prompts."""
    from ..config import ConfigError
    from ..models.diffusion import load_tuned_pipeline
    from ..objectives.denoise import CONTROL_PROMPTS, Denoise, builtin_world, control_prompts
    from ..train.steps import Compute
    from .images import caption_accuracy, detector_comparison, save_grid

    prompts = list(dict.fromkeys(read_prompts(args.data)))  # inputs first: nothing waits for a model to load
    prompts = prompts[:args.limit] if args.limit else prompts
    if (args.n is not None and args.n < 1) or (args.steps is not None and args.steps < 1):
        raise ConfigError("--n and --steps must be at least 1")
    settings, seed = run_settings(folder)
    update = {k: v for k, v in (("images_per_prompt", args.n), ("inference_steps", args.steps),
                                ("guidance_scale", args.guidance)) if v is not None}
    obj = Denoise(settings.model_copy(update=update), seed=seed)
    n = obj.settings.images_per_prompt
    control = control_prompts(obj.settings, prompts, max(CONTROL_PROMPTS, len(prompts)))
    baseline = None if args.no_baseline else (args.baseline or _base_ref(folder))
    base_folder = _image_folder(baseline, "--baseline") if baseline else None
    clip = None
    if args.clip_model:
        from .clip import ClipScorer

        clip = ClipScorer(args.clip_model)

    everything = prompts + control
    _status(f"model {args.model}: drawing {n} image(s) for each of {len(prompts)} prompts from {args.data}"
            + (f" and {len(control)} control prompts" if control else ""))
    tuned = obj.draw(load_tuned_pipeline(folder), everything, Compute())
    base = None
    if base_folder is not None:
        _status(f"baseline {baseline}: the same prompts and seeds")
        base = obj.draw(load_tuned_pipeline(base_folder), everything, Compute())

    k = len(prompts) * n
    captions = [p for p in prompts for _ in range(n)]
    result = {"kind": "text-to-image", "data": str(args.data), "prompts": len(prompts), "images_per_prompt": n,
              "model": str(args.model), "baseline": baseline, "control_prompts": len(control),
              "settings": {"inference_steps": obj.settings.inference_steps, "guidance_scale":
                           obj.settings.guidance_scale, "seed": seed, "bootstrap": args.bootstrap},
              "detector": None, "clip": None}
    if base is not None:
        result["detector"] = detector_comparison(base, tuned, prompts, control, n) or None
    elif builtin_world(prompts):
        result["detector"] = {"tuned_accuracy": float(np.mean(caption_accuracy(tuned[:k], captions)))}
    if clip is not None:
        result["clip"] = _clip_figures(clip, base, tuned, captions, k, args.bootstrap)
    out = Path(args.out) if args.out else _default_out(args.model, args.data)
    table = format_table(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_grid(tuned, out / "tuned.png", columns=n)
        if base is not None:
            save_grid(base, out / "base.png", columns=n)
        (out / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        (out / "eval.md").write_text(table + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2) if args.json else table)
    if out is not None and not args.json:
        print(f"\nwrote {out / 'eval.json'}, {out / 'eval.md'} and the image grids ({out})")
    return 0


def _clip_figures(clip, base, tuned, captions: list[str], k: int, n_boot: int) -> dict:
    """Each side's mean CLIP score on the held-out prompts' images, and the paired difference with its 95% CI."""
    from .compare import paired_bootstrap_ci

    t = np.asarray(clip.scores(tuned[:k], captions))
    out = {"model": str(clip.folder), "what": "100 x max(cos(CLIP image, CLIP text), 0), mean over images "
                                             "(torchmetrics' CLIPScore)", "tuned": float(t.mean())}
    if base is not None:
        b = np.asarray(clip.scores(base[:k], captions))
        low, high = paired_bootstrap_ci(t - b, n_boot=n_boot)
        out |= {"base": float(b.mean()), "diff": float((t - b).mean()), "ci_low": low, "ci_high": high}
    return out


def format_table(result: dict) -> str:
    lines = [f"{result['prompts']} prompts x {result['images_per_prompt']} images from {result['data']}",
             f"model:    {result['model']}"]
    if result["baseline"]:
        lines.append(f"baseline: {result['baseline']}")
    d, c = result["detector"], result["clip"]
    if result["baseline"]:
        lines += ["", "| figure | baseline | model | delta | 95% CI of delta |", "|---|---:|---:|---:|---:|"]
        if d and "base_accuracy" in d:
            lines.append(f"| detector accuracy | {d['base_accuracy']:.3f} | {d['tuned_accuracy']:.3f} | "
                         f"{d['diff']:+.3f} | {d['ci_low']:+.3f} to {d['ci_high']:+.3f} |")
        if d and "control_base_accuracy" in d:
            lines.append(f"| control accuracy | {d['control_base_accuracy']:.3f} | {d['control_tuned_accuracy']:.3f} "
                         f"| {d['control_tuned_accuracy'] - d['control_base_accuracy']:+.3f} | |")
        if c:
            lines.append(f"| CLIP score | {c['base']:.2f} | {c['tuned']:.2f} | {c['diff']:+.2f} | "
                         f"{c['ci_low']:+.2f} to {c['ci_high']:+.2f} |")
    else:
        lines += ["", "| figure | model |", "|---|---:|"]
        if d:
            lines.append(f"| detector accuracy | {d['tuned_accuracy']:.3f} |")
        if c:
            lines.append(f"| CLIP score | {c['tuned']:.2f} |")
    if not d and not c:
        lines += ["", "no figure: the captions are not the built-in world's (the detector cannot read them); give "
                      "--clip-model FOLDER for a CLIP score. The images are in base.png and tuned.png"]
    lines += ["", "detector accuracy: the share of images the built-in world's detector reads back as captioned; CLIP "
                  "score: 100 x max(cosine of CLIP image and text embeddings, 0). CI: paired bootstrap over images."]
    return "\n".join(lines)


def _default_out(model_ref: str, data: str) -> Path | None:
    folder = Path(model_ref).expanduser()
    if (folder / "config.resolved.yaml").is_file():
        return folder / "eval" / Path(data).stem
    return None


def _status(text: str) -> None:
    print(text, file=sys.stderr)
