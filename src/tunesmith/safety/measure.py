"""Run the probe sets through a model and its baseline; refusal rates with intervals, per category.

Per model and set: the refusal rate with a Wilson score 95% interval (Wilson 1927; unlike the normal
approximation it stays inside [0, 1] and behaves at rates near 0 or 1, which refusal rates often are).
Between the two models, on the same probes: the change in points with a paired bootstrap 95% interval
(``evaluate.paired_bootstrap_ci`` over per-probe differences of 0/1 refusals).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from .probes import SETS, Probe, load_probes, select
from .judges import Judge, Judgement, as_judge, harm_summary
from .refusal import Verdict

Z95 = 1.959964


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    n: int
    refused: int
    rate: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, flags: list[bool]) -> "Rate":
        k, n = sum(flags), len(flags)
        lo, hi = wilson(k, n)
        return cls(n, k, k / n if n else 0.0, lo, hi)

    def format(self) -> str:
        return f"{self.rate:6.1%} [{self.ci_low:.0%}-{self.ci_high:.0%}] n={self.n}"


@dataclass
class ProbeRun:
    """One model's replies to a list of probes, and the verdicts on them."""

    label: str
    probes: list[Probe]
    replies: list[str]
    verdicts: list[Verdict]
    phrase: list[Verdict]  # the detector's verdict (refusal_lm.refusal_verdicts), kept when a judge decided
    judged: list[Judgement] | None = None  # a judge model's reading of each reply (judges.py), when one was used

    samples: list[list[str]] | None = None  # every sampled reply per probe (samples_per_probe > 1)
    shares: list[float] | None = None  # per probe: the share of its sampled replies that refused

    def rates(self) -> dict:
        """{set: {"all": Rate, "by_category": {category: Rate}}} as plain dicts."""
        out = {}
        for name in SETS:
            idx = [i for i, p in enumerate(self.probes) if p.set == name]
            if not idx:
                continue
            cats: dict[str, list[bool]] = {}
            for i in idx:
                cats.setdefault(self.probes[i].category, []).append(self.verdicts[i].refused)
            out[name] = {"all": asdict(Rate.of([self.verdicts[i].refused for i in idx])),
                         "by_category": {c: asdict(Rate.of(f)) for c, f in cats.items()}}
        return out


def default_probes(limit: int | None = None, sets=None, *, languages=None, wrappers=None,
                   categories=None) -> list[Probe]:
    """The probes a measurement runs: the named sets (default: probes.DEFAULT_SETS, what the release gate runs),
    filtered by language, wrapper and category (probes.load_probes), then at most ``limit`` of each expectation
    (harmful, benign), spread over categories (probes.select)."""
    probes = load_probes(sets, languages=languages, wrappers=wrappers, categories=categories)
    return [p for name in SETS for p in select([q for q in probes if q.set == name], limit)]


def sample_seed(seed: int, probe_id: str, k: int) -> int:
    """The random stream of sample ``k`` of a probe: the same for the base and the tuned model (common random
    numbers: sampling noise then moves both models' replies alike, and the pairing the gate relies on holds)."""
    digest = hashlib.sha256(f"{seed}:{probe_id}:{k}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def run_probes(model, tokenizer, probes: list[Probe], *, label: str, batch_size: int = 16, max_new_tokens: int = 64,
               system_prompt: str | None = None, judge=None, samples_per_probe: int = 1, temperature: float = 1.0,
               seed: int = 0) -> ProbeRun:
    """Greedy replies to every probe (batched, left-padded), judged. ``judge``: a judges.Judge, (model, tokenizer)
    (its format detected) or None (the phrase detector alone)."""
    from ..evaluate import generate_batch

    # A probe's prompt is one user message or a whole conversation (many-shot, multi-turn): probes.Probe.messages.
    # samples_per_probe > 1: that many sampled replies per probe (seeded per probe and sample, sample_seed), judged
    # one by one, then one verdict per probe by majority (combine_samples).
    convs = [p.messages(system_prompt) for p in probes]
    k = max(1, int(samples_per_probe))
    if k == 1:
        replies = generate_batch(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    else:
        replies = _sampled_replies(model, tokenizer, convs, probes, k, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, temperature=temperature, seed=seed)
    originals, probes = probes, [p for p in probes for _ in range(k)]  # one row per reply from here on
    run = judge_replies(label, probes, replies, judge, batch_size=batch_size)
    return combine_samples(run, originals, k)


def judge_replies(label: str, probes: list[Probe], replies: list[str], judge=None, *, batch_size: int = 16) -> ProbeRun:
    """The verdicts on replies already generated: the refusal verdict (refusal_lm.refusal_verdicts, the probe on
    the built-in model) and, with a judge, the judge's reading of each request and reply."""
    from .refusal_lm import refusal_verdicts  # here, not at the top: `python -m ...refusal_lm` runs it

    phrase = refusal_verdicts(replies, [p.text for p in probes])
    verdicts, judged = phrase, None
    if judge is not None:
        judge = as_judge(judge)
        judged = judge.judge([p.text for p in probes], replies, batch_size=batch_size)
        verdicts = judge.verdicts(judged, replies, phrase)
    return ProbeRun(label, probes, replies, verdicts, phrase, judged)


def runs_from_answers(rows: list[dict], judge=None, *, batch_size: int = 16) -> tuple[ProbeRun, ProbeRun | None]:
    """(tuned, base) ProbeRuns rebuilt from a saved answers file (``safety_answers.jsonl``, answer_rows) and judged
    again with today's refusal verdict (or ``judge``): a detector change, or a judge, applied to the replies a
    measurement already generated, without generating them again. The probes are found by id in their sets."""
    if any("tuned_samples" in r for r in rows):
        raise ValueError("these answers were sampled (several replies per probe): re-measure instead")
    by_id = {p.id: p for p in load_probes(sorted({r["source"] for r in rows}))}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} answers name probes the shipped sets no longer have (first: {missing[0]})")
    probes = [by_id[r["id"]] for r in rows]
    tuned = judge_replies("tuned", probes, [r["tuned"] for r in rows], judge, batch_size=batch_size)
    base = (judge_replies("base", probes, [r["base"] for r in rows], judge, batch_size=batch_size)
            if rows and all("base" in r for r in rows) else None)
    return tuned, base


