"""The Porter stemmer, as published (M. F. Porter, "An algorithm for suffix stripping", Program 14(3), 1980).

METEOR's stem stage matches words with the same stem. NLTK's meteor_score uses NLTK's PorterStemmer; this is
that stemmer's ORIGINAL_ALGORITHM mode (the paper's rules, every word length), checked against it word for
word in the tests. NLTK's default mode adds irregular forms and a few rule changes; we leave those out.
"""

from __future__ import annotations

from functools import lru_cache

_VOWELS = frozenset("aeiou")

_STEP2 = (("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"),
          ("ization", "ize"), ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
          ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"))
_STEP3 = (("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
          ("ness", ""))
_STEP4 = ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism",
          "ate", "iti", "ous", "ive", "ize")


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The Porter stem of a word, lowercased first."""
    w = word.lower()
    for step in (_step1a, _step1b, _step1c, _step2, _step3, _step4, _step5a, _step5b):
        w = step(w)
    return w


def _consonant(w: str, i: int) -> bool:
    if w[i] in _VOWELS:
        return False
    if w[i] == "y":  # y after a consonant is a vowel ("happy"), at the start or after a vowel a consonant
        return i == 0 or not _consonant(w, i - 1)
    return True


def _measure(stem_: str) -> int:
    """m in [C](VC)^m[V]: the number of vowel-consonant sequences."""
    cv = "".join("c" if _consonant(stem_, i) else "v" for i in range(len(stem_)))
    return cv.count("vc")


def _has_vowel(stem_: str) -> bool:
    return any(not _consonant(stem_, i) for i in range(len(stem_)))


def _double_consonant(w: str) -> bool:
    return len(w) >= 2 and w[-1] == w[-2] and _consonant(w, len(w) - 1)


def _cvc(w: str) -> bool:
    """*o: consonant-vowel-consonant at the end, the last not w, x or y ("hop", not "snow")."""
    n = len(w)
    return (n >= 3 and _consonant(w, n - 3) and not _consonant(w, n - 2) and _consonant(w, n - 1)
            and w[-1] not in "wxy")


def _replace(w: str, rules, condition) -> str:
    """The first rule whose suffix ends the word applies if its condition holds; no later rule is tried."""
    for suffix, replacement in rules:
        if w.endswith(suffix):
            base = w[:len(w) - len(suffix)]
            return base + replacement if condition(base) else w
    return w


def _step1a(w: str) -> str:
    return _replace(w, (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")), lambda base: True)


def _step1b(w: str) -> str:
    if w.endswith("eed"):
        return w[:-1] if _measure(w[:-3]) > 0 else w
    for suffix in ("ed", "ing"):
        if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
            return _step1b_tidy(w[:-len(suffix)])
    return w


def _step1b_tidy(w: str) -> str:
    """After removing -ed/-ing: restore an e (conflat(ed) -> conflate), undouble (hopp(ing) -> hop)."""
    for suffix, replacement in (("at", "ate"), ("bl", "ble"), ("iz", "ize")):
        if w.endswith(suffix):
            return w[:-len(suffix)] + replacement
    if _double_consonant(w):
        return w[:-1] if w[-1] not in "lsz" else w
    if _measure(w) == 1 and _cvc(w):
        return w + "e"
    return w


def _step1c(w: str) -> str:
    return w[:-1] + "i" if w.endswith("y") and _has_vowel(w[:-1]) else w


def _step2(w: str) -> str:
    return _replace(w, _STEP2, lambda base: _measure(base) > 0)


def _step3(w: str) -> str:
    return _replace(w, _STEP3, lambda base: _measure(base) > 0)


def _step4(w: str) -> str:
    for suffix in _STEP4:
        if w.endswith(suffix):
            base = w[:-len(suffix)]
            keep = _measure(base) > 1 and (suffix != "ion" or base[-1:] in ("s", "t"))
            return base if keep else w
    return w


def _step5a(w: str) -> str:
    if w.endswith("e"):
        m = _measure(w[:-1])
        if m > 1 or (m == 1 and not _cvc(w[:-1])):
            return w[:-1]
    return w


def _step5b(w: str) -> str:
    return w[:-1] if w.endswith("ll") and _measure(w[:-1]) > 1 else w
