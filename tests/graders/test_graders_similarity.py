"""The text_similarity metrics: hand-worked values, then agreement with the libraries OpenAI names
(NLTK, rouge-score, RapidFuzz: the test extras) on random sentences."""

import random
import re
from pathlib import Path

import pytest

from tunesmith.graders import porter
from tunesmith.graders.similarity import METRICS, bleu, fuzzy_match, gleu, lcs_length, meteor, rouge_l, rouge_n

HYP, REF = "the cat sat on the red mat", "the cat sat on the mat"


def test_bleu_by_hand():
    # clipped n-gram precisions 6/7, 4/6, 3/5, 2/4; the reply is longer than the reference: no brevity penalty
    assert bleu(HYP, REF) == pytest.approx((6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25)
    assert bleu(REF, REF) == pytest.approx(1.0)
    # shorter than the reference: penalty exp(1 - 6/5); "the cat sat on mat" keeps 5/5, 3/4, 2/3, 1/2
    assert bleu("the cat sat on mat", REF) == pytest.approx(
        (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * 2.718281828459045 ** (1 - 6 / 5))
    assert bleu("Paris", "Paris") == 0.0  # no 4-gram at all: NLTK's unsmoothed BLEU is 0
    assert bleu("", REF) == 0.0


def test_gleu_by_hand():
    # n-grams 1-4: the reply has 7+6+5+4 = 22, the reference 6+5+4+3 = 18; 6+4+3+2 = 15 match
    assert gleu(HYP, REF) == pytest.approx(15 / 22)
    assert gleu("Paris", "Paris") == 1.0
    assert gleu("", "") == 0.0


def test_meteor_by_hand():
    # "the" and "sat" match exactly, "cats" matches "cat" by stem: P = R = 1, one chunk of 3 matches,
    # fragmentation penalty 0.5 * (1/3)^3
    assert meteor("the cats sat", "the cat sat") == pytest.approx(1 - 0.5 / 27)
    # the same words in another order: 3 chunks, penalty 0.5 * (3/3)^3
    assert meteor("sat cat the", "the cat sat") == pytest.approx(0.5)
    assert meteor("dog", "the cat sat") == 0.0
    assert meteor("The CAT sat", "the cat sat") == pytest.approx(1 - 0.5 / 27)  # lowercased, as NLTK does


def test_rouge_by_hand():
    # rouge-score's tokens: lowercase runs of a-z0-9; "The cat sat." -> the, cat, sat: P 3/3, R 3/6
    assert rouge_n(1)("The cat sat.", REF) == pytest.approx(2 / 3)
    assert rouge_n(2)("The cat sat.", REF) == pytest.approx(2 * 1 * (2 / 5) / (1 + 2 / 5))
    # longest common subsequence "the cat on the mat": P 5/5, R 5/6
    assert rouge_l("the cat on the mat", REF) == pytest.approx(10 / 11)
    assert rouge_n(1)("北京", "北京") == 0.0  # rouge-score's tokenizer keeps no non-Latin letters


def test_fuzzy_match_by_hand():
    # kitten / sitting: longest common subsequence "ittn", 2 * 4 / (6 + 7)
    assert fuzzy_match("kitten", "sitting") == pytest.approx(8 / 13)
    assert fuzzy_match("", "") == 1.0 and fuzzy_match("abc", "") == 0.0


def test_bit_parallel_lcs_equals_the_table():
    def table(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 150)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 150)))
        assert lcs_length(a, b) == table(a, b)


def _sentences(n, seed=0):
    rng = random.Random(seed)
    pool = "the cat sat on mat a dog ran fast running runs quickly quick jumped jumps over lazy fox The Cat".split()
    for _ in range(n):
        yield (" ".join(rng.choice(pool) for _ in range(rng.randint(0, 14))),
               " ".join(rng.choice(pool) for _ in range(rng.randint(1, 14))))


@pytest.mark.filterwarnings("ignore")  # NLTK warns on every BLEU without a matching 4-gram
def test_matches_nltk_rouge_score_and_rapidfuzz():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.gleu_score import sentence_gleu
    from nltk.translate.meteor_score import meteor_score
    from rapidfuzz import fuzz
    from rouge_score import rouge_scorer

    class NoWordNet:  # NLTK's METEOR without its synonym stage, which is what we implement
        def synsets(self, word):
            return []

    stemmer = PorterStemmer(mode=PorterStemmer.ORIGINAL_ALGORITHM)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rougeL"])
    for hyp, ref in _sentences(400):
        rouge = scorer.score(ref, hyp)
        expected = {"bleu": bleu_score.sentence_bleu([ref.split()], hyp.split()) if hyp else 0.0,
                    "gleu": sentence_gleu([ref.split()], hyp.split()),
                    "meteor": meteor_score([ref.split()], hyp.split(), stemmer=stemmer, wordnet=NoWordNet()),
                    "fuzzy_match": fuzz.ratio(hyp, ref) / 100,
                    "rouge_l": rouge["rougeL"].fmeasure,
                    **{f"rouge_{n}": rouge[f"rouge{n}"].fmeasure for n in range(1, 6)}}
        for name, value in expected.items():
            assert METRICS[name](hyp, ref) == pytest.approx(value, abs=1e-12), (name, hyp, ref)
    assert fuzz.ratio("", "") / 100 == fuzzy_match("", "")


def test_porter_stemmer_equals_nltk_original_algorithm():
    pytest.importorskip("nltk")
    from nltk.stem.porter import PorterStemmer

    nltk_stem = PorterStemmer(mode=PorterStemmer.ORIGINAL_ALGORITHM).stem
    readme = Path(__file__).parents[2] / "README.md"
    words = sorted(set(re.findall(r"[a-z]+", readme.read_text(encoding="utf-8").lower())))
    words += ["caresses", "ponies", "feed", "agreed", "plastered", "motoring", "conflated", "hopping", "filing",
              "happy", "relational", "generalization", "hopefulness", "electrical", "adjustment", "controll", "rate"]
    assert len(words) > 500
    assert [porter.stem(w) for w in words] == [nltk_stem(w) for w in words]