def _sampled_replies(model, tokenizer, convs, probes, k: int, *, max_new_tokens: int, batch_size: int,
                     temperature: float, seed: int) -> list[str]:
    """k sampled replies per conversation, probe by probe; each drawn from its own random stream (sample_seed), so
    a reply depends on its probe, sample number and seed, not on the batch it was generated in."""
    from ..evaluate.generate import decode_reply, eos_token_ids, generate_ids, render_prompt

    ids = [render_prompt(tokenizer, c) for c in convs for _ in range(k)]
    seeds = [sample_seed(seed, p.id, j) for p in probes for j in range(k)]
    out = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
                       temperature=temperature, row_seeds=seeds)
    eos = eos_token_ids(model, tokenizer)
    return [decode_reply(tokenizer, list(new), eos, None) for new, _ in out]


def combine_samples(run: ProbeRun, probes: list[Probe], k: int) -> ProbeRun:
    """One verdict per probe from its ``k`` judged replies (``run`` has k rows per probe, in order): refused when
    more than half of them are (per-probe majority; with an even k a tie counts as answered). Each probe stays one
    0/1 outcome per model, so the gate's exact paired (McNemar) test applies unchanged, with the probes as its
    independent units. The share of refusing samples is kept (``shares``); the reply shown is the first sample
    whose verdict agrees with the majority."""
    if k == 1:
        return run
    rows = [range(i * k, (i + 1) * k) for i in range(len(probes))]
    shares = [sum(run.verdicts[j].refused for j in r) / k for r in rows]
    keep = [next((j for j in r if run.verdicts[j].refused == (s > 0.5)), r[0]) for r, s in zip(rows, shares)]
    verdicts = [replace(run.verdicts[j], refused=s > 0.5,
                        evidence=f"{round(s * k)}/{k} sampled replies refused"
                                 + (f"; e.g. {run.verdicts[j].evidence}" if run.verdicts[j].evidence else ""))
                for j, s in zip(keep, shares)]
    phrase = [replace(run.phrase[j], refused=sum(run.phrase[x].refused for x in r) / k > 0.5)
              for j, r in zip(keep, rows)]
    per_row = {f.name: [getattr(run, f.name)[j] for j in keep] for f in fields(run)
               if f.name not in ("probes", "replies", "verdicts", "phrase", "samples", "shares")
               and isinstance(getattr(run, f.name), list) and len(getattr(run, f.name)) == len(run.probes)}
    return replace(run, probes=list(probes), replies=[run.replies[j] for j in keep], verdicts=verdicts, phrase=phrase,
                   samples=[[run.replies[j] for j in r] for r in rows], shares=shares, **per_row)


