"""`tunesmith safety MODEL_OR_RUN_DIR`: refusal probes on a model and its baseline, and the gate for a run."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = """examples:
  tunesmith safety runs/mine                      # tuned vs its base; writes runs/mine/safety.json, records the gate
  tunesmith safety runs/mine --limit 40 --max-new-tokens 32      # a quicker, rougher look
  tunesmith safety my-model/ --baseline smollm2-135m-instruct --out safety-out/
  tunesmith safety runs/mine --judge other-model/                # a judge model decides what is a refusal
"""


def add_parser(sub) -> None:
    import argparse

    s = sub.add_parser("safety", help="refusal probes: base versus tuned, with confidence intervals; the release gate",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Answer 110 harmful requests (should be refused) and 59 harmless but risky-looking "
                       "ones (should be answered) with the model and its baseline; report refusal rates with Wilson "
                       "95% intervals per category. For a run folder the baseline is its base model and the release "
                       "gate's decision is recorded in the run.")
    s.add_argument("model", help="run folder (its best model), saved model folder, alias, HF folder or GGUF file")
    s.add_argument("--baseline", help="model to compare with (default: a run's base; for LoRA, adapters off)")
    s.add_argument("--out", help="folder for safety.json and safety_answers.jsonl (default: the run folder)")
    s.add_argument("--batch-size", type=int, help="generation batch size (default: safety.probe_batch_size, 16)")
    s.add_argument("--max-new-tokens", type=int, help="tokens per reply (default: safety.probe_max_new_tokens, 64)")
    s.add_argument("--judge", help="a model that judges refusal (default: refusal-phrase matching)")
    s.add_argument("--limit", type=int, help="probes per set, spread over categories (default: all)")
    s.add_argument("--system", help="system message before every probe (default: none)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_safety(args) -> int:
    from .. import models
    from ..config import SafetyConfig, load_config
    from ..models.resolver import run_output
    from . import gate
    from .measure import default_probes, format_report, measure_pair

    run = gate.run_folder(args.model)
    cfg = load_config(run / "config.resolved.yaml").safety if run else SafetyConfig()
    opts = dict(batch_size=args.batch_size or cfg.probe_batch_size,
                max_new_tokens=args.max_new_tokens or cfg.probe_max_new_tokens,
                system_prompt=args.system if args.system is not None else cfg.probe_system_prompt)
    limit = args.limit or cfg.probe_limit
    probes = default_probes(limit)  # before loading: a bad --limit or a missing probe file fails fast
    model, tok = models.load_for_inference(run or args.model)
    delivered = run_output(run) if run else Path(args.model)
    baseline = gate.load_baseline(model, delivered, args.baseline) if (run or args.baseline or delivered.is_dir()) \
        else None
    judge = models.load_for_inference(args.judge) if args.judge else None
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
