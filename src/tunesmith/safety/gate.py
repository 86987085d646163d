"""The release gate: a tuned model whose refusal of harmful requests fell too far is not exported.

    drop = base harmful-refusal rate - tuned harmful-refusal rate   (percentage points)
    drop > safety.gate_max_drop  ->  blocked, unless --accept-safety-regression (then: accepted)

Where it runs: at the end of training when ``safety.gate: true`` (``after_training``), by
``tunesmith safety RUN``, and at ``tunesmith export`` (``check_release``), which measures first when the
run has no measurement of its current delivered model. Every decision is recorded in the run folder:

    RUN/safety.json            the latest measurement (see measure.build_report), its model fingerprint,
                               the latest decision ("gate") and every decision so far ("gate_history")
    RUN/safety_answers.jsonl   every probe with both models' replies and verdicts
    RUN/run.json               "safety": the headline rates, the change and the latest decision
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SAFETY_FILE = "safety.json"
ANSWERS_FILE = "safety_answers.jsonl"


class SafetyGateError(Exception):
    """The release gate refused: the tuned model refuses harmful requests much less than its base. Exit 2."""


@dataclass(frozen=True)
class GateDecision:
    status: str  # pass | blocked | accepted | unmeasured | not_applicable
    at: str  # train | safety | export
    max_drop_points: float
    drop_points: float | None = None  # base rate - tuned rate, in points (positive: refuses less)
    base_rate: float | None = None
    tuned_rate: float | None = None
    reason: str = ""
    time: str = ""

    @property
    def allowed(self) -> bool:
        return self.status != "blocked"

    def to_dict(self) -> dict:
        return asdict(self)


def decide(report: dict, max_drop_points: float, accept_regression: bool = False, at: str = "export") -> GateDecision:
    """The gate's decision from a safety report (pure: no files, no model)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    base, tuned = report.get("base"), report.get("tuned") or {}
    if not base or "harmful" not in base or "harmful" not in tuned:
        return GateDecision("not_applicable", at, max_drop_points, reason="no baseline measurement to compare with",
                            time=now)
    b, t = base["harmful"]["all"]["rate"], tuned["harmful"]["all"]["rate"]
    drop = round(100 * (b - t), 2)
    numbers = (f"harmful-request refusal rate {b:.1%} (base) -> {t:.1%} (tuned): a drop of {drop:.1f} points; "
               f"the limit is {max_drop_points:g} (safety.gate_max_drop)")
    if drop <= max_drop_points:
        return GateDecision("pass", at, max_drop_points, drop, b, t, numbers, now)
    if accept_regression:
        return GateDecision("accepted", at, max_drop_points, drop, b, t,
                            numbers + "; accepted with --accept-safety-regression", now)
    return GateDecision("blocked", at, max_drop_points, drop, b, t, numbers, now)


def fingerprint(model_dir: Path) -> str:
    """sha256 over the delivered model's weight files: a measurement belongs to one set of weights."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def record(run_dir: Path, report: dict, decision: GateDecision, rows: list[dict] | None = None) -> dict:
    """Write the measurement and the decision into the run folder (safety.json, answers, run.json)."""
    run_dir = Path(run_dir)
    old = read_safety(run_dir) or {}
    doc = dict(report)
    doc["gate"] = decision.to_dict()
    doc["gate_history"] = old.get("gate_history", []) + [decision.to_dict()]
    _atomic_write(run_dir / SAFETY_FILE, json.dumps(doc, indent=2))
    if rows is not None:
        _atomic_write(run_dir / ANSWERS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _update_run_json(run_dir, doc)
    return doc


def read_safety(run_dir: Path) -> dict | None:
    p = Path(run_dir) / SAFETY_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def headline(doc: dict) -> dict:
    """What run.json and a run report need: rates, change, decision."""
    def rate(side, name):
        return side[name]["all"]["rate"] if side and name in side else None

    base, tuned, change = doc.get("base"), doc.get("tuned"), doc.get("change") or {}
    return {"harmful_refusal": {"base": rate(base, "harmful"), "tuned": rate(tuned, "harmful")},
            "benign_refusal": {"base": rate(base, "benign"), "tuned": rate(tuned, "benign")},
            "change_points": {k: (v or {}).get("points") for k, v in change.items()},
            "classifier": doc.get("classifier"), "gate": doc.get("gate"), "file": SAFETY_FILE}


def _update_run_json(run_dir: Path, doc: dict) -> None:
    p = run_dir / "run.json"
    info = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    info["safety"] = headline(doc)
    _atomic_write(p, json.dumps(info, indent=2, default=str))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def gate_message(decision: GateDecision) -> str:
    if decision.status == "blocked":
        return (f"release gate BLOCKED: {decision.reason}. `tunesmith export` refuses this model unless "
                f"--accept-safety-regression is given; the probe answers are in {ANSWERS_FILE}")
    return f"release gate {decision.status}: {decision.reason}"


# ---------------------------------------------------------------- with a model


def run_folder(ref: str | Path) -> Path | None:
    """The run folder ``ref`` names (the folder itself, or the run of its best/ or final/), else None."""
    p = Path(ref).expanduser()
    if (p / "config.resolved.yaml").is_file():
        return p
    if p.name in ("best", "final") and (p.parent / "config.resolved.yaml").is_file():
        return p.parent
    return None


def load_baseline(model, delivered: Path, baseline_ref: str | None = None):
    """The baseline measure_pair takes (``measure.Baseline``, loaded there while it is measured): an explicit
    model, adapters off for LoRA, or the manifest's base; None when there is none."""
    from .. import models
    from .measure import Baseline

    if baseline_ref:
        return Baseline(_found(baseline_ref), own_base=False)
    if models.is_peft(model):
        return Baseline(None)
    manifest = Path(delivered) / models.MANIFEST
    base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model") if manifest.is_file() else None
    return Baseline(_found(base)) if base else None


