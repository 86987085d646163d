"""`tunesmith safety MODEL_OR_RUN_DIR`: refusal probes on a model and its baseline, and the gate for a run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .judges import FORMATS

EXAMPLES = """examples:
  tunesmith safety runs/mine                      # tuned vs its base; writes runs/mine/safety.json, records the gate
  tunesmith safety runs/mine --limit 40 --max-new-tokens 32      # a quicker, rougher look
  tunesmith safety my-model/ --baseline smollm2-135m-instruct --out safety-out/
  tunesmith safety runs/mine --judge other-model/                # a judge model decides what is a refusal
  tunesmith safety runs/mine --judge llama-guard-3-1b/ --judge-format llama-guard   # harm judged apart from refusal
  tunesmith safety detector-eval                  # refusal detector's precision/recall on held-out labelled replies
  tunesmith safety detector-eval --labelled dev --judge my-judge/  # ... on the dev part, beside a judge model
"""

DETECTOR_EVAL = "detector-eval"
EXIT_BAD_INPUT = 2  # as cli.py


def add_parser(sub) -> None:
    import argparse

    s = sub.add_parser("safety", help="refusal probes: base versus tuned, with confidence intervals; the release gate",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Answer the probe sets (--sets; by default 510 harmful requests that should be refused "
                       "and 319 harmless but risky-looking ones that should be answered) with the model and its "
                       "baseline; report refusal rates with Wilson "
                       "95% intervals per category. For a run folder the baseline is its base model and the release "
                       "gate's decision is recorded in the run.")
    s.add_argument("model", help="run folder (its best model), saved model folder, alias, HF folder or GGUF file; "
                   f"or '{DETECTOR_EVAL}': measure the refusal detector (and --judge) on labelled replies")
    s.add_argument("--baseline", help="model to compare with (default: a run's base; for LoRA, adapters off)")
    s.add_argument("--out", help="folder for safety.json and safety_answers.jsonl (default: the run folder)")
    s.add_argument("--batch-size", type=int, help="generation batch size (default: safety.probe_batch_size, 16)")
    s.add_argument("--max-new-tokens", type=int, help="tokens per reply (default: safety.probe_max_new_tokens, 64)")
    s.add_argument("--judge", help="a local model that judges each reply: refusal (rubric, verdict) and harm "
                   "(llama-guard, shieldgemma, rubric) (default: the refusal-phrase detector alone)")
    s.add_argument("--judge-format", default="auto", choices=("auto", *FORMATS),
                   help="the judge's family and prompt format (default auto: from its name, config and chat template; "
                   "any other chat model gets the StrongREJECT rubric)")
    s.add_argument("--judge-max-new-tokens", type=int, help="tokens a judge may answer with (default: per format)")
    s.add_argument("--labelled", default="test", help=f"with {DETECTOR_EVAL}: test (the held-out part, default), dev, "
                   "or a JSONL file of labelled replies")
    s.add_argument("--limit", type=int, help="probes per set, spread over categories (default: all)")
    s.add_argument("--sets", help="probe sets, comma-separated (default: safety.probe_sets = harmful,benign,harmbench,"
                   "overrefusal,overrefusal_contrast; also multilingual, jailbreak, donotanswer)")
    s.add_argument("--languages", help="only probes in these languages, comma-separated (en,es,fr,de,zh,ar,hi)")
    s.add_argument("--wrappers", help="only probes in these jailbreak wrappers, comma-separated (none,roleplay,base64,"
                   "rot13,leetspeak,many_shot,multi_turn,inthewild)")
    s.add_argument("--categories", help="only probes in these hazard categories, comma-separated (probes/README.md)")
    s.add_argument("--samples", type=int, help="sampled replies per probe, refused by majority (default: "
                   "safety.samples_per_probe, 1 = one greedy reply)")
    s.add_argument("--system", help="system message before every probe (default: none)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_safety(args) -> int:
    if args.model == DETECTOR_EVAL and not Path(args.model).exists():  # ./detector-eval names a folder of that name
        return cmd_detector_eval(args)
    from .. import models
    from ..config import SafetyConfig, load_config
    from ..models.resolver import run_output
    from . import gate
    from .measure import default_probes, format_report, measure_pair

    run = gate.run_folder(args.model)
    cfg = load_config(run / "config.resolved.yaml").safety if run else SafetyConfig()
    selection, sampling = gate.probe_choice(cfg)
    selection = {k: getattr(args, k) or v for k, v in selection.items()} | {"categories": args.categories}
    opts = dict(batch_size=args.batch_size or cfg.probe_batch_size,
                max_new_tokens=args.max_new_tokens or cfg.probe_max_new_tokens,
                system_prompt=args.system if args.system is not None else cfg.probe_system_prompt,
                **sampling | ({"samples_per_probe": args.samples} if args.samples else {}))
    limit = args.limit or cfg.probe_limit
    probes = default_probes(limit, **selection)  # before loading: a bad --limit, set or filter fails fast
    model, tok = models.load_for_inference(run or args.model)
    delivered = run_output(run) if run else Path(args.model)
    baseline = gate.load_baseline(model, delivered, args.baseline) if (run or args.baseline or delivered.is_dir()) \
        else None
    judge = _load_judge(args)
    report, rows = measure_pair(model, tok, str(run or args.model), baseline, probes=probes, judge=judge,
                                judge_label=args.judge, **opts)
    report["settings"]["probe_limit"] = limit
    out = Path(args.out) if args.out else run
    decision = None
    if run is not None:
        report["fingerprint"] = gate.fingerprint(delivered)
        decision = gate.decide(report, gate.Limits.of(cfg), at="safety")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if decision is not None and out == run:
            gate.record(run, report, decision, rows)
        else:
            (out / gate.SAFETY_FILE).write_text(json.dumps(report | ({"gate": decision.to_dict()} if decision else {}),
                                                           indent=2), encoding="utf-8")
            (out / gate.ANSWERS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
    if args.json:
        print(json.dumps(report | ({"gate": decision.to_dict()} if decision else {}), indent=2))
    else:
        print(format_report(report))
        if decision is not None:
            print(gate.gate_message(decision))
        if out is not None:
            print(f"wrote {out / gate.SAFETY_FILE} and {out / gate.ANSWERS_FILE}")
    return 0


def _load_judge(args):
    from .. import models
    from .judges import Judge

    if not args.judge:
        return None
    model, tok = models.load_for_inference(args.judge)
    return Judge(model, tok, args.judge_format, label=args.judge, max_new_tokens=args.judge_max_new_tokens)


def cmd_detector_eval(args) -> int:
    """Precision, recall and F1 of the refusal detector (and of the detector before issue 27, and of a judge) on
    labelled replies; confusion counts and every misclassified row."""
    from .refusal import load_labelled, opening_phrase_verdict, score_detector, score_predictions
    from .refusal_learned import refusal_verdicts as ngram_verdicts
    from .refusal_lm import refusal_verdicts

    try:
        rows = load_labelled(args.labelled)
    except FileNotFoundError as e:  # no held-out part yet, or a mistyped file: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    replies = [r["reply"] for r in rows]
    default = refusal_verdicts(replies, [r["request"] for r in rows])
    predicted = [v.refused for v in default]
    views = {f"{DEFAULT_VIEW[default[0].source if default else 'lm_probe']}, the default (refusal_verdict)":
             score_predictions(rows, predicted),
             "n-gram layer (refusal_learned)": score_predictions(rows, [v.refused for v in ngram_verdicts(replies)]),
             "cue points (phrase_verdict)": score_detector(rows),
             "opening regexes (before issue 27)": score_detector(rows, opening_phrase_verdict)}
    harmful_rows = [r for r in rows if r.get("harmful_content") is not None]
    # the refusal-wording view of harm: a reply counts as harmful when the detector says it was not a refusal
    by_row = dict(zip((r["id"] for r in rows), predicted))
    harm_views = {"not refused (the default verdict)": score_predictions(
        harmful_rows, [not by_row[r["id"]] for r in harmful_rows], label="harmful_content")}
    judge_info = None
    judge = _load_judge(args)
    if judge is not None:
        judged = judge.judge([r["request"] for r in rows], [r["reply"] for r in rows], batch_size=args.batch_size or 8)
        name = f"judge {args.judge} ({judge.format})"
        judge_info = judge.describe() | {"unparsed": sum(not j.parsed for j in judged)}
        if judge.decides_refusal:
            views[name] = score_predictions(rows, [j.refused for j in judged])
        if judge.scores_harm:
            by_id = {r["id"]: j for r, j in zip(rows, judged)}
            harm_views[name] = score_predictions(harmful_rows, [by_id[r["id"]].harmful for r in harmful_rows],
                                                 label="harmful_content")
    doc = {"labelled": args.labelled, "rows": len(rows), "refusals": sum(r["refused"] for r in rows),
           "languages": sorted({r["lang"] for r in rows if r["lang"]}),
           "refusal": {k: v.to_dict() for k, v in views.items()},
           "harm": {"rows": len(harmful_rows), "harmful": sum(bool(r["harmful_content"]) for r in harmful_rows),
                    **{k: v.to_dict() for k, v in harm_views.items()}},
           "by_kind": _by_kind(rows, predicted), "by_lang": _by_kind(rows, predicted, "lang"), "judge": judge_info}
    files = dict.fromkeys(r["file"] for r in rows)
    if len(files) > 1 and args.labelled != "dev":  # the held-out rounds, each on its own as well as together
        by_file = {stem: score_predictions(part, [by_row[r["id"]] for r in part])
                   for stem in files for part in [[r for r in rows if r["file"] == stem]]}
        doc["by_file"] = {stem: {k: v for k, v in sc.to_dict().items() if k != "misclassified"}
                          for stem, sc in by_file.items()}
    folds = _cross_validation() if args.labelled == "dev" else {}  # each development file without its own cues
    if folds:
        doc["cross_validation"] = {stem: {side: {k: v for k, v in score.to_dict().items() if k != "misclassified"}
                                          for side, score in zip(("left_out", "whole"), pair)}
                                   for stem, pair in folds.items()}
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print(f"labelled replies ({args.labelled}): {doc['rows']} replies, {doc['refusals']} refusals, "
          f"languages {', '.join(doc['languages']) or '-'}")
    print(_score_table("refused?", views))
    print(f"\nharmful content, on the {len(harmful_rows)} replies to harmful requests ({doc['harm']['harmful']} harmful):")
    print(_score_table("harmful?", harm_views))
    if judge_info:
        print(f"judge: {judge_info['model']} ({judge_info['format']}); {judge_info['unparsed']} answers unreadable "
              "(left out of the judge's rows above)")
    if "by_file" in doc:
        print("\nthe default verdict, by file: " + ", ".join(
            f"{stem} P {sc.precision:.3f} R {sc.recall:.3f} (n {sc.tp + sc.fp + sc.fn + sc.tn})"
            for stem, sc in by_file.items()))
    for field in ("kind", "lang"):
        print(f"\nthe default verdict, by {field} (correct of n): " + ", ".join(
            f"{k} {v['correct']}/{v['n']}" for k, v in doc[f"by_{field}"].items()))
    if folds:
        print("\ncross-validated by file: each file without the cues written from its rows (left out), and whole")
        print(_score_table("file", {f"{stem} {side}": score for stem, pair in folds.items()
                                    for side, score in zip(("left out", "whole"), pair)}))
    for name, sc in views.items():
        if not name.startswith(("opening", "n-gram")):  # the default's and the cues' (the count even when it is 0)
            print(f"\nmisclassified by {name}: {sc.fn} missed refusals (FN), {sc.fp} false refusals (FP)")
            for row, pred in sc.wrong:
                reply = " ".join(row["reply"].split())
                print(f"  {'FP' if pred else 'FN'} {row['id']} [{row['kind'] or '-'}, {row['lang'] or '-'}] "
                      f"{reply[:150]}{'...' if len(reply) > 150 else ''}")
    return 0


DEFAULT_VIEW = {"lm_probe": "LM probe", "learned": "n-gram layer", "phrases": "cue points"}  # by Verdict.source


def _score_table(title: str, views: dict) -> str:
    head = [title, "precision", "recall", "F1", "TP", "FP", "FN", "TN"]
    body = [[k, f"{v.precision:.3f}", f"{v.recall:.3f}", f"{v.f1:.3f}", str(v.tp), str(v.fp), str(v.fn), str(v.tn)]
            for k, v in views.items()]
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *body])


def _cross_validation() -> dict:
    from .refusal import cross_validate, pooled

    folds = cross_validate()
    return folds | {"pooled": tuple(pooled(f[i] for f in folds.values()) for i in (0, 1))}


def _by_kind(rows: list[dict], predicted: list[bool], field: str = "kind") -> dict:
    out: dict[str, dict] = {}
    for r, pred in sorted(zip(rows, predicted), key=lambda rp: rp[0][field] or "-"):
        k = out.setdefault(r[field] or "-", {"n": 0, "correct": 0})
        k["n"] += 1
        k["correct"] += pred == r["refused"]
    return out
