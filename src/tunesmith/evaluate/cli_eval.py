"""`tunesmith eval MODEL --data TEST.jsonl [--baseline REF]`: a model on a test file, and against a baseline.

A text-to-image model (a pipeline folder, a run that tuned one, the built-in image alias) goes to image_cli.py: its
images for held-out prompts, base versus tuned, judged by the detector and, with --clip-model, a CLIP score.

The arguments are declared in cli.py (importing this package loads torch, too slow for `tunesmith --help`).

Order of work: read and validate the data and the metric names (bad input exits 2 before any model
loads), load the model, pick the baseline (for a run folder or a saved model: the base it was tuned
from, unless --baseline names another), generate every answer in batches, score, compare.

A LoRA model against its own base is one model: the baseline answers come from the same weights with the
adapters switched off (``evaluate.base.base_model``), so the base is never loaded twice. Both sides use the tuned
model's tokenizer then (the chat template the model was trained with), as the end-of-run comparison does.
For a run (its folder, best/ or final/) the loss is the run's validation loss: the examples rendered with the
run's data settings (train_on, max_length, overflow) and scored by training's loss, so on the run's validation
file it is the val_loss the run logged for the delivered weights.

A file of preference pairs is scored against the chosen answers as references, and each side's preference accuracy
(the share of pairs whose chosen answer it gives a higher log-probability) is compared with a paired bootstrap CI.
A test file of prompts without reference answers (a conversation ending with the user's turn, {"prompt"},
kto's labelled answers) is answered by both sides all the same; the metrics and the loss, which need a reference
for every prompt, are skipped, and eval.json's ``skipped`` says which and why.

Files written to --out (default RUN/eval/<test file name>/ for a run folder, nothing otherwise):
  eval.json          settings, both sides' metrics and loss, comparison per metric, timings; the same
                     fields as a run's compare.json (base, tuned, comparison, samples) plus more
  predictions.jsonl  one line per example: prompt, reference, both answers, per-metric scores, the winner
  eval.md            the table printed on screen
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run(args) -> int:
    from .. import data as tsdata
    from ..config import ConfigError
    from ..data.example import prompt_and_optional_reference

    from ..models.diffusion import text_to_image_folder

    image = text_to_image_folder(args.model)
    if image is not None:  # a text-to-image model: its images judged (image_cli.py)
        from .image_cli import evaluate

        return evaluate(args, image)
    image_flags = [f for f, v in (("--n", getattr(args, "n", None)), ("--steps", getattr(args, "steps", None)),
                                  ("--guidance", getattr(args, "guidance", None)),
                                  ("--clip-model", getattr(args, "clip_model", None))) if v is not None]
    if image_flags:
        raise ConfigError(f"{', '.join(image_flags)}: settings for a text-to-image model, and {args.model} is a "
                          "language model")

    # 1. Inputs first: a bad file or metric name never waits for a model to load.
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.bootstrap < 1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--batch-size, --max-new-tokens, --bootstrap and --limit must be at least 1")
    pair_records = _pairs(args.data, args.format)  # preference pairs: which answer each model prefers, too
    examples = (tsdata.load_examples(args.data, args.format, prompt_only=True) if pair_records is None else
                [tsdata.Example(tuple(p.prompt) + (p.chosen,), None, p.origin) for p in pair_records])  # chosen: reference
    chats = [e for e in examples if e.messages]
    if not chats:
        raise ConfigError(f"{args.data}: no conversation with an assistant answer to score against, nor a prompt "
                          f"to answer ({len(examples)} records read); eval needs chat-style examples")
    chats = chats[:args.limit] if args.limit else chats
    pairs = [prompt_and_optional_reference(e) for e in chats]
    convs, refs = [p for p, _ in pairs], [r for _, r in pairs]
    metrics = metric_names(args.metrics, args.primary)
    skipped = skipped_metrics(chats, refs, metrics)
    if skipped:  # prompts without references: the answers side by side, and what needs no reference
        _status(f"not scored ({', '.join(skipped['metrics'])}): {skipped['reason']}")
        metrics = []


    # 2. Models.
    tuned, tok, saved = _load(args.model)
    baseline_ref = None if args.no_baseline else (args.baseline or _manifest(saved).get("base_model"))
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, metrics=metrics, examples=chats,
              data=_run_data(saved))
    _status(f"model {args.model}: answering {len(convs)} prompts from {args.data}")
    model_res, t_model = _timed(lambda: _evaluate(tuned, tok, convs, refs, kw))
    pair_data = _pair_data(_run_data(saved))
    prefers = {"tuned": _prefers(tuned, tok, pair_records, pair_data, args.batch_size)}
    base_res, t_base, how = None, None, None
    if baseline_ref:
        from .base import base_model

        own = _own_base(baseline_ref, saved)
        with base_model(tuned, baseline_ref, own_base=own) as base:
            how = _how(base, own)
            _status(f"baseline {baseline_ref} ({how}): answering the same prompts")
            base_tok = tok if own else base.tokenizer  # the run's own base: the chat template the run trained with
            base_res, t_base = _timed(lambda: _evaluate(base.model, base_tok, convs, refs, kw))
            prefers["base"] = _prefers(base.model, base_tok, pair_records, pair_data, args.batch_size)

    # 3. Scores, files, the table.
    result = build_result(args, convs, refs, model_res, base_res, baseline_ref, how, metrics,
                          {"model_s": round(t_model, 2), "baseline_s": round(t_base, 2) if t_base else None})
    if skipped:
        result["skipped"] = skipped
    if pair_records:
        from ..objectives.preference import preference_comparison

        result["preference"] = (preference_comparison(prefers["base"], prefers["tuned"], str(args.data), args.bootstrap)
                                if "base" in prefers else
                                {"pairs": len(pair_records), "tuned_accuracy": sum(prefers["tuned"]) / len(pair_records)})
    out = Path(args.out) if args.out else _default_out(args.model, args.data)
    table = format_table(result)
    if out is not None:
        write_outputs(out, result, convs, refs, model_res, base_res, table)
    if args.json:
        print(json.dumps(_without_bulk(result), indent=2))
    else:
        print(table)
        if out is not None:
            print(f"\nwrote {out / 'eval.json'}, {out / 'predictions.jsonl'} and {out / 'eval.md'}")
    return 0


def metric_names(extra: list[str], primary: str) -> list[str]:
    """The default metrics plus the extra ones, each checked (custom ones imported) now."""
    from ..config import ConfigError
    from .metrics import DEFAULT_METRICS, get_metric

    names = list(dict.fromkeys([*DEFAULT_METRICS, *extra, primary]))
    if any(":" in n for n in names) and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--metric my_metrics:f1` means my_metrics.py here, as with `python -m`
    for name in names:
        try:
            get_metric(name)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
    return names


def skipped_metrics(chats, refs, metrics: list[str]) -> dict | None:
    """{"metrics", "reason"} when some prompt has no reference: every metric, and the loss, needs one for each."""
    missing = [e.origin for e, r in zip(chats, refs) if r is None]
    if not missing:
        return None
    return {"metrics": [*metrics, "loss", "perplexity"],
            "reason": f"{len(missing)} of {len(refs)} prompts have no reference answer (the first: {missing[0]}); "
                      "end a conversation with the expected assistant answer to score it"}


def build_result(args, convs, refs, model_res, base_res, baseline_ref, how, metrics, timings) -> dict:
    """eval.json: the fields of a run's compare.json (base, tuned, comparison, samples) and the rest."""
    from .compare import compare_results

    result = {"data": str(args.data), "source": str(args.data), "examples": len(refs), "model": str(args.model),
              "baseline": baseline_ref, "baseline_how": how, "primary": args.primary, "metrics": metrics,
              "settings": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                           "bootstrap": args.bootstrap, "decoding": "greedy"},
              "timings": timings, "tuned": model_res.to_json()}
    if base_res is not None:
        # From the scores both sides already hold: nothing is scored again per compared metric.
        comparisons = {m: compare_results(base_res, model_res, metric=m, n_boot=args.bootstrap) for m in metrics}
        result |= {"base": base_res.to_json(),
                   "comparison": _cmp_json(comparisons[args.primary]) if comparisons else None,
                   "comparisons": {m: _cmp_json(c) for m, c in comparisons.items()}}
    result["samples"] = [{"prompt": c[-1]["content"], "reference": r, "tuned": t,
                          **({"base": base_res.predictions[i]} if base_res is not None else {})}
                         for i, (c, r, t) in enumerate(zip(convs, refs, model_res.predictions))][:10]
    return result