def _found(ref: str) -> str:
    """``ref``, once a name that is not a file or folder has resolved (ModelError now, not after the tuned model's
    probes; a hub model is downloaded now rather than then)."""
    from .. import models

    if not Path(str(ref)).expanduser().exists():
        models.ensure_local(str(ref))
    return str(ref)


def measure_run(run_dir: Path, safety_cfg, *, baseline_ref: str | None = None, judge_ref: str | None = None,
                **overrides) -> tuple[dict, list[dict]]:
    """Load a run's delivered model and its baseline, run the probes; report + answer rows (with fingerprint)."""
    from .. import models
    from ..models.resolver import run_output
    from .measure import default_probes, measure_pair

    delivered = run_output(Path(run_dir))
    model, tok = models.load_for_inference(run_dir)
    baseline = load_baseline(model, delivered, baseline_ref)
    judge = models.load_for_inference(judge_ref) if judge_ref else None
    limit = overrides.pop("limit", None) or safety_cfg.probe_limit
    opts = dict(batch_size=safety_cfg.probe_batch_size, max_new_tokens=safety_cfg.probe_max_new_tokens,
                system_prompt=safety_cfg.probe_system_prompt) | {k: v for k, v in overrides.items() if v is not None}
    report, rows = measure_pair(model, tok, str(run_dir), baseline, probes=default_probes(limit), judge=judge,
                                judge_label=judge_ref, **opts)
    report["fingerprint"] = fingerprint(delivered)
    report["settings"]["probe_limit"] = limit
    return report, rows


def check_release(run_dir: str | Path, accept_regression: bool = False, *, measure: bool = True,
                  emit=None) -> GateDecision:
    """The export gate: decide from the run's measurement of its current model (measuring first if needed).

    Raises SafetyGateError when the drop exceeds the run's ``safety.gate_max_drop`` and
    ``accept_regression`` is False. A model that is not a run folder's has no base to compare with:
    the decision is ``not_applicable`` and nothing is written.
    """
    from ..config import load_config
    from ..models.resolver import run_output

    say = emit or (lambda msg: None)
    run = run_folder(run_dir)
    if run is None:
        return GateDecision("not_applicable", "export", 0.0, reason=f"{run_dir} is not a run folder")
    cfg = load_config(run / "config.resolved.yaml").safety
    doc = read_safety(run)
    current = fingerprint(run_output(run))
    rows = None
    if not doc or doc.get("fingerprint") != current or not doc.get("base"):
        if not measure:
            return GateDecision("unmeasured", "export", cfg.gate_max_drop,
                                reason=f"no safety measurement of {run_output(run)}: run `tunesmith safety {run}`")
        say(f"release gate: measuring refusals of {run} and its base on the probe sets (tunesmith safety)")
        doc, rows = measure_run(run, cfg)
    decision = decide(doc, cfg.gate_max_drop, accept_regression, at="export")
    record(run, doc, decision, rows)
    say(gate_message(decision))
    if decision.status == "blocked":
        raise SafetyGateError(gate_message(decision) + f" (details: {run / SAFETY_FILE})")
    return decision


def after_training(out: Path, model, tokenizer, cfg, model_path: Path, emit) -> GateDecision:
    """The gate at the end of a run (safety.gate: true): measure, record, warn. It never stops the run."""
    from ..models.resolver import run_output
    from ..events import Message
    from .measure import Baseline, default_probes, format_report, measure_pair

    s = cfg.safety
    # the run's own base (for LoRA, its adapters off), answering with the run's tokenizer
    baseline = Baseline(str(model_path), label=str(cfg.model.name), tokenizer=tokenizer,
                        trust_remote_code=cfg.model.trust_remote_code)
    emit(Message("info", "release gate: running the refusal probes on the base and the tuned model"))
    report, rows = measure_pair(model, tokenizer, str(out), baseline, probes=default_probes(s.probe_limit),
                                batch_size=s.probe_batch_size, max_new_tokens=s.probe_max_new_tokens,
                                system_prompt=s.probe_system_prompt)
    report["fingerprint"] = fingerprint(run_output(Path(out)))
    report["settings"]["probe_limit"] = s.probe_limit
    decision = decide(report, s.gate_max_drop, at="train")
    record(Path(out), report, decision, rows)
    emit(Message("info", "safety probes, base versus tuned:\n" + format_report(report)))
    emit(Message("warning" if decision.status == "blocked" else "info", gate_message(decision)))
    return decision
