"""`tunesmith sweep CONFIG.yaml --trials N [--study NAME] [--storage URL] [--out DIR]`."""

from __future__ import annotations

import sys

SWEEP_EXAMPLES = """examples:
  tunesmith sweep config.yaml --trials 20                                           # the config has a sweep: section
  tunesmith sweep config.yaml --trials 10 --storage sweeps/lr/study.db --study lr   # continue it later the same way
  tunesmith sweep config.yaml --trials 10 --storage postgresql://user@db/tunesmith  # on each of several machines
  tunesmith sweep config.yaml --trials 0                                            # only rewrite the report
"""


def add_parser(sub) -> None:
    import argparse

    s = sub.add_parser("sweep", help="search hyperparameters (Optuna), pruning poor trials early",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run trials of the search space in the config's `sweep:` section, each a normal "
                       "run folder under the sweep folder; write a table, best_config.yaml and sweep.html. Processes "
                       "given the same --study and --storage share the study's trials.")
    s.add_argument("config", help="YAML config with a sweep: section")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    s.add_argument("--trials", type=int, help="trials this process runs (sweep.n_trials); 0: only write the report")
    s.add_argument("--study", help="study name (sweep.study_name)")
    s.add_argument("--storage", help="Optuna storage URL or file (sweep.storage; default OUT/study.db)")
    s.add_argument("--out", help="sweep folder (sweep.output_dir)")
    s.add_argument("--quiet", action="store_true", help="no progress bar inside trials")


def cmd_sweep(args) -> int:
    from ..cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, _GracefulStop
    from ..config import load_config
    from .report import format_table
    from .runner import run_sweep

    cfg = load_config(args.config, args.overrides)
    if args.trials is not None and args.trials < 0:
        print("error: --trials must be 0 or more", file=sys.stderr)
        return EXIT_BAD_INPUT
    stop = _GracefulStop()
    with stop:
        result = run_sweep(cfg, n_trials=args.trials, study_name=args.study, storage=args.storage, out=args.out,
                           quiet=args.quiet, stop_requested=lambda: stop.requested,
                           echo=lambda line: print(line, flush=True))
    from rich.console import Console

    Console(width=200).print(format_table(result.rows, cfg.sweep.objective,
                                          result.best["number"] if result.best else None))
    if result.best:
        print(f"best: trial {result.best['number']}, {cfg.sweep.objective} {result.best['value']:.4f}, "
              f"{result.best['params']}")
    for key in ("best_config", "html"):
        if key in result.files:
            print(f"{key.replace('_', ' ')}: {result.files[key]}")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result.stopped:
        import shlex

        again = ["tunesmith", "sweep", args.config, *[a for o in args.overrides for a in ("--set", o)],
                 "--study", result.study_name, "--storage", result.storage, "--out", str(result.out)]
        print("sweep stopped; the interrupted trial kept its checkpoint. Continue the sweep with:\n  "
              + shlex.join(again), file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.all_failed:
        print(f"error: every trial this process ran failed; see the errors above and in {result.out / 'sweep.json'}",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
