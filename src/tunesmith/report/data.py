"""Read a run folder into what the report shows: events from metrics.jsonl plus the run's JSON files.

Everything is optional: a report of an interrupted run, or of a run from before a file existed, shows
what there is and says what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class RunData:
    run_dir: Path
    events: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # run.json
    config: dict = field(default_factory=dict)  # config.resolved.yaml
    compare: dict | None = None  # compare.json
    preflight: dict | None = None  # preflight.json
    safety: dict | None = None  # safety.json (tunesmith safety / the release gate)

    # ---------------------------------------------------------------- views of the events

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("kind") == kind]

    @property
    def train_steps(self) -> list[dict]:
        """One train event per step; after a resume the later record of a step wins."""
        return _last_per_step(self.of_kind("train"))

    @property
    def evals(self) -> list[dict]:
        return _last_per_step(self.of_kind("eval"))

    @property
    def early_stop(self) -> dict | None:
        stops = self.of_kind("early_stop")
        return stops[-1] if stops else None

    @property
    def overfit_warnings(self) -> list[dict]:
        return _last_per_step(self.of_kind("overfit_warning"))

    @property
    def warnings(self) -> list[dict]:
        return [e for e in self.of_kind("message") if e.get("level") in ("warning", "error")]

    @property
    def started(self) -> dict | None:
        runs = self.of_kind("run_started")
        return runs[0] if runs else None

    @property
    def ended(self) -> dict | None:
        ends = self.of_kind("run_ended")
        return ends[-1] if ends else None

    @property
    def status(self) -> str:
        end = self.ended
        return end["status"] if end else "running or crashed (no run_ended event)"

    @property
    def elapsed_s(self) -> float | None:
        """Wall time over every segment of the run (a resumed run has one run_ended per segment)."""
        ends = self.of_kind("run_ended")
        return sum(e.get("elapsed_s") or 0.0 for e in ends) if ends else None

    @property
    def best(self) -> tuple[int | None, float | None]:
        end = self.ended
        if end and end.get("best_step") is not None:
            return end["best_step"], end.get("best_val_loss")
        best = [e for e in self.evals if e.get("is_best")]
        return (best[-1]["step"], best[-1]["val_loss"]) if best else (None, None)

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for e in self.evals:
            names += [k for k in (e.get("metrics") or {}) if k not in names]
        return names

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def load_run(run_dir: str | Path) -> RunData:
    """Read RUN/metrics.jsonl, run.json, config.resolved.yaml, compare.json, preflight.json and safety.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder")
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has neither metrics.jsonl nor run.json "
                                "(a run folder is the output_dir of `tunesmith train`)")
    return RunData(run_dir, events=read_events(run_dir / "metrics.jsonl"), info=_json(run_dir / "run.json") or {},
                   config=_yaml(run_dir / "config.resolved.yaml"), compare=_json(run_dir / "compare.json"),
                   preflight=_json(run_dir / "preflight.json"), safety=_json(run_dir / "safety.json"))


def read_events(path: Path) -> list[dict]:
    """Every parseable line of metrics.jsonl; a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict):
            events.append(e)
    return events


def _last_per_step(events: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for e in events:
        by_step[e.get("step", 0)] = e
    return [by_step[s] for s in sorted(by_step)]


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return value if isinstance(value, dict) else {}
