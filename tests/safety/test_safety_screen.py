"""Dataset screening: counts with file and line, the three PII policies, the harmful-content threshold,
the moderation hook against a real local HTTP server, and the wiring into `check` and `train`."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tunesmith.cli import main
from tunesmith.config import SafetyConfig
from tunesmith.data import load_splits
from tunesmith.safety import ModerationError, ModerationScreen, screen_splits


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


CLEAN = [chat(f"reverse fox dog {i}", f"dog fox {i}") for i in range(18)]
PII_ROWS = {3: chat("my mail is ann@example.org", "noted"),
            7: chat("card?", "use 4111 1111 1111 1111 or call 415-555-2671"),
            12: chat("key", "AKIAIOSFODNN7EXAMPLE")}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pii_data(tmp_path):
    rows = list(CLEAN)
    for line, row in PII_ROWS.items():
        rows.insert(line - 1, row)
    return write(tmp_path / "train.jsonl", rows), write(tmp_path / "valid.jsonl", CLEAN[:4])


def splits_of(train, valid):
    from tunesmith.config import DataConfig

    return load_splits(DataConfig(train=str(train), valid=str(valid)), 0)


def test_report_counts_each_category_with_file_and_line(pii_data):
    _, report = screen_splits(splits_of(*pii_data), SafetyConfig())
    assert report.ok and report.examples == 25
    assert report.pii_counts == {"email": 1, "payment_card": 1, "phone": 1, "secret": 1}
    assert report.pii_examples == 3
    where = {(h.where.rsplit(":", 1)[1], h.field, h.category) for h in report.pii_hits}
    assert where == {("3", "messages[0].content (user)", "email"), ("7", "messages[1].content (assistant)", "payment_card"),
                     ("7", "messages[1].content (assistant)", "phone"), ("12", "messages[1].content (assistant)", "secret")}
    assert all("train.jsonl" in h.where for h in report.pii_hits)
    text = report.format()
    assert "4111 1111 1111 1111" not in text and "AKIAIOSFODNN7EXAMPLE" not in text  # masked in reports


def test_redact_changes_the_examples_and_refuse_refuses(pii_data):
    splits = splits_of(*pii_data)
    new, report = screen_splits(splits, SafetyConfig(pii_policy="redact"))
    assert report.ok and report.redacted == 4
    texts = [m.content for ex in new.train for m in ex.messages]
    assert "my mail is <EMAIL>" in texts and "use <CARD_NUMBER> or call <PHONE>" in texts and "<SECRET>" in texts
    assert not any("@" in t or "4111" in t for t in texts)
    assert new.train[0] is splits.train[0]  # untouched examples are the same objects
    _, refused = screen_splits(splits, SafetyConfig(pii_policy="refuse"))
    assert not refused.ok and "3 example(s)" in refused.refusals[0]


def test_harmful_threshold_fraction_and_count(tmp_path):
    rows = CLEAN + [chat("How do I build a pipe bomb at home?", "No."), chat("How can I buy cocaine online?", "No.")]
    splits = splits_of(write(tmp_path / "t.jsonl", rows), write(tmp_path / "v.jsonl", CLEAN[:2]))
    _, report = screen_splits(splits, SafetyConfig())  # 2 of 22 = 9% > 5%
    assert report.harmful_counts() == {"lexicon": {"weapons": 1, "drugs": 1}}
    assert not report.ok and "2 of 22 examples" in report.refusals[0]
    assert screen_splits(splits, SafetyConfig(harmful_max_fraction=0.1))[1].ok
    assert not screen_splits(splits, SafetyConfig(harmful_max_fraction=1.0, harmful_max_count=1))[1].ok
    assert screen_splits(splits, SafetyConfig(harmful_policy="report"))[1].ok


def test_check_prints_the_screen_and_refuse_exits_2(pii_data, tiny_model_dir, capsys):
    train, valid = pii_data
    args = ["check", "--model", str(tiny_model_dir), "--data", str(train), "--valid", str(valid)]
    assert main(args + ["--json"]) == 0
    safety = json.loads(capsys.readouterr().out)["safety"]
    assert safety["pii"]["counts"] == {"email": 1, "payment_card": 1, "phone": 1, "secret": 1}
    assert main(args + ["--set", "safety.pii_policy=refuse"]) == 2
    out = capsys.readouterr().out
    assert "safety screen: REFUSED" in out and "email 1" in out and "train.jsonl:7" in out


def test_train_refuses_before_the_model_loads(pii_data, tiny_model_dir, tmp_path, capsys):
    train, valid = pii_data
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--valid", str(valid), "--max-steps", "1",
               "--out", str(tmp_path / "run"), "--quiet", "--set", "safety.pii_policy=refuse"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "safety screen refused" in err and "payment_card 1" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "best").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_train_uses_the_redacted_examples(pii_data, tiny_model_dir, tmp_path, monkeypatch):
    from tunesmith.objectives.sft import SFT

    seen = []
    real = SFT.render
    monkeypatch.setattr(SFT, "render", lambda self, examples, *a, **k: seen.append(list(examples)) or
                        real(self, examples, *a, **k))
    train, valid = pii_data
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--valid", str(valid), "--max-steps", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet", "--set", "data.max_length=64",
                 "--set", "eval.compare_base=false", "--set", "eval.samples=0",
                 "--set", "safety.pii_policy=redact"]) == 0
    trained = [m.content for ex in seen[0] for m in ex.messages]
    assert "my mail is <EMAIL>" in trained and not any("@" in t for t in trained)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "4 redacted" in log


class _Moderation(BaseHTTPRequestHandler):
    requests: list = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).status != 200:
            self.send_response(type(self).status)
            self.end_headers()
            self.wfile.write(b'{"error": "nope"}')
            return
        results = [{"flagged": "attack" in t, "categories": {"violence": "attack" in t, "hate": "hate" in t}}
                   for t in body["input"]]
        data = json.dumps({"id": "modr-1", "model": body["model"], "results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def moderation_server():
    _Moderation.requests, _Moderation.status = [], 200
    server = HTTPServer(("127.0.0.1", 0), _Moderation)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_moderation_hook_posts_batches_and_counts_categories(moderation_server, tmp_path, monkeypatch):
    screen = ModerationScreen(moderation_server + "/", model="omni-moderation-latest", api_key="k-123", batch_size=2)
    assert screen(["plan an attack", "hello", "attack with hate"]) == [{"violence"}, set(), {"violence", "hate"}]
    assert [r["path"] for r in _Moderation.requests] == ["/v1/moderations", "/v1/moderations"]
    assert _Moderation.requests[0]["auth"] == "Bearer k-123"
    assert _Moderation.requests[0]["body"] == {"model": "omni-moderation-latest", "input": ["plan an attack", "hello"]}

    # through the config: the endpoint adds the screen; the key comes from the environment
    monkeypatch.setenv("MY_MOD_KEY", "secret-key")
    rows = CLEAN + [chat("we attack at dawn", "ok")]
    splits = splits_of(write(tmp_path / "t.jsonl", rows), write(tmp_path / "v.jsonl", CLEAN[:1]))
    cfg = SafetyConfig(moderation_endpoint=moderation_server, moderation_api_key_env="MY_MOD_KEY")
    _, report = screen_splits(splits, cfg)
    assert report.harmful_counts() == {"moderation": {"violence": 1}}
    assert report.ok  # 1 of 20 = 5%: not above the limit
    assert _Moderation.requests[-1]["auth"] == "Bearer secret-key"
    assert sum(len(r["body"]["input"]) for r in _Moderation.requests[2:]) == 20


def test_moderation_failure_is_a_user_error(moderation_server, tiny_model_dir, pii_data, capsys):
    _Moderation.status = 500
    with pytest.raises(ModerationError, match="HTTP 500"):
        ModerationScreen(moderation_server)(["x"])
    train, valid = pii_data
    assert main(["check", "--model", str(tiny_model_dir), "--data", str(train), "--valid", str(valid),
                 "--set", f"safety.moderation_endpoint={moderation_server}"]) == 2
    assert "moderation endpoint" in capsys.readouterr().err


def test_count_limit_refuses_three_flagged_examples_in_a_large_set(tmp_path):
    """Qi et al. needed 10 harmful examples; 10 in 200 rows is 5.0%, not above the 5% fraction. The count limit
    (default: 3 or more flagged examples) refuses them whatever the data's size."""
    clean = [chat(f"reverse fox dog {i}", f"dog fox {i}") for i in range(190)]
    harmful = [chat(f"How do I build a pipe bomb at home, step {i}?", "No.") for i in range(10)]
    v = write(tmp_path / "v.jsonl", CLEAN[:2])
    splits = splits_of(write(tmp_path / "t10.jsonl", clean[:188] + harmful), v)  # 10 of 200
    report = screen_splits(splits, SafetyConfig())[1]
    assert len(report.flagged) == 10 and report.flagged_fraction == 0.05
    assert not report.ok and "or at 3 or more examples" in report.refusals[0]
    assert screen_splits(splits, SafetyConfig(harmful_max_count=None))[1].ok  # the fraction alone lets them in
    two = screen_splits(splits_of(write(tmp_path / "t2.jsonl", clean + harmful[:2]), v), SafetyConfig())[1]
    assert two.ok and len(two.flagged) == 2
    three = screen_splits(splits_of(write(tmp_path / "t3.jsonl", clean + harmful[:3]), v), SafetyConfig())[1]
    assert not three.ok and "3 of 195 examples" in three.refusals[0]


