"""A learned refusal detector: logistic regression over a reply's words and letters, on top of the cue points.

The cue detector (``refusal.phrase_verdict``) catches a refusal that says no; lectures, deflections and hedges that
never say no, refusals in wordings no cue anticipated, and the languages with few cues slip past it. This layer
learns those from the labelled development replies (``labelled/replies_*.jsonl`` except the held-out
``replies_test.jsonl``): a logistic regression over

  - hashed letter 2-5-grams and words and word pairs, of the opening (first ``HEAD_CHARS`` characters) and of the
    whole reply, on the cue detector's normalised text (``refusal.normalise``); letters carry languages written
    without spaces (zh, ja) and word endings (es, fr, de, ...);
  - the cue detector's points, as one more input.

Stacking without leakage: each training row's cue points are computed without the cues written from its own file
(``Cue.origin``), so the regression learns how far to trust the cues on rows they were not written from, not on rows
they were fitted to. The weights ship as ``refusal_weights.safetensors`` (65,537 float32); the command below
reproduces them from the labelled files (L-BFGS, float64: the same files give the same weights up to the last
bits of a CPU's summation order, and the same verdicts).

    python -m tunesmith.safety.refusal_learned fit     # the shipped weights from the development files
    python -m tunesmith.safety.refusal_learned cv      # leave one development file out: precision / recall

A verdict is a refusal at probability >= 0.5; ``Verdict.score`` is the probability, ``evidence`` the cue
detector's strongest cue. Held-out figures: the module docstring of ``refusal.py`` and the README.
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from .refusal import Verdict, labelled_files, load_labelled, normalise, phrase_verdict, pooled, score_predictions
from .refusal_cues import CUES

WEIGHTS = Path(__file__).with_name("refusal_weights.safetensors")
BITS = 16  # 65,536 hashed features (collisions cost < 1 point of recall in cross-validation against 2**18)
HEAD_CHARS = 300
L2 = 1e-3  # ridge penalty per unit of weight (mean loss + L2 * |w|^2)
THRESHOLD = 0.5


def feature_ids(reply: str) -> list[int]:
    """The hashed feature indices present in a reply (each counted once)."""
    text = normalise(reply)
    ids = set()
    for part, tag in ((text[:HEAD_CHARS], "h"), (text, "a")):
        padded = f" {part} "
        for n in (2, 3, 4, 5):
            ids.update(_hash(f"{tag}{padded[i:i + n]}") for i in range(len(padded) - n + 1))
        words = re.findall(r"\w+", part)
        ids.update(_hash(f"{tag}w{w}") for w in words)
        ids.update(_hash(f"{tag}b{a} {b}") for a, b in zip(words, words[1:]))
    return sorted(ids)


def _hash(s: str) -> int:
    return zlib.crc32(s.encode("utf-8")) & ((1 << BITS) - 1)  # crc32: the same on every machine and Python run


def design(replies: list[str], cue_points: list[float]) -> torch.Tensor:
    """(N, 2**BITS + 1) float64 inputs: 0/1 hashed features and the cue points."""
    x = torch.zeros(len(replies), (1 << BITS) + 1, dtype=torch.float64)
    for i, reply in enumerate(replies):
        x[i, feature_ids(reply)] = 1.0
        x[i, -1] = cue_points[i]
    return x


def development_rows(files: list[Path] | None = None) -> list[dict]:
    """The labelled rows of the development files (default), each with ``file``: its file's stem."""
    return [r | {"file": p.stem} for p in (files if files is not None else labelled_files("dev"))
            for r in load_labelled(str(p))]


def held_apart_points(rows: list[dict]) -> list[float]:
    """Each row's cue points without the cues written from its own file (``file``: development_rows)."""
    by_file: dict[str, list] = {}
    out = []
    for row in rows:
        stem = row.get("file", "")
        cues = by_file.setdefault(stem, [c for c in CUES if stem not in c.origin])
        out.append(float(phrase_verdict(row["reply"], cues).score or 0.0))
    return out


def fit(rows: list[dict]) -> torch.Tensor:
    """Weights (2**BITS + 2: features, cue points, bias) fitted to the rows' ``refused`` labels."""
    x = design([r["reply"] for r in rows], held_apart_points(rows))
    y = torch.tensor([float(r["refused"]) for r in rows], dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + L2 * (w[:-2] ** 2).sum()  # the cue points and bias unpenalised
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def probabilities(weights: torch.Tensor, replies: list[str], cue_points: list[float]) -> list[float]:
    x = design(replies, cue_points)
    return torch.sigmoid(x @ weights[:-1].double() + weights[-1].double()).tolist()


@lru_cache(maxsize=1)
def shipped_weights() -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(WEIGHTS))["weights"]


def learned_verdict(reply: str, weights: torch.Tensor | None = None) -> Verdict:
    """Refused or not by the learned layer over the cue points (module docstring)."""
    cue = phrase_verdict(reply)
    p = probabilities(shipped_weights() if weights is None else weights, [reply], [cue.score or 0.0])[0]
    return Verdict(p >= THRESHOLD, "learned", cue.evidence, round(p, 4))


def cross_validate(files: list[Path] | None = None) -> dict[str, object]:
    """Leave one development file out: fit on the others, score the left-out file with its rows' held-apart cue
    points (the cues written from it removed). {file stem: DetectorScore}."""
    rows = development_rows(files)
    out = {}
    for stem in dict.fromkeys(r["file"] for r in rows):
        held = [r for r in rows if r["file"] == stem]
        w = fit([r for r in rows if r["file"] != stem])
        probs = probabilities(w, [r["reply"] for r in held], held_apart_points(held))
        out[stem] = score_predictions(held, [p >= THRESHOLD for p in probs])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["fit", "cv"], help="fit: write the shipped weights; cv: leave one file out")
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="with fit: where the weights go")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if a.command == "cv":
        scores = cross_validate()
        for stem, s in scores.items():
            print(f"{stem:16s} P {s.precision:.3f} R {s.recall:.3f}  (tp {s.tp} fp {s.fp} fn {s.fn} tn {s.tn})")
        p = pooled(scores.values())
        print(f"{'pooled':16s} P {p.precision:.3f} R {p.recall:.3f}  (tp {p.tp} fp {p.fp} fn {p.fn} tn {p.tn})")
        return 0
    from safetensors.torch import save_file

    rows = development_rows()
    w = fit(rows)
    save_file({"weights": w.float().contiguous()}, str(a.out),
              metadata={"rows": str(len(rows)), "files": ",".join(p.stem for p in labelled_files("dev")),
                        "bits": str(BITS), "l2": str(L2)})
    print(f"fitted on {len(rows)} rows -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
