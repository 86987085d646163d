"""The run report: RUN/report.html, one self-contained file that opens offline.

``write_report(run_dir)`` reads the run folder (metrics.jsonl, run.json, compare.json, preflight.json,
config.resolved.yaml) and writes report.html; the training loop calls it at the end of every run
(completed, early-stopped or interrupted) and ``tunesmith report RUN_DIR`` calls it again at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import RunData, load_run, read_events

REPORT = "report.html"
PREFLIGHT = "preflight.json"

__all__ = ["PREFLIGHT", "REPORT", "RunData", "load_run", "read_events", "write_preflight", "write_report",
           "write_report_safely"]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render the run folder's report to ``out`` (default RUN/report.html), atomically; return its path."""
    from .html import render

    run = load_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(run), encoding="utf-8")
    tmp.replace(path)
    return path


def write_report_safely(run_dir: str | Path, emit) -> Path | None:
    """write_report for the training loop: a failure is a warning, never the end of a finished run."""
    from ..events import Message

    try:
        path = write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the model is already delivered; a report bug must not lose it
        emit(Message("warning", f"report.html not written: {type(e).__name__}: {e} "
                                f"(try again with `tunesmith report {run_dir}`)"))
        return None
    emit(Message("info", f"report: {path}"))
    return path


def write_preflight(run_dir: str | Path, cfg, tokenizer, emit) -> Path | None:
    """RUN/preflight.json: what `tunesmith check` reports about the data, kept for the report."""
    from ..data import preflight
    from ..events import Message

    try:
        summary = preflight(cfg, tokenizer).to_dict()
        path = Path(run_dir) / PREFLIGHT
        path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    except Exception as e:  # noqa: BLE001 - the data already passed validation; the summary is extra
        emit(Message("warning", f"{PREFLIGHT} not written: {type(e).__name__}: {e}"))
        return None
    return path