def _change(tuned: ProbeRun, base: ProbeRun, name: str) -> dict | None:
    """The paired change on one set: points with a bootstrap 95% interval (for the table), and the discordant
    counts, overall and per category, that the gate's exact bounds are computed from (gate.py, power.py)."""
    from ..evaluate import paired_bootstrap_ci

    idx = [i for i, p in enumerate(tuned.probes) if p.set == name]
    if not idx:
        return None
    diffs = np.array([float(tuned.verdicts[i].refused) - float(base.verdicts[i].refused) for i in idx])
    lo, hi = paired_bootstrap_ci(diffs)
    cats: dict[str, list[float]] = {}
    for i, d in zip(idx, diffs):
        cats.setdefault(tuned.probes[i].category, []).append(d)
    return {"points": round(100 * float(diffs.mean()), 2), "ci_points": [round(100 * lo, 2), round(100 * hi, 2)],
            "n": len(idx), "became_refusals": int((diffs > 0).sum()), "stopped_refusing": int((diffs < 0).sum()),
            "by_category": {c: {"n": len(d), "points": round(100 * float(np.mean(d)), 2),
                                "became_refusals": int(sum(x > 0 for x in d)),
                                "stopped_refusing": int(sum(x < 0 for x in d))}
                            for c, d in cats.items()}}


def build_report(tuned: ProbeRun, base: ProbeRun | None, *, classifier: str, settings: dict,
                 judge: Judge | None = None) -> dict:
    """The safety.json document (rates are fractions; changes are percentage points). With a judge: ``judge``
    (its model, format, unparsed answers) and ``harm`` (per set and model: replies judged harmful, with a Wilson
    interval, and the mean harm score), beside the refusal rates."""
    report = {
        "version": 2,  # 2: paired counts per category (the gate needs them)
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": tuned.label,
        "baseline": base.label if base else None,
        "classifier": classifier,
        "settings": settings,
        "probes": {name: sum(1 for p in tuned.probes if p.set == name) for name in SETS},
        "tuned": tuned.rates(),
        "base": base.rates() if base else None,
        "change": {name: _change(tuned, base, name) for name in SETS} if base else None,
    }
    if any(v.source.startswith("judge") for v in tuned.verdicts):
        report["judge_agreement_with_phrases"] = round(
            float(np.mean([v.refused == p.refused for v, p in zip(tuned.verdicts, tuned.phrase)])), 3)
        report["judge_unparsed"] = sum(v.source == "judge_unparsed" for v in tuned.verdicts)
    if tuned.judged is not None:
        report["judge"] = (judge.describe() if judge else {}) | {
            "unparsed": {"tuned": sum(not j.parsed for j in tuned.judged),
                         "base": sum(not j.parsed for j in base.judged) if base and base.judged else None}}
        if judge is None or judge.scores_harm:
            report["harm"] = {name: {"tuned": _harm(tuned, name), "base": _harm(base, name) if base else None}
                              for name in SETS if any(p.set == name for p in tuned.probes)}
    return report


def _harm(run: ProbeRun | None, name: str) -> dict | None:
    if run is None or run.judged is None:
        return None
    return harm_summary([j for p, j in zip(run.probes, run.judged) if p.set == name])


def answer_rows(tuned: ProbeRun, base: ProbeRun | None) -> list[dict]:
    """One row per probe for the answers file: both replies and verdicts, side by side."""
    rows = []
    for i, p in enumerate(tuned.probes):
        row = {"id": p.id, "set": p.set, "category": p.category, "prompt": p.prompt,
               "tuned": tuned.replies[i], "tuned_refused": tuned.verdicts[i].refused,
               "tuned_evidence": tuned.verdicts[i].evidence}
        if tuned.judged is not None:
            row |= {"tuned_harm_score": tuned.judged[i].score, "tuned_judge": tuned.judged[i].raw}
        if base is not None:
            row |= {"base": base.replies[i], "base_refused": base.verdicts[i].refused,
                    "base_evidence": base.verdicts[i].evidence}
            if base.judged is not None:
                row |= {"base_harm_score": base.judged[i].score, "base_judge": base.judged[i].raw}
        row |= {"source": p.source, "language": p.language, "wrapper": p.wrapper}
        for side, run in (("tuned", tuned), ("base", base)):
            if run is not None and run.samples is not None:
                row |= {f"{side}_samples": run.samples[i], f"{side}_refusal_share": run.shares[i]}
        rows.append(row)
    return rows


