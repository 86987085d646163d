"""The `tunesmith` command: one entry point, a subcommand per verb.

Exit codes: 0 success; 1 failure (a run that cannot go on, e.g. a full disk or repeated NaN, with a
message; anything unexpected, with a traceback); 2 bad input (config, data, model reference) found
before any model loads; 130 interrupted by Ctrl-C or SIGTERM (a checkpoint was saved, unless the
signal came twice).
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
  tunesmith train --objective dpo --data pairs.jsonl --method lora --epochs 1 --out runs/dpo
  tunesmith train --objective grpo --data prompts.jsonl --grader grader.json --max-steps 50 --out runs/rft
  tunesmith train --objective denoise --data images/ --method lora --max-steps 300 --out runs/shapes  # text-to-image
  tunesmith train runs/mine/config.resolved.yaml --resume          # continue an interrupted run
"""

GENERATE_EXAMPLES = """examples:
  tunesmith generate runs/mine --prompt "Convert to ISO 8601: March 3rd, 2021"
  tunesmith generate smollm2-135m-instruct --prompt "What is the capital of France?"
  tunesmith generate runs/mine --data test.jsonl --out preds.jsonl --batch-size 16
  tunesmith generate runs/shapes --prompt "two small red crosses" --n 4 --seed 0 --out images/   # text-to-image: PNGs
"""

EVAL_EXAMPLES = """examples:
  tunesmith eval runs/mine --data test.jsonl                        # tuned vs the run's base model
  tunesmith eval runs/mine --data test.jsonl --baseline runs/other  # against another run
  tunesmith eval smollm2-135m-instruct --data test.jsonl --no-baseline --json
  tunesmith eval runs/mine --data test.jsonl --metric my_metrics:f1 --out results/
  tunesmith eval runs/shapes --data held-out/ --clip-model models/clip   # text-to-image: detector, CLIP score
"""

