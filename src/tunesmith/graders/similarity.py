"""The text_similarity metrics, written out here (each a few dozen lines) and checked against the libraries
OpenAI names, in the tests. Every score is in [0, 1]; ``metric(input, reference)``.

OpenAI's guide says which library each metric comes from, not how the text is split; where it is silent we
take that library's documented usage and say so:

fuzzy_match  RapidFuzz ``fuzz.ratio / 100``: the normalised Indel similarity of the two strings,
             2 * LCS(chars) / (len(a) + len(b)); 1.0 for two empty strings. (OpenAI says "using rapidfuzz";
             ``ratio`` is its plain edit-based ratio, not WRatio's partial-match heuristics.)
bleu         NLTK ``sentence_bleu`` on whitespace tokens, case-sensitive: geometric mean of the clipped 1-4-gram
             precisions times the brevity penalty, no smoothing. So an answer with no matching 4-gram (every
             answer under 4 words) scores 0; use gleu, rouge or fuzzy_match for short answers.
gleu         NLTK ``sentence_gleu`` (Wu et al. 2016, Google's GNMT) on whitespace tokens: matching 1-4-grams
             over the larger of the two n-gram totals, min(precision, recall).
meteor       NLTK ``meteor_score`` (Banerjee & Lavie 2005; alpha 0.9, beta 3, gamma 0.5) on lowercased
             whitespace tokens, with its exact and Porter-stem stages (porter.py) but WITHOUT its WordNet
             synonym stage: WordNet is a download, and nothing is downloaded at run time. Answers that differ
             only by synonyms score lower than OpenAI's would.
rouge_1..5   Google's ``rouge-score`` (Lin 2004): F1 of the clipped n-gram overlap, its tokenizer (lowercase,
rouge_l      runs of [a-z0-9] only, no stemming); rouge_l: F1 of the longest common token subsequence.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Hashable, Sequence

from . import porter


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004; what RapidFuzz does).

    One machine word per 64 elements of ``a`` and a few integer operations per element of ``b``: O(|a||b|/64)
    instead of the O(|a||b|) table, so two 4,000-character replies compare in milliseconds.
    """
    if len(a) < len(b):
        a, b = b, a
    masks: dict[Hashable, int] = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # bit i cleared: a[i] ends a common subsequence one longer than before
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def fuzzy_match(text: str, reference: str) -> float:
    total = len(text) + len(reference)
    return 1.0 if total == 0 else 2 * lcs_length(text, reference) / total


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(text: str, reference: str) -> float:
    hyp, ref = text.split(), reference.split()
    if not hyp:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        counts = _ngrams(hyp, n)
        matched = sum((counts & _ngrams(ref, n)).values())
        if matched == 0:  # NLTK without smoothing: the geometric mean is 0 (up to a 1e-77 it reports)
            return 0.0
        log_precision += math.log(matched / sum(counts.values())) / 4
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def gleu(text: str, reference: str) -> float:
    hyp, ref = text.split(), reference.split()
    matched = hyp_total = ref_total = 0
    for n in range(1, 5):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matched += sum((h & r).values())
        hyp_total, ref_total = hyp_total + sum(h.values()), ref_total + sum(r.values())
    return matched / max(hyp_total, ref_total, 1)


def meteor(text: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    hyp, ref = text.lower().split(), reference.lower().split()
    matches = sorted(_align(hyp, ref))  # (hypothesis index, reference index)
    if not matches:
        return 0.0
    precision, recall = len(matches) / len(hyp), len(matches) / len(ref)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1 + sum(1 for (h0, r0), (h1, r1) in zip(matches, matches[1:]) if (h1, r1) != (h0 + 1, r0 + 1))
    return (1 - gamma * (chunks / len(matches)) ** beta) * fmean


def _align(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """NLTK's greedy alignment: exact matches, then stem matches among the words left, each scanned from
    the end of the hypothesis and the end of the reference."""
    hyp_left, ref_left = list(enumerate(hyp)), list(enumerate(ref))
    pairs: list[tuple[int, int]] = []
    for key in (str, porter.stem):
        for i in range(len(hyp_left) - 1, -1, -1):
            for j in range(len(ref_left) - 1, -1, -1):
                if key(hyp_left[i][1]) == key(ref_left[j][1]):
                    pairs.append((hyp_left[i][0], ref_left[j][0]))
                    hyp_left.pop(i)
                    ref_left.pop(j)
                    break
    return pairs


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer: lowercase, anything but a-z0-9 is a separator (so non-Latin text has none)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    precision, recall = overlap / max(hyp_total, 1), overlap / max(ref_total, 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_n(n: int) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        hyp, ref = _ngrams(rouge_tokens(text), n), _ngrams(rouge_tokens(reference), n)
        return _f1(sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values()))

    score.__name__ = f"rouge_{n}"
    return score


def rouge_l(text: str, reference: str) -> float:
    hyp, ref = rouge_tokens(text), rouge_tokens(reference)
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu, "meteor": meteor,
    **{f"rouge_{n}": rouge_n(n) for n in range(1, 6)}, "rouge_l": rouge_l,
}