# ---------------------------------------------------------------- the screen measured (issue 27, item 4)


def test_screen_on_the_held_out_part_meets_the_target():
    """Issue 27's target, computed: recall >= 0.8 on harmful rows worded without the old lexicon's keywords, at most
    10% false positives on benign rows with scary words. The held-out part was written before any tuning and only
    its totals were ever printed (labelled/SCREEN.md); the word model and the rule were fitted on the dev part."""
    from tunesmith.safety.screen_eval import load_rows, score_screens

    test, dev = load_rows("test"), load_rows("dev")
    assert len(test) + len(dev) >= 200 and len(test) >= 120
    assert not {r["messages"][0]["content"] for r in test} & {r["messages"][0]["content"] for r in dev}
    s = score_screens(test, SafetyConfig())
    assert s.harmful >= 60 and s.benign >= 60
    assert s.recall >= 0.8 and s.false_positive_rate <= 0.10, s.to_dict()


def test_the_shipped_word_model_is_the_dev_part_retrained():
    """screen_words.json is what `screen_eval --train-words` makes from the development part, and from nothing else."""
    from tunesmith.safety.lexicon import WORDS_FILE, train_word_model
    from tunesmith.safety.screen_eval import load_rows, row_text

    shipped = json.loads(WORDS_FILE.read_text())
    again = train_word_model([(row_text(r), r["label"] == "harmful") for r in load_rows("dev")])
    assert shipped["rows"] == len(load_rows("dev")) and shipped["weights"] == again["weights"]
    assert shipped["prior"] == again["prior"]


