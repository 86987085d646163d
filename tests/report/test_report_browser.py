"""report.html in a real browser: headless Chromium (Debian's `chromium`, installed by `make setup`) loads the
file offline; a probe script added to a copy of the page reports what the browser actually decoded and laid out."""

import json
import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed: `apt-get install chromium` "
                                "(make setup does this on Debian as root)")

# Runs at the load event: every image decoded (naturalWidth > 0) and laid out with a size, every table's rows.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (i) {
    var r = i.getBoundingClientRect();
    return {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, width: r.width, height: r.height};
  });
  var tables = Array.from(document.querySelectorAll("table")).map(function (t) {
    return {id: t.id, rows: t.rows.length, height: t.getBoundingClientRect().height};
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: images, tables: tables, title: document.title});
  document.body.appendChild(pre);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-extensions", "--virtual-time-budget=10000"]


def _chromium(*args, cwd):
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_plots_and_tables_are_displayed(finished_run, tmp_path):
    html = (finished_run.output_dir / "report.html").read_text(encoding="utf-8")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = _chromium("--dump-dom", probe_page.as_uri(), cwd=tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe output; chromium exit {proc.returncode}: {proc.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))

    assert seen["title"].startswith("tunesmith report")
    assert [i["alt"] for i in seen["images"]] == ["base versus tuned metrics", "training and validation loss",
                                                  "learning rate", "task metrics over time"]
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 300, img  # the PNG decoded
        assert img["width"] > 300 and img["height"] > 100, img  # and is shown at a readable size
    tables = {t["id"]: t for t in seen["tables"]}
    evals = sum(1 for line in open(finished_run.output_dir / "metrics.jsonl") if '"kind": "eval"' in line)
    assert tables["eval-table"]["rows"] == evals + 1
    for name in ("comparison-table", "samples-table", "eval-table", "data-table", "model-table", "hardware-table"):
        assert tables[name]["height"] > 20 and tables[name]["rows"] >= 2, tables[name]


def test_screenshot_is_not_blank(finished_run, tmp_path):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    proc = _chromium("--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}",
                     (finished_run.output_dir / "report.html").as_uri(), cwd=tmp_path)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = imread(str(shot))  # (H, W, channels) in 0..1
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not an empty page
