"""report.html: written by every run, self-contained, with the numbers of the run folder's files."""

import base64
import json
import re
import struct
from html.parser import HTMLParser

import pytest

from tunesmith.cli import main
from tunesmith.report import load_run, write_report


class _Page(HTMLParser):
    """Tags, attributes and table rows of a page, by table id."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.tables, self._table, self._row = [], {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
            self.tables[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table, self._row = None, None

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data

    def rows(self, table_id):
        """Data rows (not the header) of one table, as lists of cell texts."""
        return [r for r in self.tables[table_id][1:]]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _events(run_dir, kind):
    return [e for e in map(json.loads, open(run_dir / "metrics.jsonl")) if e["kind"] == kind]


@pytest.fixture(scope="module")
def page(finished_run):
    return _Page((finished_run.output_dir / "report.html").read_text(encoding="utf-8"))


def test_every_run_writes_a_self_contained_report(finished_run, page):
    run = finished_run.output_dir
    assert (run / "report.html").is_file() and (run / "preflight.json").is_file()
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe")]
    urls = [v for _, a in page.tags for k, v in a.items() if k in ("src", "href") and v]
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)  # nothing to fetch: opens offline
    images = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    alts = [a["alt"] for t, a in page.tags if t == "img"]
    assert alts == ["base versus tuned metrics", "training and validation loss", "learning rate",
                    "task metrics over time"]
    assert all(w > 300 and h > 150 for w, h in map(_png_size, images))


def test_tables_hold_the_run_numbers(finished_run, page):
    run = finished_run.output_dir
    evals = _events(run, "eval")
    rows = page.rows("eval-table")
    assert [int(r[0]) for r in rows] == [e["step"] for e in evals]
    assert [float(r[3]) for r in rows] == pytest.approx([e["val_loss"] for e in evals], abs=1e-4)
    header = page.tables["eval-table"][0]
    assert header[-5:] == ["exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu"]

    cmp = json.loads((run / "compare.json").read_text())
    table = {r[0]: r for r in page.rows("comparison-table")}
    for name, value in cmp["tuned"]["metrics"].items():
        assert float(table[name][2]) == pytest.approx(value, abs=1e-4)
        assert float(table[name][1]) == pytest.approx(cmp["base"]["metrics"][name], abs=1e-4)
    assert float(table["loss"][2]) == pytest.approx(cmp["tuned"]["loss"]["loss"], abs=1e-4)
    samples = page.rows("samples-table")
    assert [(r[1], r[2], r[3]) for r in samples] == [(s["reference"], s["base"], s["tuned"]) for s in cmp["samples"]]

    data = {r[0]: r for r in page.rows("data-table")}
    assert data["train"][1] == "4" and data["valid"][1] == "8"
    hardware = dict((r[0], r[1]) for r in page.tables["hardware-table"])
    info = json.loads((run / "run.json").read_text())
    assert hardware["device"] == info["hardware"]["device"] and hardware["evaluations"] == str(len(evals))
    model = dict((r[0], r[1]) for r in page.tables["model-table"])
    assert model["trainable parameters"] == f"{info['trainable_params']:,}"


def test_report_shows_where_early_stopping_and_overfitting_happened(finished_run, page):
    run = finished_run.output_dir
    html = (run / "report.html").read_text()
    stop = _events(run, "early_stop")[0]
    (warning,) = _events(run, "overfit_warning")
    assert f"Early stopping fired at step {stop['step']}" in html
    assert f"from step {stop['best_step']}" in html
    assert f"possible overfitting at step {warning['step']}" in html
    assert 'id="status">early_stopped<' in html
    # the warning's evaluation row is marked
    flagged = re.search(r'<tr class="flag"><td class="num">(\d+)</td>', html)
    assert flagged and int(flagged.group(1)) == warning["step"]


def test_report_verb_regenerates_it(finished_run, tmp_path, capsys):
    run = finished_run.output_dir
    out = tmp_path / "again.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    again, first = out.read_text(), (run / "report.html").read_text()
    strip = lambda s: re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d", "", s)  # noqa: E731
    assert strip(again) == strip(first)
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_report_of_a_partial_run_says_what_is_missing(tmp_path, finished_run):
    run = tmp_path / "partial"
    run.mkdir()
    lines = (finished_run.output_dir / "metrics.jsonl").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if '"kind": "eval"' in line)
    (run / "metrics.jsonl").write_text("\n".join(lines[:cut + 1]) + '\n{"kind": "train", "st')  # torn last line
    path = write_report(run)
    html = path.read_text()
    assert "No comparison: compare.json is missing" in html and "No preflight.json" in html
    assert "running or crashed" in html
    data = load_run(run)
    assert len(data.evals) == 1 and len(data.train_steps) == 2