GRADE_EXAMPLES = """examples:
  tunesmith grade --grader grader.json --data rows.jsonl --outputs replies.jsonl
  tunesmith grade --grader judge.json --data rows.jsonl --outputs preds.jsonl --judge smollm2-135m-instruct
  tunesmith grade --grader my_rewards:exact --data rows.jsonl --outputs replies.jsonl --json

grader.json, OpenAI's form (string_check, text_similarity, python, score_model, multi), e.g.
  {"type": "string_check", "name": "exact", "operation": "eq",
   "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
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
    t.add_argument("--objective", choices=["sft", "dpo", "orpo", "simpo", "kto", "grpo", "denoise"],
                   help="objective.name: sft (answers to learn), dpo/orpo/simpo (chosen and rejected answers per prompt), "
                        "kto (answers labelled good or bad), grpo (prompts only: answers sampled and graded), denoise "
                        "(captioned images: a text-to-image model; --model defaults to the built-in shapes-t2i-32)")
    t.add_argument("--grader", help="grpo: the grader, a JSON file in OpenAI's form or module:function "
                                    "(objective.grpo.grader)")
    t.add_argument("--epochs", type=float, help="train.epochs")
    t.add_argument("--max-steps", type=int, help="train.max_steps")
    t.add_argument("--lr", type=float, help="train.lr")
    t.add_argument("--batch-size", type=int, help="train.batch_size")
    t.add_argument("--out", help="run folder (output_dir)")
    t.add_argument("--kernels", choices=["auto", "off"], help="train.kernels: tunesmith's fused kernels where they apply "
                   "(auto) or the plain transformers/PEFT computation (off)")
    t.add_argument("--precision", choices=["auto", "float32", "bf16-mixed", "bfloat16", "float16"],
                   help="model.dtype: the training precision (auto: bf16-mixed where measured faster, else float32)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output folder from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete a previous run in the output folder first")
    t.add_argument("--force", action="store_true", help="with --resume: continue even though the config or data changed")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--nproc", type=int, metavar="N", help="train with N processes on this machine, started by torchrun "
                   "(DDP, or FSDP with distributed.strategy=fsdp); under torchrun or accelerate launch leave it out")
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
                       "assistant message (kept as `reference`) is the prompt; a conversation ending with a user turn, "
                       "a {\"prompt\": ...} record or a preference pair is a prompt alone. The output has one JSON "
                       "object per line with `output`.")
    g.add_argument("model", help="run folder (its best model), saved model folder, alias, HF folder, GGUF file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--data", help="JSONL/JSON/CSV/Parquet file of conversations or prompts")
    g.add_argument("--out", help="predictions JSONL (required with --data); for a text-to-image model the folder for "
                   "the PNGs (always required)")
    g.add_argument("--system", help="system message to put before --prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed; text-to-image: image i of each prompt is drawn "
                   "from seed + i")
    g.add_argument("--n", type=int, help="text-to-image: images per prompt (default 4)")
    _add_image_sampling(g)

    m = sub.add_parser("models", help="list built-in model aliases, whether installed and cached")
    m.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", help="score a model or a run on a test file, against a baseline", epilog=EVAL_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Batched greedy generation, then exact match, normalised exact match, ROUGE-L, "
                       "chrF, BLEU and the loss/perplexity of the reference answers. With a baseline (default for a "
                       "run folder: its base model) both answer the same prompts: metrics side by side, per-example "
                       "wins/losses/ties and a paired bootstrap 95%% confidence interval of the difference.")
    e.add_argument("model", help="run folder (its best model), saved model folder, alias, HF folder or GGUF file")
    e.add_argument("--data", required=True, help="test file; each conversation's last assistant message is the reference "
                   "(prompts alone: the answers side by side, the reference metrics skipped)")
    e.add_argument("--format", default="auto", help="data format (default: detected)")
    eb = e.add_mutually_exclusive_group()
    eb.add_argument("--baseline", help="model to compare against (default for a run or saved model: its base model)")
    eb.add_argument("--no-baseline", action="store_true", help="score the model alone")
    e.add_argument("--out", help="folder for eval.json, predictions.jsonl, eval.md (default for a run: RUN/eval/NAME)")
    e.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    e.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per answer")
    e.add_argument("--metric", dest="metrics", action="append", default=[], metavar="NAME",
                   help="extra metric: built-in name or your 'module:function' (prediction, reference) -> float")
    e.add_argument("--primary", default="exact_match", help="metric of the headline verdict")
    e.add_argument("--limit", type=int, help="score only the first N examples")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    e.add_argument("--json", action="store_true", help="print the results as JSON (without per-example lists)")
    e.add_argument("--n", type=int, help="text-to-image: images per prompt (default: the run's images_per_prompt)")
    _add_image_sampling(e)
    e.add_argument("--clip-model", metavar="FOLDER", help="text-to-image: a local CLIPModel + processor folder; adds the "
                   "CLIP score (100 x cosine of image and caption embeddings) of both sides")

    r = sub.add_parser("report", help="write a run's report.html again (plots, tables, base vs tuned)",
                       description="Regenerate RUN/report.html from the run folder's files: one self-contained page.")
    r.add_argument("run", help="run folder")
    r.add_argument("--out", help="write the report here instead of RUN/report.html")

    from .sweep.cli import add_parser as add_sweep_parser
    add_sweep_parser(sub)

    x = sub.add_parser("export", help="export a run's model: merged HF folder, LoRA adapter, or GGUF file",
                       description="Every export is loaded back and compared with the run before it is kept.",
                       epilog="examples:\n  tunesmith export runs/mine --format hf --out exports/mine\n"
                       "  tunesmith export runs/mine --format gguf --dtype q8_0 --out mine.gguf\n"
                       "  tunesmith export runs/mine --format adapter --out exports/mine-lora\n"
                       "  tunesmith export runs/image-run --format adapter --style all --out exports/image-lora",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("model", metavar="RUN_DIR", help="run folder (its best model); also a saved model folder, alias, "
                   "HF folder or GGUF file")
    x.add_argument("--format", required=True, choices=["hf", "gguf", "adapter", "diffusers"], help="hf: safetensors "
                   "folder, adapter merged; gguf: one GGUF file (Llama architecture); adapter: the PEFT LoRA folder (a "
                   "text-to-image run: the diffusers LoRA file); diffusers: a text-to-image pipeline folder, LoRA merged")
    x.add_argument("--style", choices=["diffusers", "kohya", "comfyui", "all"], help="a text-to-image run's --format "
                   "adapter: the LoRA file's key layout (default diffusers; kohya: kohya-ss/A1111; comfyui; all: the "
                   "three), each loaded back its users' way and its images compared with the run's")
    x.add_argument("--out", required=True, help="folder (hf, adapter) or .gguf file (a folder gets NAME-DTYPE.gguf)")
    x.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="hf: f32 (default) | f16 | bf16; gguf: f16 (default) | f32 | q8_0")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--no-verify", action="store_true", help="skip loading the export back to compare it with the run")
    x.add_argument("--accept-safety-regression", action="store_true", help="export even though the release gate found "
                   "the tuned model refuses harmful requests much less than its base (the run records it)")

    from .chat import add_parser as add_chat_parser
    add_chat_parser(sub)

    from .server.serve import add_parser as add_serve_parser
    add_serve_parser(sub)

    from .server.node import add_parser as add_worker_parser
    add_worker_parser(sub)

    from .safety.cli import add_parser as add_safety_parser
    add_safety_parser(sub)

    gr = sub.add_parser("grade", help="score replies with a reinforcement fine-tuning grader (OpenAI's JSON form)",
                        epilog=GRADE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run a grader on given replies, one per data row: print each row's score, the "
                        "reason where a row scored 0 because something failed, and the mean (per grader for a "
                        "multi grader). No model loads unless the grader has a score_model and --judge names one.")
    gr.add_argument("--grader", required=True, help="grader JSON file, or 'module:function' (sample, item) -> float")
    gr.add_argument("--data", required=True, help="JSONL data rows, the graders' {{item.*}}")
    gr.add_argument("--outputs", required=True, help="JSONL replies, one line per data row: a JSON string or "
                    "{\"output_text\": ...} (tunesmith generate's {\"output\": ...} too)")
    gr.add_argument("--judge", metavar="MODEL", help="the score_model graders' judge: run folder, saved model, alias or "
                    "HF folder")
    gr.add_argument("--json", action="store_true", help="print the grades as JSON")
    return p


def _add_image_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="text-to-image: sampler steps (default: the run's inference_steps, 20)")
    p.add_argument("--guidance", type=float, help="text-to-image: classifier-free guidance scale (default: the run's, 4)")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")


# ---------------------------------------------------------------- verbs


def _config_from_args(args) -> "Config":  # noqa: F821
    from .config import load_config

    flags = {"model.name": getattr(args, "model", None), "data.train": getattr(args, "data", None),
             "data.valid": getattr(args, "valid", None), "method.name": getattr(args, "method", None),
             "objective.name": getattr(args, "objective", None),
             "objective.grpo.grader": getattr(args, "grader", None),
             "train.epochs": getattr(args, "epochs", None), "train.max_steps": getattr(args, "max_steps", None),
             "train.lr": getattr(args, "lr", None), "train.batch_size": getattr(args, "batch_size", None),
             "train.kernels": getattr(args, "kernels", None), "model.dtype": getattr(args, "precision", None),
             "output_dir": getattr(args, "out", None)}
    overrides = list(args.overrides) + [f"{k}={json.dumps(v) if isinstance(v, str) else v}"
                                        for k, v in flags.items() if v is not None]
    cfg = load_config(args.config, overrides)
    if cfg.objective.name == "denoise" and not getattr(args, "model", None) and "model.name" not in _set_keys(args):
        from .config import DEFAULT_MODEL
        from .models.registry import IMAGE_ALIAS

        if cfg.model.name == DEFAULT_MODEL:  # the language-model default: the built-in image model instead
            cfg.model.name = IMAGE_ALIAS
    if not cfg.data.train:
        from .config import ConfigError
        raise ConfigError(f"{args.config + ': ' if args.config else ''}data.train: no training data: give a config "
                          "with data.train, or --data FILE [C008]")
    return cfg


def _set_keys(args) -> set[str]:
    return {o.split("=", 1)[0].strip() for o in getattr(args, "overrides", [])}


def cmd_train(args) -> int:
    if args.help_config:
        from .config import describe_fields
        for name, default, desc in describe_fields():
            print(f"{name:38s} {default:14s} {desc}")
        return EXIT_OK
    from .train import train

    cfg = _config_from_args(args)  # bad input is reported here, once, before any process starts
    if args.nproc is not None:
        from .train.launch import check_nproc, launch_train
        if check_nproc(args.nproc):
            return launch_train(args.argv, args.nproc)
    stop, finished = _GracefulStop(), False
    try:
        with stop:
            result = train(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force, quiet=args.quiet,
                           stop_requested=lambda: stop.requested)
        finished = True
    finally:
        _end_process_group(finished)
    if os.environ.get("RANK", "0") != "0":  # one of several processes: only the main one reports
        return EXIT_OK if result.status in ("completed", "early_stopped") else EXIT_INTERRUPTED
    if result.status == "interrupted":
        world = os.environ.get("WORLD_SIZE", "1")  # several processes: resume with as many (or see README)
        again = f" --nproc {world}" if world != "1" and world == os.environ.get("LOCAL_WORLD_SIZE") else ""
        print(f"stopped at step {result.steps}; a checkpoint was saved. Continue with:\n"
              f"  tunesmith train {result.output_dir / 'config.resolved.yaml'} --resume{again}", file=sys.stderr)
    print(f"run folder: {result.output_dir}  (best model: {result.output_dir / 'best'})")
    if result.comparison and "reinforcement" in result.comparison:  # grpo: the held-out grade
        r = result.comparison["reinforcement"]
        print(f"\nheld-out grade on {r['prompts']} prompts: base {r['base_reward']:.3f} -> tuned {r['tuned_reward']:.3f} "
              f"(diff {r['diff']:+.3f}, 95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}])")
    elif result.comparison and "images" in result.comparison:  # denoise: the detector's figures, where it judges
        from .evaluate.images import detector_lines

        lines = detector_lines(result.comparison["images"])
        print("\n" + "\n".join(lines) if lines else f"\nbase and tuned images: {result.output_dir / 'compare'}")
    elif result.comparison:
        from .evaluate.compare import format_comparison

        c = result.comparison["comparison"]
        base, tuned = result.comparison["base"], result.comparison["tuned"]
        print(f"\nbase versus tuned on {result.comparison['examples']} held-out examples:")
        print(format_comparison(_summary_of(base), _summary_of(tuned)))
        print(f"held-out exact match: base {c['mean_a']:.3f} -> tuned {c['mean_b']:.3f} "
              f"(diff {c['diff']:+.3f}, 95% CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]; "
              f"tuned wins {c['wins']}, loses {c['losses']}, ties {c['ties']})")
    if (result.output_dir / "report.html").is_file():
        print(f"report: {result.output_dir / 'report.html'}")
    return EXIT_OK if result.status in ("completed", "early_stopped") else EXIT_INTERRUPTED


def _end_process_group(finished: bool) -> None:
    """One of several launched processes: take the process group down before the interpreter exits.

    A gloo worker thread frees each finished collective's tensors itself, which takes the GIL; if the interpreter
    is already shutting down by then, the thread is killed inside C++ code and the process aborts ("terminate called
    without an active exception"), failing the launch after a good run: seen on ~1 in 8 two-process FSDP runs, on
    the rank that exits while the main process still writes the report (its last all-gather was just waited on).
    destroy_process_group does not stop those threads (DTensor's caches keep the group alive), so a finished run
    first waits in a barrier with the GIL released: gloo's barrier completes after every earlier collective, and
    meanwhile the workers free them. After an error the ranks may not be at the same collective: no barrier then."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if finished:
            tdist.barrier()
        tdist.destroy_process_group()


def _summary_of(side: dict) -> dict:
    """compare.json's metrics plus loss and perplexity for one side."""
    loss = side.get("loss") or {}
    return dict(side.get("metrics") or {}) | {k: loss[k] for k in ("loss", "perplexity") if loss.get(k) is not None}


DUPLICATE_SIGNAL_S = 2.0  # in a launched process, a second signal this soon after the first is the same stop


class _GracefulStop:
    """First SIGINT/SIGTERM: finish the current step, save a checkpoint, exit 130. Second: exit at once."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        import time

        if self.requested:
            # Under a launcher one stop can arrive twice at once (SLURM signals every process of a job step and
            # torchrun passes its own copy on): only a later signal means "quit at once".
            if "LOCAL_RANK" in os.environ and time.monotonic() - self._first < DUPLICATE_SIGNAL_S:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        if os.environ.get("RANK", "0") == "0":
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
    from dataclasses import replace

    from . import data as tsdata
    from . import models

    cfg = _config_from_args(args)
    if cfg.objective.name == "denoise":
        return _check_images(cfg, args.json)
    path = models.ensure_local(cfg.model.name, revision=cfg.model.revision)
    tok = models.load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code, chat_template=cfg.model.chat_template)
    if cfg.objective.name == "grpo":
        return _check_prompts(cfg, tok, args.json)
    # the data files, read once for both reports
    if cfg.objective.name == "sft":
        collected = tsdata.collect_splits(cfg.data, cfg.train.seed)
        splits = collected[0]
    else:
        collected = tsdata.collect_preference_splits(cfg.data, cfg.train.seed, cfg.objective.name)
        splits = collected[0]
        if splits is not None:  # screened as training screens them: prompts with the answers trained toward
            chats = tsdata.screened_chats
            splits = replace(splits, train=chats(splits.train), valid=chats(splits.valid))
    report = tsdata.preflight(cfg, tok, collected)
    from .safety import screen_splits
    # personal data, secrets, harmful content (safety: section); data issues are the preflight's to report
    safety = screen_splits(splits, cfg.safety)[1] if splits is not None else None
    if args.json:
        print(json.dumps(report.to_dict() | {"safety": safety.to_dict() if safety else None}, indent=2))
    else:
        from rich.console import Console
        report.print(Console())
        if safety:
            print("\n" + safety.format())
    return EXIT_OK if report.ok and (safety is None or safety.ok) else EXIT_BAD_INPUT


def _check_prompts(cfg, tokenizer, as_json: bool) -> int:
    """`tunesmith check` for objective grpo: the prompt files' issues, the grader compiled, a rendered prompt."""
    from .data.errors import DataError
    from .data.prompts import collect_prompt_splits
    from .evaluate.generate import render_prompt
    from .graders import GraderError
    from .objectives.grpo import load_grader

    splits = collect_prompt_splits(cfg.data, cfg.train.seed)
    try:
        grader, grader_error = load_grader(cfg.objective.grpo), None
    except GraderError as e:
        grader, grader_error = None, str(e)
    shown = splits.train[0] if splits.train else None
    rendered = tokenizer.decode(render_prompt(tokenizer, [m.as_dict() for m in shown.messages])) if shown else None
    ok = not splits.issues and grader_error is None
    if as_json:
        print(json.dumps({"ok": ok, "train_prompts": len(splits.train), "valid_prompts": len(splits.valid),
                          "format": splits.format, "issues": [i.to_dict() for i in splits.issues],
                          "grader": None if grader is None else {"type": grader.type, "name": grader.name},
                          "grader_error": grader_error, "rendered_prompt": rendered}, indent=2))
        return EXIT_OK if ok else EXIT_BAD_INPUT
    print(f"{len(splits.train)} training prompts, {len(splits.valid)} validation prompts (format {splits.format})")
    if splits.issues:
        print(DataError(splits.issues).format())
    print(f"grader: {grader.type} {grader.name!r}" if grader else f"grader: {grader_error}")
    if rendered:
        print(f"a rendered prompt ({shown.origin}); the model samples its answer after it:\n{rendered}")
    return EXIT_OK if ok else EXIT_BAD_INPUT


def _check_images(cfg, as_json: bool) -> int:
    """`tunesmith check` for objective denoise: every image decoded and checked at the model's resolution, the summary
    (counts, sizes, modes, caption lengths, warnings) and each issue with its file and code; exit 2 on any issue."""
    from .data.images import collect_image_splits, summarize_images
    from .objectives.denoise import pipeline_resolution

    d = cfg.objective.denoise
    resolution = d.resolution or pipeline_resolution(cfg.model.name)
    splits = collect_image_splits(cfg.data, cfg.train.seed, None if d.buckets else resolution, modes=d.image_modes,
                                  caption=d.dreambooth.instance_prompt)
    if d.buckets:  # each image against its aspect-ratio bucket, as training checks it
        from .data.buckets import make_buckets, size_issues
        from .objectives.denoise import pipeline_downscale

        buckets = make_buckets(resolution, d.bucket_step or pipeline_downscale(cfg.model.name), d.bucket_max_aspect)
        splits.issues += size_issues(splits.train + splits.valid, buckets)
    summary = summarize_images(splits)
    if as_json:
        print(json.dumps(summary.to_dict() | {"objective": "denoise", "resolution": resolution}, indent=2, default=str))
    else:
        print(f"objective denoise: captioned images for {cfg.model.name} at {resolution}x{resolution}")
        print("\n".join(summary.lines()))
        print("ok" if summary.ok else f"{len(summary.issues)} issue(s): fix them before training")
    return EXIT_OK if summary.ok else EXIT_BAD_INPUT


def cmd_generate(args) -> int:
    from . import data as tsdata
    from . import models
    from .data.example import prompt_and_optional_reference
    from .evaluate import generate_batch
    from .models.diffusion import text_to_image_folder

    image = text_to_image_folder(args.model)
    if image is not None:  # a text-to-image model: PNGs (evaluate/image_cli.py)
        from .evaluate.image_cli import generate

        return generate(args, image)
    if args.n is not None or args.steps is not None or args.guidance is not None:
        print(f"error: --n, --steps and --guidance are for text-to-image models; {args.model} is a language model",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.data and not args.out:
        print("error: --out PREDS.jsonl is required with --data", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.data:  # validated before the model loads; prompts without an answer are welcome here
        examples = tsdata.load_examples(args.data, "auto", prompt_only=True)
        if not all(e.is_chat for e in examples):
            from .config import ConfigError
            raise ConfigError(f"{args.data}: plain-text records have no prompt to answer; generate --data needs "
                              "conversations, prompts or preference pairs")
    model, tok = models.load_for_inference(args.model)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.do_sample,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.prompt is not None:
        conv = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
        print(generate_batch(model, tok, [conv], **kw)[0])
        return EXIT_OK
    pairs = [prompt_and_optional_reference(e) for e in examples]
    outputs = generate_batch(model, tok, [p for p, _ in pairs], **kw)
    with open(args.out, "w", encoding="utf-8") as f:
        for (prompt, ref), out in zip(pairs, outputs):
            row = {"messages": prompt, "output": out} | ({"reference": ref} if ref is not None else {})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
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

    table = Table("alias", "kind", "installed", "cached", "description", "source")
    for r in rows:
        table.add_row(r.alias, r.kind, "yes" if r.installed else "no", "yes" if r.cached else "no", r.description,
                      str(r.source))
    Console().print(table)
    print(f"cache: {models.cache_dir()}  (set TUNESMITH_CACHE_DIR to move it)")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate.cli_eval import run

    return run(args)


def cmd_report(args) -> int:
    from .report import write_report

    try:
        path = write_report(args.run, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {path}")
    return EXIT_OK


def cmd_sweep(args) -> int:
    from .sweep.cli import cmd_sweep as run

    return run(args)


def cmd_export(args) -> int:
    from .export.command import cmd_export as run

    return run(args)


def cmd_safety(args) -> int:
    from .safety.cli import cmd_safety as run

    return run(args)


def cmd_chat(args) -> int:
    from .chat import cmd_chat as run

    return run(args)


def cmd_grade(args) -> int:
    from .graders.cli import run

    return run(args)


def cmd_serve(args) -> int:
    from .server.serve import run

    return run(args)


def cmd_worker(args) -> int:
    from .server.node import run

    return run(args)


VERBS = {"train": cmd_train, "check": cmd_check, "generate": cmd_generate, "models": cmd_models, "sweep": cmd_sweep,
         "eval": cmd_eval, "report": cmd_report, "export": cmd_export, "chat": cmd_chat, "serve": cmd_serve,
         "safety": cmd_safety, "grade": cmd_grade, "worker": cmd_worker}


# Commands that run a model: they start with tcmalloc preloaded when it is installed (allocator.py).
MODEL_VERBS = frozenset({"train", "sweep", "eval", "generate", "chat", "export", "serve", "worker"})
TRAINING_VERBS = frozenset({"train", "sweep"})  # freed memory stays with the process for the next step


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc` runs again in each process
    if argv is None and args.verb in MODEL_VERBS:  # the command itself, not a call from Python
        from .allocator import reexec_with_tcmalloc

        if args.verb in TRAINING_VERBS or args.verb in ("serve", "worker"):  # before torch loads libgomp (cpus.py)
            from .cpus import prepare_environment

            prepare_environment()

        # returns unless it re-executes this command with tcmalloc (allocator.py)
        reexec_with_tcmalloc(training=args.verb in TRAINING_VERBS)
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
        if os.environ.get("RANK", "0") == "0":  # every process of a distributed run reads the same input
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _run_failures() as e:  # the run started but cannot go on (full disk, NaN/inf, OOM): a message, exit 1
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _run_failures() -> tuple[type[BaseException], ...]:
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingFailed

    return (CheckpointError, TrainingFailed)


if __name__ == "__main__":
    sys.exit(main())
