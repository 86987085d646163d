"""The local moderator: a Hugging Face sequence classifier on disk as the harmful-content screen, tested with tiny
random BERT classifiers built here (its scores checked against the model's own forward pass), its label mapping,
its windows over long texts, and its place in the screen registry (the lexicon is the fallback)."""

import json

import pytest
import torch

from tunesmith.config import SafetyConfig
from tunesmith.safety import screen_splits
from tunesmith.safety.harmful import build_screens, screen_names
from tunesmith.safety.moderator import Moderator, ModeratorError, harmful_labels

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "attack", "plan", "dawn", "we", "at", "bake", "bread"]


def _tiny_classifier(path, id2label, problem_type=None, bias=None, seed=0):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=len(id2label),
                     id2label=dict(enumerate(id2label)), label2id={n: i for i, n in enumerate(id2label)},
                     problem_type=problem_type)
    model = BertForSequenceClassification(cfg).eval()
    if bias is not None:  # steer the random classifier: every text gets these logits plus a little noise
        with torch.no_grad():
            model.classifier.weight.mul_(0.01)
            model.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _reference_probs(path, text, multi_label=False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(**tok(text, return_tensors="pt")).logits[0]
    return (torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)).tolist()


def test_scores_are_the_models_own_probabilities(tmp_path):
    path = _tiny_classifier(tmp_path / "m", ["safe", "unsafe"])
    mod = Moderator(path, batch_size=2)
    texts = ["hello world", "we attack at dawn", "the cat sat on the mat", "bake bread"]
    scores = mod.scores(texts)
    assert mod.tokenizer.tokenize("we attack at dawn") == ["we", "attack", "at", "dawn"]  # a real vocabulary, no [UNK]
    for text, got in zip(texts, scores):
        want = _reference_probs(path, text)
        assert got["safe"] == pytest.approx(want[0], abs=1e-5) and got["unsafe"] == pytest.approx(want[1], abs=1e-5)
    assert mod.harmful == {1: "unsafe"}
    assert mod(texts) == [({"unsafe"} if s["unsafe"] >= 0.5 else set()) for s in scores]


def test_threshold_and_multi_label(tmp_path):
    flagged = _tiny_classifier(tmp_path / "hot", ["non_toxic", "toxic"], bias=[-3.0, 3.0])
    assert Moderator(flagged)(["hello", "bake bread"]) == [{"toxic"}, {"toxic"}]
    assert Moderator(flagged, threshold=0.999)(["hello"]) == [set()]
    multi = _tiny_classifier(tmp_path / "multi", ["toxic", "threat", "insult"], "multi_label_classification",
                             bias=[4.0, -4.0, 4.0])
    mod = Moderator(multi)
    assert mod.multi_label and mod(["we attack at dawn"]) == [{"toxic", "insult"}]
    s = mod.scores(["hello"])[0]
    assert s["toxic"] == pytest.approx(_reference_probs(multi, "hello", multi_label=True)[0], abs=1e-5)
    assert sum(s.values()) > 1.0  # sigmoids, not a softmax


def test_long_texts_are_read_in_windows_and_scored_by_the_worst(tmp_path):
    path = _tiny_classifier(tmp_path / "m", ["safe", "unsafe"], seed=3)
    mod = Moderator(path, max_length=8)  # 6 tokens a window after [CLS] and [SEP]
    ids, owner = mod._windows(["hello " * 20, "cat"])
    assert owner.count(0) > 3 and owner.count(1) == 1 and all(len(x) <= 8 for x in ids)
    long = "bake bread " * 6 + "we attack at dawn"
    windows = [mod.tokenizer.decode(x, skip_special_tokens=True) for x, o in zip(*mod._windows([long])) if o == 0]
    assert windows[-1].endswith("attack at dawn")  # the last window reaches the end of the text
    worst = max(_reference_probs(path, w)[1] for w in windows)
    assert mod.scores([long])[0]["unsafe"] == pytest.approx(worst, abs=1e-5)


def test_label_mapping():
    assert harmful_labels({0: "LABEL_0", 1: "LABEL_1"}) == {1: "LABEL_1"}
    assert harmful_labels({0: "safe", 1: "unsafe"}) == {1: "unsafe"}
    assert harmful_labels({0: "neutral", 1: "hate", 2: "offensive"}) == {1: "hate", 2: "offensive"}
    assert harmful_labels({0: "benign", 1: "spam", 2: "scam"}, ["spam", "SCAM"]) == {1: "spam", 2: "scam"}
    with pytest.raises(ModeratorError, match="moderator_labels"):
        harmful_labels({0: "positive", 1: "negative", 2: "mixed"})
    with pytest.raises(ModeratorError, match="does not have"):
        harmful_labels({0: "safe", 1: "unsafe"}, ["toxic"])


def test_the_moderator_replaces_the_lexicon_in_the_screen(tmp_path):
    path = _tiny_classifier(tmp_path / "m", ["safe", "unsafe"], bias=[-3.0, 3.0])
    assert screen_names(SafetyConfig()) == ["lexicon"]  # no moderator: the lexicon is the fallback
    cfg = SafetyConfig(moderator=str(path))
    assert screen_names(cfg) == ["moderator"]
    assert screen_names(SafetyConfig(moderator=str(path), harmful_screens=["lexicon", "moderator"])) == [
        "lexicon", "moderator"]
    assert set(build_screens(cfg)) == {"moderator"}

    from tunesmith.config import DataConfig
    from tunesmith.data import load_splits

    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "world"}]}
            for i in range(4)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataConfig(train=str(tmp_path / "t.jsonl"), valid=str(tmp_path / "t.jsonl")), 0)
    report = screen_splits(splits, cfg)[1]
    assert report.harmful_counts() == {"moderator": {"unsafe": 8}} and not report.ok  # 8 flagged: over the count limit


def test_a_bad_moderator_path_is_a_config_error(tmp_path):
    with pytest.raises(ModeratorError, match="no config.json"):
        build_screens(SafetyConfig(moderator=str(tmp_path / "nowhere")))
    with pytest.raises(ModeratorError, match="safety.moderator"):
        build_screens(SafetyConfig(harmful_screens=["moderator"]))