def test_screen_eval_command(capsys):
    from tunesmith.safety.screen_eval import main as screen_eval

    assert screen_eval(["--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["harmful"] == 62 and figures["benign"] == 66 and 0 <= figures["recall"] <= 1
    assert screen_eval(["--part", "dev"]) == 0
    assert "recall" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the held-out rows are never listed
        screen_eval(["--misses"])


def test_lexicon_screen_flags_reworded_harm_and_passes_safety_talk():
    from tunesmith.safety import lexicon_screen

    harmful = "How do I get my cash into the bank in amounts small enough that nobody reports it?\nDeposit $9,000 or " \
              "less at a time at different branches so the bank never files a report."
    benign = "My toddler swallowed some pills. What should I do?\nCall poison control or emergency services now."
    flags = lexicon_screen([harmful, benign])
    assert flags[0] and not flags[1]


def test_default_policy_redacts_and_says_how_names_are_found(pii_data, monkeypatch):
    from tunesmith.safety import pii

    assert SafetyConfig().pii_policy == "redact"
    monkeypatch.setattr(pii, "resolve_ner", lambda ner: None)  # no spaCy model, as on a fresh machine
    new, report = screen_splits(splits_of(*pii_data), SafetyConfig())
    assert report.ok and report.redacted == 4
    assert "my mail is <EMAIL>" in [m.content for ex in new.train for m in ex.messages]
    assert any("without NER" in n for n in report.notes) and "note: personal data" in report.format()
    assert report.to_dict()["notes"] == report.notes
