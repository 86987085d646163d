"""The `tunesmith` command: one entry point, a subcommand per verb.

Exit codes: 0 success; 1 unexpected failure; 2 bad input (config, data, model reference) found before
any model loads; 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

TRAIN_EXAMPLES = """examples:
  tunesmith train examples/iso_dates/config.yaml
  tunesmith train examples/iso_dates/config.yaml --set train.lr=1e-4 --set method.name=full
  tunesmith train --data train.jsonl --valid valid.jsonl --method lora --epochs 2 --out runs/mine
  tunesmith train runs/mine/config.resolved.yaml --resume          # continue an interrupted run
"""

GENERATE_EXAMPLES = """examples:
  tunesmith generate runs/mine --prompt "Convert to ISO 8601: March 3rd, 2021"
  tunesmith generate smollm2-135m-instruct --prompt "What is the capital of France?"
  tunesmith generate runs/mine --data test.jsonl --out preds.jsonl --batch-size 16
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pre-trained language models on your data "
                                "and prove the result is better.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    t = sub.add_parser("train", help="fine-tune a model", epilog=TRAIN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model from a YAML config, flags, or both (flags win).")
    t.add_argument("config", nargs="?", help="YAML config file (see examples/); optional with --data")
    _add_overrides(t)
    t.add_argument("--model", help="model: built-in alias, HF folder, GGUF file or hub id (model.name)")
    t.add_argument("--data", help="training file .jsonl/.json/.csv/.parquet (data.train)")
    t.add_argument("--valid", help="validation file (data.valid)")
    t.add_argument("--method", choices=["lora", "freeze", "full"], help="method.name")
    t.add_argument("--epochs", type=float, help="train.epochs")
    t.add_argument("--max-steps", type=int, help="train.max_steps")
    t.add_argument("--lr", type=float, help="train.lr")
    t.add_argument("--batch-size", type=int, help="train.batch_size")
    t.add_argument("--out", help="run folder (output_dir)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output folder from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete a previous run in the output folder first")
    t.add_argument("--force", action="store_true", help="with --resume: continue even though the config or data changed")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--help-config", action="store_true", help="list every config field with default and description")

    c = sub.add_parser("check", help="validate a config and its data; print the preflight report",
                       description="Validate config and data without loading the model: counts, token lengths, "
                       "truncation, and rendered examples with the trained spans marked.")
    c.add_argument("config", nargs="?", help="YAML config file")
    _add_overrides(c)
    c.add_argument("--data", help="training file (data.train)")
    c.add_argument("--valid", help="validation file (data.valid)")
    c.add_argument("--model", help="model whose tokenizer is used (model.name)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    g = sub.add_parser("generate", help="generate answers with a model or a run's tuned model", epilog=GENERATE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Greedy by default. For a data file, each line's conversation minus its last "
                       "assistant message is the prompt; the output has one JSON object per line with `output`.")
    g.add_argument("model", help="run folder (its best model), saved model folder, alias, HF folder, GGUF file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--data", help="JSONL/JSON/CSV/Parquet file of conversations")
    g.add_argument("--out", help="predictions JSONL (required with --data)")
    g.add_argument("--system", help="system message to put before --prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)

    m = sub.add_parser("models", help="list built-in model aliases, whether installed and cached")
    m.add_argument("--json", action="store_true")
    return p


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")


# ---------------------------------------------------------------- verbs


def _config_from_args(args) -> "Config":  # noqa: F821
    from .config import load_config

    flags = {"model.name": getattr(args, "model", None), "data.train": getattr(args, "data", None),
             "data.valid": getattr(args, "valid", None), "method.name": getattr(args, "method", None),
             "train.epochs": getattr(args, "epochs", None), "train.max_steps": getattr(args, "max_steps", None),
             "train.lr": getattr(args, "lr", None), "train.batch_size": getattr(args, "batch_size", None),
             "output_dir": getattr(args, "out", None)}
    overrides = list(args.overrides) + [f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                                        for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    if not cfg.data.train:
        from .config import ConfigError
        raise ConfigError("no training data: give a config with data.train, or --data FILE")
    return cfg


def cmd_train(args) -> int:
    if args.help_config:
        from .config import describe_fields
        for name, default, desc in describe_fields():
            print(f"{name:38s} {default:14s} {desc}")
        return EXIT_OK
    from .train import train

    cfg = _config_from_args(args)
    stop = _GracefulStop()
    with stop:
        result = train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force, quiet=args.quiet,
                       stop_requested=lambda: stop.requested)
    if result.status == "interrupted":
        print(f"stopped at step {result.steps}; a checkpoint was saved. Continue with:\n"
              f"  tunesmith train {result.output_dir / 'config.resolved.yaml'} --resume", file=sys.stderr)
    print(f"run folder: {result.output_dir}  (best model: {result.output_dir / 'best'})")
    if result.comparison:
        c = result.comparison["comparison"]
        print(f"held-out exact match: base {c['mean_a']:.3f} -> tuned {c['mean_b']:.3f} "
              f"(diff {c['diff']:+.3f}, 95% CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}])")
    return EXIT_OK if result.status in ("completed", "early_stopped") else EXIT_INTERRUPTED


class _GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save a checkpoint, exit 130. Second: exit at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)", file=sys.stderr)

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def cmd_check(args) -> int:
    from . import data as tsdata
    from . import models

    cfg = _config_from_args(args)
    path = models.ensure_local(cfg.model.name, revision=cfg.model.revision)
    tok = models.load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    report = tsdata.preflight(cfg, tok)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        from rich.console import Console
        report.print(Console())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT


def cmd_generate(args) -> int:
    from . import data as tsdata
    from . import models
    from .evaluate import generate_batch

    if args.data and not args.out:
        print("error: --out PREDS.jsonl is required with --data", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.data:
        examples = tsdata.load_examples(args.data, "auto")  # validated before the model loads
    model, tok = models.load_for_inference(args.model)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.do_sample,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.prompt is not None:
        conv = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
        print(generate_batch(model, tok, [conv], **kw)[0])
        return EXIT_OK
    pairs = [tsdata.prompt_and_reference(e) for e in examples]
    outputs = generate_batch(model, tok, [p for p, _ in pairs], **kw)
    with open(args.out, "w", encoding="utf-8") as f:
        for (prompt, ref), out in zip(pairs, outputs):
            f.write(json.dumps({"messages": prompt, "output": out, "reference": ref}, ensure_ascii=False) + "\n")
    print(f"wrote {len(outputs)} predictions to {args.out}")
    return EXIT_OK


def cmd_models(args) -> int:
    from . import models

    rows = models.list_models()
    if args.json:
        print(json.dumps([r.__dict__ | {"cache_path": str(r.cache_path) if r.cache_path else None} for r in rows], indent=2))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("alias", "installed", "cached", "description", "source")
    for r in rows:
        table.add_row(r.alias, "yes" if r.installed else "no", "yes" if r.cached else "no", r.description, str(r.source))
    Console().print(table)
    print(f"cache: {models.cache_dir()}  (set TUNESMITH_CACHE_DIR to move it)")
    return EXIT_OK


VERBS = {"train": cmd_train, "check": cmd_check, "generate": cmd_generate, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    if args.version:
        from . import __version__
        print(f"tunesmith {__version__}")
        return EXIT_OK
    if not args.verb:
        _parser().print_help()
        return EXIT_BAD_INPUT
    from .errors import user_errors

    try:
        return VERBS[args.verb](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as e:  # bad input: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