def format_report(report: dict) -> str:
    """A plain-text table: set and category rows, base and tuned refusal rates with intervals, change."""
    base, tuned, change = report.get("base"), report["tuned"], report.get("change") or {}
    head = ["refusal rate (95% CI)", "base" if base else "", "tuned" if base else "model", "change (pts, 95% CI)"]
    rows = [head]
    titles = {"harmful": "harmful requests (should refuse)", "benign": "harmless requests (should answer)"}
    for name in SETS:
        if name not in tuned:
            continue
        ch = change.get(name)
        rows.append([titles[name], _cell(base, name, None), _cell(tuned, name, None),
                     f"{ch['points']:+.1f} [{ch['ci_points'][0]:+.1f}, {ch['ci_points'][1]:+.1f}]" if ch else ""])
        for cat in tuned[name]["by_category"]:
            t = tuned[name]["by_category"][cat]
            b = base[name]["by_category"][cat] if base else None
            rows.append([f"  {cat}", _cell(base, name, cat), _cell(tuned, name, cat),
                         f"{100 * (t['rate'] - b['rate']):+.1f}" if b else ""])
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    harm = change.get("harmful") or {}
    if "n" in harm:  # what these paired probes can see (the gate states it with the run's own alpha and power)
        from .power import detectable_drop

        mdd = detectable_drop(harm["n"], (harm["stopped_refusing"] + harm["became_refusals"]) / harm["n"], 0.05)
        lines.append("smallest drop in harmful-request refusals these probes detect with 80% power (alpha 0.05): "
                     + (f"{100 * mdd:.1f} points" if mdd is not None else "none (too few probes)"))
    for name, h in (report.get("harm") or {}).items():  # the judge's view of what was said, beside the refusals
        lines.append(f"judged harmful ({name} requests): " + "; ".join(
            f"{side} {_harm_cell(h[side])}" for side in ("base", "tuned") if h.get(side)))
    lines.append(f"classifier: {report['classifier']}; model: {report['model']}"
                 + (f"; baseline: {report['baseline']}" if report.get("baseline") else ""))
    return "\n".join(lines)


def _harm_cell(h: dict) -> str:
    mean = f", mean harm score {h['mean_score']:.2f}" if h.get("mean_score") is not None else ""
    unparsed = f", {h['unparsed']} unreadable" if h.get("unparsed") else ""
    return Rate(**h["harmful"]).format() + mean + unparsed


def _cell(side: dict | None, name: str, cat: str | None) -> str:
    if not side:
        return ""
    r = side[name]["all"] if cat is None else side[name]["by_category"][cat]
    return Rate(**r).format()


@dataclass(frozen=True)
class Baseline:
    """The model ``measure_pair`` compares with, obtained (``evaluate.base_model``) only while it is measured:
    a LoRA model's own base is the model with its adapters off; any other is loaded, then let go."""

    ref: str | None  # model ref, saved model or run folder; None: a LoRA model's own base (its adapters off)
    label: str | None = None  # how the report names a loaded base (default: ref)
    own_base: bool = True  # ref is the model the measured one was tuned from
    tokenizer: Any = None  # what a loaded base answers with; None: its own
    trust_remote_code: bool = False


def measure_pair(model, tokenizer, label: str, baseline: Baseline | None, *, probes: list[Probe],
                 batch_size: int = 16, max_new_tokens: int = 64, system_prompt: str | None = None, judge=None,
                 judge_label: str | None = None, samples_per_probe: int = 1, temperature: float = 1.0,
                 seed: int = 0) -> tuple[dict, list[dict]]:
    """(safety report, answer rows) for ``model`` against ``baseline`` (None: the model alone).

    ``judge`` is a judges.Judge, (model, tokenizer) (format from its name and template) or None.
    """
    from ..evaluate.base import base_model

    judge = as_judge(judge, judge_label)
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, system_prompt=system_prompt, judge=judge,
              samples_per_probe=samples_per_probe, temperature=temperature, seed=seed)
    tuned = run_probes(model, tokenizer, probes, label=label, **kw)
    base = None
    if baseline is not None:
        with base_model(model, baseline.ref, own_base=baseline.own_base,
                        trust_remote_code=baseline.trust_remote_code) as b:
            if b.adapters_off:
                base = run_probes(b.model, tokenizer, probes, label=f"{label} with adapters off (its base)", **kw)
            else:
                base = run_probes(b.model, baseline.tokenizer or b.tokenizer, probes,
                                  label=baseline.label or str(baseline.ref), **kw)
    classifier = (f"judge model {judge_label}" if judge is not None
                  else "probe on the built-in model's hidden states (tunesmith.safety.refusal_lm)")
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "system_prompt": system_prompt,
                "decoding": "greedy" if samples_per_probe <= 1 else
                f"sampled: {samples_per_probe} replies per probe at temperature {temperature:g}, seed {seed}, "
                "refused by per-probe majority"}
    return build_report(tuned, base, classifier=classifier, settings=settings, judge=judge), answer_rows(tuned, base)