def format_table(result: dict) -> str:
    """Markdown, readable as plain text: one row per metric, then loss and perplexity, then the verdict (and the
    preference accuracy, for a file of pairs)."""
    return "\n".join([_table(result)] + _preference_lines(result))


def _preference_lines(result: dict) -> list[str]:
    pref = result.get("preference")
    if not pref:
        return []
    if "base_accuracy" not in pref:
        return ["", f"preference accuracy on {pref['pairs']} pairs: {pref['tuned_accuracy']:.3f} (the share whose "
                    f"chosen answer the model gives a higher log-probability than the rejected one)"]
    from ..objectives.preference import format_preference

    return ["", format_preference(pref).replace("base", "baseline").replace("tuned", "model")]


def _table(result: dict) -> str:
    from .compare import _fmt, _fmt_delta

    tuned = _summary(result["tuned"])
    lines = [f"{result['examples']} examples from {result['data']}", f"model:    {result['model']}"]
    if "base" not in result:
        lines += ["", "| metric | model |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in tuned.items()]
        return "\n".join(lines + _skipped_lines(result))
    base, cmps = _summary(result["base"]), result["comparisons"]
    lines += [f"baseline: {result['baseline']} ({result['baseline_how']})", "",
              "| metric | baseline | model | delta | 95% CI of delta | wins/losses/ties |", "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys([*base, *tuned]):
        c = cmps.get(name)
        ci = f"{c['ci_low']:+.4f} to {c['ci_high']:+.4f}{' *' if c['significant'] else ''}" if c else ""
        wlt = f"{c['wins']}/{c['losses']}/{c['ties']}" if c else ""
        lines.append(f"| {name} | {_fmt(base.get(name))} | {_fmt(tuned.get(name))} | "
                     f"{_fmt_delta(base.get(name), tuned.get(name))} | {ci} | {wlt} |")
    c = result["comparison"]
    if c is None:  # nothing scored: the answers are side by side in predictions.jsonl
        return "\n".join(lines + _skipped_lines(result))
    sig = "significant" if c["significant"] else "not significant"
    lines += ["", "CI: paired bootstrap of the mean per-example difference (model - baseline) on the per-example "
              "scores (sentence-level for chrf/bleu); * = excludes 0. Loss and perplexity: lower is better.",
              f"{c['metric']}: model wins {c['wins']}, loses {c['losses']}, ties {c['ties']} of {c['n']}; mean "
              f"difference {c['diff']:+.4f} (95% CI {c['ci_low']:+.4f} to {c['ci_high']:+.4f}, {sig})"]
    return "\n".join(lines)


def _skipped_lines(result: dict) -> list[str]:
    skipped = result.get("skipped")
    if not skipped:
        return []
    return ["", f"not scored: {', '.join(skipped['metrics'])}", f"why: {skipped['reason']}",
            "answer_words and empty_answers need no reference; the answers are in predictions.jsonl"]


def write_outputs(out: Path, result: dict, convs, refs, model_res, base_res, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "eval.md").write_text(table + "\n", encoding="utf-8")
    primary = result["primary"]
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (conv, ref) in enumerate(zip(convs, refs)):
            row = {"index": i, "messages": list(conv), "reference": ref, "output": model_res.predictions[i],
                   "scores": {m: s[i] for m, s in model_res.per_example.items()}}
            if base_res is not None:
                row |= {"baseline_output": base_res.predictions[i],
                        "baseline_scores": {m: s[i] for m, s in base_res.per_example.items()}}
            if base_res is not None and primary in model_res.per_example:  # not when nothing was scored
                a, b = base_res.per_example[primary][i], model_res.per_example[primary][i]
                row["winner"] = "model" if b > a else "baseline" if a > b else "tie"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- helpers


def _pairs(path: str, fmt: str):
    """The pairs of a preference file (OpenAI preference or TRL chosen/rejected), else None."""
    from ..data import preference

    loaded = preference.read_preference_file(path, fmt)
    return loaded.items if loaded.format in ("preference", "chosen_rejected") and not loaded.issues else None


def _pair_data(run_data):
    """The data settings pairs render with: the run's (its template, max_length), prompts cut from the left when long."""
    from ..config import DataConfig

    return (run_data or DataConfig()).model_copy(update={"overflow": "truncate"})


def _prefers(model, tok, records, data_cfg, batch_size: int) -> list[bool] | None:
    if not records:
        return None
    from ..objectives.preference import preference_accuracy

    _status(f"scoring {len(records)} pairs: which answer the model prefers")
    return preference_accuracy(model, tok, records, data_cfg, batch_size)


def _load(ref: str):
    """(model, tokenizer, the saved-model folder behind a run folder or None)."""
    from ..models import load_for_inference
    from ..models.resolver import run_output

    folder = Path(ref).expanduser()
    saved = run_output(folder) if (folder / "config.resolved.yaml").is_file() else folder
    model, tok = load_for_inference(ref)
    return model, tok, saved if (saved / "tunesmith.json").is_file() else None


def _manifest(saved: Path | None) -> dict:
    from ..models import MANIFEST

    if saved is None:
        return {}
    return json.loads((saved / MANIFEST).read_text(encoding="utf-8"))


def _run_data(saved: Path | None):
    """The data settings (DataConfig) of the run that delivered ``saved`` (its best/ or final/), else None."""
    import yaml

    from ..config import DataConfig

    resolved = saved.parent / "config.resolved.yaml" if saved is not None else None
    if resolved is None or not resolved.is_file():
        return None
    # the data section alone: a run whose base model has moved since still has its data settings
    return DataConfig.model_validate((yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}).get("data") or {})


def _own_base(ref: str, saved: Path | None) -> bool:
    """Whether ``ref`` is the model the evaluated one was tuned from (its manifest's base_model)."""
    base_of_tuned = _manifest(saved).get("base_model")
    return base_of_tuned is not None and _same_model(ref, base_of_tuned)


def _how(base, own: bool) -> str:
    if base.adapters_off:
        return "the model with its LoRA adapters disabled"
    return "the base model, with the run's tokenizer" if own else "loaded separately"


def _same_model(a: str, b: str) -> bool:
    from ..models import ModelError, ensure_local

    if a == b:
        return True
    try:
        return Path(ensure_local(a)).resolve() == Path(ensure_local(b)).resolve()
    except ModelError:
        return False


def _evaluate(model, tok, convs, refs, kw):
    from .compare import EvalResult, evaluate_model
    from .generate import generate_batch

    if None in refs:  # prompts alone: the answers, and the figures that need no reference
        preds = generate_batch(model, tok, convs, batch_size=kw["batch_size"], max_new_tokens=kw["max_new_tokens"])
        per_example = {"answer_words": [float(len(p.split())) for p in preds],
                       "empty_answers": [float(not p.strip()) for p in preds]}
        return EvalResult(preds, {k: sum(v) / len(v) for k, v in per_example.items()}, per_example)
    return evaluate_model(model, tok, convs, refs, batch_size=kw["batch_size"], max_new_tokens=kw["max_new_tokens"],
                          metrics=kw["metrics"], examples=kw["examples"], data=kw["data"])


def _default_out(model_ref: str, data: str) -> Path | None:
    folder = Path(model_ref).expanduser()
    if (folder / "config.resolved.yaml").is_file():
        return folder / "eval" / Path(data).stem
    return None


def _summary(side: dict) -> dict:
    out = dict(side.get("metrics") or {})
    loss = side.get("loss") or {}
    out |= {k: loss[k] for k in ("loss", "perplexity") if loss.get(k) is not None}
    return out


def _cmp_json(c) -> dict:
    d = c.to_json()
    d.pop("per_example_diff", None)  # per-example rows are in predictions.jsonl
    return d


def _without_bulk(result: dict) -> dict:
    """eval.json minus the per-example lists, for the terminal."""
    out = dict(result)
    for side in ("tuned", "base"):
        if side in out:
            out[side] = {k: v for k, v in out[side].items() if k not in ("predictions", "per_example")}
    return out


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _status(text: str) -> None:
    print(text, file=sys.stderr)
