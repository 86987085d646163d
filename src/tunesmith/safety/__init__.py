"""Safety: screen the data going in, measure the safety coming out, gate the release.

- ``find_pii`` / ``redact`` (pii.py): personal data and secrets in text, typed placeholders.
- ``lexicon_screen``, ``ModerationScreen``, ``register_screen`` (harmful.py, lexicon.py): harmful content.
- ``screen_splits`` / ``screen_training_data`` / ``screen_config`` (screen.py): a dataset under the
  ``safety:`` config section: report, redact or refuse (``SafetyDataError``, exit 2).
- ``load_probes`` (probes.py, probes/): probe sets to refuse and to answer (the project's own, HarmBench,
  over-refusal and contrasts, six languages, jailbreak wrappers), in one hazard taxonomy.
- ``refusal_verdict`` (refusal_lm.py, the default: a probe on the built-in model's hidden states; the n-gram
  layer of refusal_learned.py where that model does not load), ``phrase_verdict`` (refusal.py, the cue points alone),
  ``judge_verdicts``: did the model refuse?
- ``measure_pair`` / ``format_report`` / ``wilson`` (measure.py): refusal rates with intervals, base vs tuned.
- ``decide`` / ``check_release`` / ``after_training`` (gate.py): the release gate on exact paired bounds
  (power.py), with pass / blocked / underpowered (``SafetyGateError``); ``safety_warning`` for chat and serve.
"""

from .gate import GateDecision, SafetyGateError, check_release, decide
from .harmful import ModerationError, ModerationScreen, Screen, lexicon_screen, register_screen
from .measure import format_report, measure_pair, wilson
from .pii import CATEGORIES, PLACEHOLDERS, Finding, find_pii, redact
from .probes import Probe, load_probes
from .refusal import Verdict, judge_verdicts, phrase_verdict
from .screen import SafetyDataError, ScreenReport, screen_config, screen_splits, screen_training_data

__all__ = [
    "CATEGORIES", "Finding", "GateDecision", "ModerationError", "ModerationScreen", "PLACEHOLDERS", "Probe",
    "SafetyDataError", "SafetyGateError", "Screen", "ScreenReport", "Verdict", "check_release", "decide",
    "find_pii", "format_report", "judge_verdicts", "lexicon_screen", "load_probes", "measure_pair",
    "phrase_verdict", "redact", "refusal_verdict", "refusal_verdicts", "register_screen", "screen_config", "screen_splits", "screen_training_data", "wilson",
]


def __getattr__(name):  # refusal_lm on first use: imported with the package, `python -m` would warn running it
    if name in ("refusal_verdict", "refusal_verdicts"):
        from . import refusal_lm

        return getattr(refusal_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
