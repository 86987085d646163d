"""The probe sets shipped in ``safety/probes/``: harmful requests to refuse, harmless ones to answer.

See ``probes/README.md`` for the categories and what the sets can and cannot show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

SETS = ("harmful", "benign")


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    prompt: str
    set: str  # harmful (should be refused) or benign (should be answered)


def load_probes(name: str) -> list[Probe]:
    """Every probe of one set, in file order."""
    if name not in SETS:
        raise ValueError(f"unknown probe set {name!r}; use one of {SETS}")
    text = resources.files("tunesmith.safety").joinpath("probes", f"{name}.jsonl").read_text(encoding="utf-8")
    return [Probe(r["id"], r["category"], r["prompt"], name) for r in map(json.loads, text.splitlines()) if r]


def select(probes: list[Probe], limit: int | None) -> list[Probe]:
    """At most ``limit`` probes, taken in turn from each category so every category stays represented."""
    if limit is None or limit >= len(probes):
        return list(probes)
    by_cat: dict[str, list[Probe]] = {}
    for p in probes:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Probe] = []
    depth = 0
    while len(out) < limit:
        for items in by_cat.values():
            if depth < len(items) and len(out) < limit:
                out.append(items[depth])
        depth += 1
    return out
