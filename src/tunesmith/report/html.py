"""report.html: one self-contained page (inline CSS, plots as base64 PNG data URIs, no scripts, no links out).

Sections, in the order a reader asks: did it work (summary, base versus tuned), how did training go
(curves, the evaluation table, where early stopping and overfitting warnings fired), what went in (data
summary, parameters), and where it ran (hardware, timings).
"""

from __future__ import annotations

import base64
import datetime
import math
from pathlib import Path
from html import escape

from . import plots
from .data import RunData

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 10px;border-bottom:1px solid #d9dee5;padding-bottom:4px}
.sub{color:#5b6575;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #d9dee5;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:1.25em}.card span{color:#5b6575;font-size:.8em}
table{border-collapse:collapse;background:#fff;font-size:.85em;margin:6px 0;width:100%}
th,td{border:1px solid #d9dee5;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#eaf7ee}tr.flag td{background:#fff4e5}
.good{color:#1b7f3b}.bad{color:#b00020}.ok{background:#eaf7ee}.miss{background:#fdecee}
img{max-width:100%;background:#fff;border:1px solid #d9dee5;border-radius:6px;display:block;margin:8px 0}
.note{background:#fff;border-left:4px solid #e07b00;padding:6px 10px;margin:6px 0;font-size:.9em}
.note.stop{border-color:#b00020}.note.info{border-color:#1f5fa8}
pre{background:#fff;border:1px solid #d9dee5;padding:8px;overflow-x:auto;font-size:.8em;white-space:pre-wrap}
mark{background:#c9f0d3}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:.8em;background:#eef1f5}
.badge.completed{background:#c9f0d3}.badge.early_stopped{background:#ffe2b8}.badge.interrupted{background:#fdd}
"""


def render(run: RunData) -> str:
    body = [_header(run), _summary_cards(run), _comparison(run), _safety(run), _training(run), _evaluations(run),
            _data(run), _model(run), _hardware(run)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>tunesmith report: {escape(run.name)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


# ---------------------------------------------------------------- sections


def _header(run: RunData) -> str:
    status = run.status
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<h1>tunesmith run report: {escape(run.name)}</h1>"
            f"<div class=\"sub\"><span class=\"badge {escape(status)}\" id=\"status\">{escape(status)}</span> "
            f"&middot; {escape(str(run.run_dir.resolve()))} &middot; written {now}</div>")


def _summary_cards(run: RunData) -> str:
    info, cards = run.info, []
    ended = run.ended
    steps = ended["step"] if ended else (run.train_steps[-1]["step"] if run.train_steps else 0)
    total = (run.started or {}).get("total_steps") or (info.get("plan") or {}).get("total_steps")
    cards.append(("optimizer steps", f"{steps} / {total}" if total else str(steps)))
    best_step, best_loss = run.best
    if best_step is not None:
        cards.append(("best validation loss", f"{_f(best_loss)} at step {best_step}"))
    c = (run.compare or {}).get("comparison")
    if c:
        cards.append((f"{c['metric']}: base &rarr; tuned", f"{_f(c['mean_a'], 3)} &rarr; {_f(c['mean_b'], 3)}"))
    if info.get("trainable_params") is not None:
        cards.append(("trainable parameters", f"{info['trainable_params']:,} ({100 * info.get('trainable_fraction', 0):.2f}%)"))
    if run.elapsed_s is not None:
        cards.append(("wall time", _duration(run.elapsed_s)))
    return "<div class=\"cards\">" + "".join(
        f"<div class=\"card\"><b>{v}</b><span>{k}</span></div>" for k, v in cards) + "</div>"


def _comparison(run: RunData) -> str:
    out = ["<h2 id=\"comparison\">Base versus tuned</h2>"]
    cmp = run.compare
    if not cmp:
        out.append("<p class=\"sub\">No comparison: compare.json is missing (eval.compare_base off, the run was "
                   "interrupted, or it had no held-out chat examples). Run <code>tunesmith eval RUN --data TEST.jsonl"
                   "</code> to make one.</p>")
        return "".join(out)
    base, tuned = cmp.get("base", {}), cmp.get("tuned", {})
    a, b = _headline(base), _headline(tuned)
    c = cmp.get("comparison") or {}
    rows = []
    for name in list(dict.fromkeys([*a, *b])):
        va, vb = a.get(name), b.get(name)
        lower = name in ("loss", "perplexity")
        ci = f"{_f(c['ci_low'], 3, True)} to {_f(c['ci_high'], 3, True)}" if c and name == c.get("metric") else ""
        rows.append(f"<tr><td>{escape(name)}</td><td class=\"num\">{_f(va)}</td><td class=\"num\">{_f(vb)}</td>"
                    f"<td class=\"num\">{_delta(va, vb, lower)}</td><td class=\"num\">{ci}</td></tr>")
    if rows:  # text metrics of generated answers (sft; dpo's side-by-side answers): not for grpo's or images' own figures
        out.append(f"<p>{escape(str(cmp.get('examples')))} held-out examples from {escape(str(cmp.get('source')))}.</p>")
        out.append("<table id=\"comparison-table\"><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th>"
                   "<th>95% CI of the mean per-example difference</th></tr>" + "".join(rows) + "</table>")
    if c:
        sig = "significant: the interval excludes 0" if c.get("significant") else "not significant: the interval includes 0"
        out.append(f"<p class=\"note info\">{escape(c['metric'])} over {c['n']} examples: tuned wins <b>{c['wins']}</b>, "
                   f"loses <b>{c['losses']}</b>, ties <b>{c['ties']}</b>; mean difference {_f(c['diff'], 4, True)} "
                   f"(paired bootstrap, {c.get('n_boot', 1000)} resamples; {sig}).</p>")
    pref = cmp.get("preference")
    if pref:
        out.append(f"<p class=\"note info\" id=\"preference-accuracy\">Held-out preference accuracy ({escape(pref['what'])}) "
                   f"on {pref['pairs']} pairs: base <b>{_f(pref['base_accuracy'], 3)}</b>, tuned "
                   f"<b>{_f(pref['tuned_accuracy'], 3)}</b>; difference {_f(pref['diff'], 3, True)}, 95% CI "
                   f"{_f(pref['ci_low'], 3, True)} to {_f(pref['ci_high'], 3, True)} (paired bootstrap).</p>")
    rl = cmp.get("reinforcement")
    if rl:
        out.append(f"<p class=\"note info\" id=\"held-out-grade\">Held-out grade ({escape(rl['what'])}) on {rl['prompts']} "
                   f"prompts: base <b>{_f(rl['base_reward'], 3)}</b>, tuned <b>{_f(rl['tuned_reward'], 3)}</b>; "
                   f"difference {_f(rl['diff'], 3, True)}, 95% CI {_f(rl['ci_low'], 3, True)} to "
                   f"{_f(rl['ci_high'], 3, True)} (paired bootstrap); better on {rl['wins']}, worse on {rl['losses']}.</p>")
    images = cmp.get("images")
    if images:
        out.append(_image_comparison(run, images))
    out.append(_img(plots.comparison_plot(cmp), "base versus tuned metrics"))
    samples = cmp.get("samples") or []
    if samples:
        out.append("<h3>Sample answers side by side</h3><table id=\"samples-table\"><tr><th>prompt</th>"
                   "<th>reference</th><th>base</th><th>tuned</th></tr>")
        for s in samples:
            ref = s.get("reference", "")
            out.append(f"<tr><td>{escape(s.get('prompt', ''))}</td><td>{escape(ref)}</td>"
                       f"{_answer(s.get('base', ''), ref)}{_answer(s.get('tuned', ''), ref)}</tr>")
        out.append("</table><p class=\"sub\">Green: the answer equals the reference exactly.</p>")
    return "".join(out)


def _safety(run: RunData) -> str:
    """Refusal rates of the safety probes, base versus tuned, and the release gate's decisions."""
    doc = run.safety
    if not doc:
        return ""
    out = ["<h2 id=\"safety\">Safety</h2>"]
    gate = doc.get("gate") or {}
    if gate:
        cls = "stop" if gate.get("status") == "blocked" else "info"
        out.append(_note(f"release gate at {gate.get('at')}: {gate.get('status')}"
                         + (f" ({gate['reason']})" if gate.get("reason") else ""), cls))
    rows = ["<tr><th>probe set</th><th>base refusal rate</th><th>tuned refusal rate</th><th>change (points)</th></tr>"]
    base, tuned, change = doc.get("base") or {}, doc.get("tuned") or {}, doc.get("change") or {}
    for name in sorted(tuned):
        def cell(r):
            r = (r or {}).get("all")
            return (f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] ({r['refused']}/{r['n']})"
                    if r else "-")
        ch = change.get(name)
        ch_text = f"{ch['points']:+.1f} [{ch['ci_points'][0]:+.1f}, {ch['ci_points'][1]:+.1f}]" if ch else "-"
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(cell(base.get(name)))}</td>"
                    f"<td>{escape(cell(tuned.get(name)))}</td><td>{escape(ch_text)}</td></tr>")
    out.append(f"<table id=\"safety-table\">{''.join(rows)}</table>")
    out.append(_note(f"classifier: {doc.get('classifier', '?')}; rates with Wilson 95% intervals; "
                     f"change with a paired bootstrap 95% interval", "info"))
    return "".join(out)


def _training(run: RunData) -> str:
    out = ["<h2 id=\"training\">Training</h2>"]
    out += [_note(n, cls) for n, cls in _where_it_happened(run)]
    loss = plots.loss_plot(run)
    out.append(_img(loss, "training and validation loss") if loss else "<p class=\"sub\">No training steps logged.</p>")
    out.append(_img(plots.lr_plot(run), "learning rate"))
    return "".join(out)


def _where_it_happened(run: RunData) -> list[tuple[str, str]]:
    notes = []
    for w in run.overfit_warnings:
        notes.append((w.get("text") or f"Overfitting warning at step {w['step']}.", ""))
    stop = run.early_stop
    if stop:
        notes.append((f"Early stopping fired at step {stop['step']}: no better validation loss for "
                      f"{stop['patience']} evaluations. The delivered model is the best one, from step "
                      f"{stop['best_step']} (validation loss {_f(stop['best_val_loss'])}).", "stop"))
    elif run.best[0] is not None and run.ended:
        notes.append((f"The delivered model (best/) is from step {run.best[0]}, the evaluation with the lowest "
                      f"validation loss.", "info"))
    for m in run.warnings:
        notes.append((f"{m.get('level')}: {m.get('text', '')}", ""))
    return notes


def _evaluations(run: RunData) -> str:
    evals = run.evals
    out = ["<h2 id=\"evaluations\">Evaluations over time</h2>"]
    if not evals:
        return "".join(out) + "<p class=\"sub\">No evaluation ran.</p>"
    names = run.metric_names
    flagged = {w["step"] for w in run.overfit_warnings}
    stat_names = list(dict.fromkeys(k for e in evals for k in (e.get("stats") or {})))  # the objective's own
    head = ["step", "epoch", "train loss*", "val loss", "gap", "perplexity", "token acc", *stat_names, *names]
    rows = []
    for e in evals:
        tl = e.get("train_loss")
        gap = e["val_loss"] - tl if tl is not None else None
        metrics = e.get("metrics") or {}
        cells = [str(e["step"]), _f(e.get("epoch"), 2), _f(tl), _f(e["val_loss"]), _f(gap, 4, True),
                 _f(e.get("perplexity"), 2), _f(e.get("token_accuracy"), 3)]
        cells += [_f((e.get("stats") or {}).get(n), 3) for n in stat_names] + [_f(metrics.get(n), 3) for n in names]
        cls = "best" if e.get("is_best") else ("flag" if e["step"] in flagged else "")
        rows.append(f"<tr class=\"{cls}\">" + "".join(f"<td class=\"num\">{c}</td>" for c in cells) + "</tr>")
    out.append("<table id=\"eval-table\"><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
               + "".join(rows) + "</table>")
    n = (run.config.get("eval") or {}).get("metric_examples")
    about = (f" Task metrics are on the first {n} validation examples, the same at every evaluation." if names and n
             else "")
    out.append("<p class=\"sub\">* token-weighted mean training loss since the previous evaluation; gap = val - train. "
               f"Green rows: a new best validation loss; orange: an overfitting warning.{about}</p>")
    out.append(_img(plots.objective_plot(run), "held-out preference figures over time"))
    out.append(_img(plots.reward_plot(run), "rewards over time"))
    out.append(_img(plots.answer_plot(run), "sampled answers: length, cut share and entropy"))
    out.append(_img(plots.metrics_plot(run), "task metrics over time"))
    samples = evals[-1].get("samples") or []
    if samples and "image" in samples[0]:
        out.append(_image_grids(run, evals))
        samples = []
    if samples:
        graded = any("grade" in s for s in samples)  # reinforcement: the grader's score of each answer
        out.append(f"<h3>Generations at the last evaluation (step {evals[-1]['step']})</h3>"
                   "<table><tr><th>prompt</th><th>reference</th><th>output</th>"
                   + ("<th>grade</th>" if graded else "") + "</tr>")
        out += [f"<tr><td>{escape(s.get('prompt', ''))}</td><td>{escape(s.get('reference', ''))}</td>"
                f"{_answer(s.get('output', ''), s.get('reference', ''))}"
                + (f"<td>{_f(s.get('grade'), 3)}</td>" if graded else "") + "</tr>" for s in samples]
        out.append("</table>")
    return "".join(out)


def _data(run: RunData) -> str:
    out = ["<h2 id=\"data\">Data</h2>"]
    pf = run.preflight
    if not pf:
        return "".join(out) + "<p class=\"sub\">No preflight.json in the run folder.</p>"
    settings = ", ".join(f"{escape(str(k))}={escape(str(v))}" for k, v in (pf.get("settings") or {}).items())
    out.append(f"<p class=\"sub\">{settings}</p>")
    objective = (pf.get("settings") or {}).get("objective", "sft")
    # a preference run's items are pairs (kto: labelled answers), and its trained tokens are the scored answers
    unit, item = {"sft": ("examples", "example"), "kto": ("answers", "answer"),
                  "grpo": ("prompts", "prompt")}.get(objective, ("pairs", "pair"))
    out.append(f"<table id=\"data-table\"><tr><th>split</th><th>{unit}</th><th>format</th>"
               "<th>tokens min/mean/p50/p95/max</th><th>trained tokens min/mean/p50/p95/max</th><th>truncated</th>"
               "<th>dropped</th><th>file</th></tr>")
    for s in pf.get("splits") or []:
        out.append(f"<tr><td>{escape(str(s.get('name')))}</td><td class=\"num\">{s.get('examples')}</td>"
                   f"<td>{escape(str(s.get('format')))}</td><td class=\"num\">{_stats(s.get('tokens'))}</td>"
                   f"<td class=\"num\">{_stats(s.get('trained'))}</td><td class=\"num\">{s.get('truncated', 0)}</td>"
                   f"<td class=\"num\">{s.get('dropped', 0)}</td><td>{escape(str(s.get('path')))}</td></tr>")
    out.append("</table>")
    if pf.get("note"):
        out.append(f"<p class=\"sub\">{escape(pf['note'])}</p>")
    counts = pf.get("issue_counts") or {}
    out.append("<p>Data issues: " + (", ".join(f"{escape(k)} &times; {v}" for k, v in counts.items()) or "none") + "</p>")
    samples = pf.get("samples") or []
    if samples and samples[0].get("spans"):
        spans = "".join(f"<mark>{escape(sp['text'])}</mark>" if sp.get("trained") else escape(sp["text"])
                        for sp in samples[0]["spans"])
        out.append(f"<p class=\"sub\">A rendered training {item} ({escape(str(samples[0].get('origin')))}); "
                   f"the highlighted tokens carry loss:</p><pre>{spans}</pre>")
    return "".join(out)


def _model(run: RunData) -> str:
    info, cfg = run.info, run.config
    rows = [("base model", info.get("model") or (cfg.get("model") or {}).get("name")),
            ("method", info.get("method") or (cfg.get("method") or {}).get("name")),
            ("trainable parameters", _int(info.get("trainable_params"))), ("total parameters", _int(info.get("total_params"))),
            ("trainable fraction", f"{100 * info['trainable_fraction']:.3f}%" if "trainable_fraction" in info else None),
            ("train / valid examples", f"{info.get('train_examples')} / {info.get('valid_examples')}" if info else None)]
    plan = info.get("plan") or {}
    rows += [(f"plan: {k}", v) for k, v in plan.items()]
    out = ["<h2 id=\"model\">Model and method</h2>", _kv_table(rows, "model-table")]
    if cfg:
        import yaml

        out.append("<details><summary>resolved configuration</summary><pre>"
                   f"{escape(yaml.safe_dump(cfg, sort_keys=False))}</pre></details>")
    return "".join(out)


def _hardware(run: RunData) -> str:
    hw = run.info.get("hardware") or {}
    steps = run.train_steps
    tps = [e["tokens_per_s"] for e in steps if e.get("tokens_per_s")]
    rows = [(k, v) for k, v in hw.items()]
    rows += [("wall time (all segments)", _duration(run.elapsed_s) if run.elapsed_s is not None else None),
             ("mean training throughput", f"{sum(tps) / len(tps):,.0f} target tokens/s" if tps else None),
             ("steps logged", len(steps)), ("evaluations", len(run.evals)),
             ("resumed", "yes" if len(run.of_kind("run_started")) > 1 else "no")]
    return "<h2 id=\"hardware\">Hardware and timings</h2>" + _kv_table(rows, "hardware-table")


# ---------------------------------------------------------------- small pieces


def _image_comparison(run: RunData, images: dict) -> str:
    """A text-to-image run's base-versus-tuned figures and the two grids (the same seeds)."""
    out = []
    if "base_accuracy" in images:
        out.append(f"<p class=\"note info\" id=\"image-accuracy\">Held-out captions drawn as captioned ({escape(images['what'])}"
                   f"), {images['prompts']} prompts x {images['images_per_prompt']} images: base "
                   f"<b>{_f(images['base_accuracy'], 3)}</b>, tuned <b>{_f(images['tuned_accuracy'], 3)}</b>; difference "
                   f"{_f(images['diff'], 3, True)}, 95% CI {_f(images['ci_low'], 3, True)} to "
                   f"{_f(images['ci_high'], 3, True)} (paired bootstrap).</p>")
    if "concept" in images:
        out.append(f"<p class=\"note info\" id=\"concept-rate\">The held-out concept <b>{escape(images['concept'])}</b> "
                   f"drawn (whatever else the image gets right): base <b>{_f(images['concept_base_rate'], 3)}</b>, tuned "
                   f"<b>{_f(images['concept_tuned_rate'], 3)}</b> of the images.</p>")
    if "control_base_accuracy" in images:
        ci = (f" (difference {_f(images['control_diff'], 3, True)}, 95% CI {_f(images['control_ci_low'], 3, True)} to "
              f"{_f(images['control_ci_high'], 3, True)}, {images['control_images']} images)"
              if "control_diff" in images else "")  # compare.json of runs before the control CI had none
        out.append(f"<p class=\"note info\" id=\"control-accuracy\">Control captions (what the base model drew "
                   f"before): base <b>{_f(images['control_base_accuracy'], 3)}</b>, tuned "
                   f"<b>{_f(images['control_tuned_accuracy'], 3)}</b>{ci}.</p>")
    cells = [f"<td><div class=\"sub\">{side}</div>{_png_file(run.run_dir / images[f'{side}_grid'], side)}</td>"
             for side in ("base", "tuned") if images.get(f"{side}_grid")]
    if cells:
        out.append("<table id=\"image-comparison\"><tr>" + "".join(cells) + "</tr></table><p class=\"sub\">One row "
                   "per prompt (held-out captions, then control captions), the same seeds on both sides.</p>")
    return "".join(out)


def _image_grids(run: RunData, evals: list[dict]) -> str:
    """The images drawn at each evaluation (fixed seeds), oldest first, with the prompts of their rows."""
    out = ["<h3>Images drawn at each evaluation</h3>"]
    prompts = evals[-1]["samples"]
    out.append("<ol class=\"sub\">" + "".join(
        f"<li>{escape(p['prompt'])}{' (control)' if p.get('control') else ''}</li>" for p in prompts) + "</ol>")
    cells = [f"<td><div class=\"sub\">step {e['step']}</div>{_png_file(run.run_dir / e['samples'][0]['image'], 'step')}</td>"
             for e in evals if e.get("samples") and "image" in e["samples"][0]]
    out.append("<table id=\"image-grids\"><tr>" + "".join(cells) + "</tr></table>")
    return "".join(out)


def _png_file(path: Path, alt: str) -> str:
    try:
        return _img(path.read_bytes(), alt)
    except OSError:
        return f"<span class=\"sub\">({escape(path.name)} missing)</span>"


def _img(data: bytes | None, alt: str) -> str:
    if not data:
        return ""
    return f"<img alt=\"{escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(data).decode('ascii')}\">"


def _note(text: str, cls: str) -> str:
    return f"<div class=\"note {cls}\">{escape(text)}</div>"


def _answer(text: str, reference: str) -> str:
    cls = "ok" if text.strip() == reference.strip() else "miss"
    return f"<td class=\"{cls}\">{escape(text)}</td>"


def _kv_table(rows, table_id: str) -> str:
    body = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f"<table id=\"{table_id}\">{body}</table>"


def _headline(result: dict) -> dict:
    out = dict(result.get("metrics") or {})
    loss = result.get("loss") or {}
    for k in ("loss", "perplexity"):
        if loss.get(k) is not None:
            out[k] = loss[k]
    return out


def _stats(s: dict | None) -> str:
    return "-" if not s else "/".join(str(s.get(k)) for k in ("min", "mean", "p50", "p95", "max"))


def _f(v, digits: int = 4, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _int(v) -> str | None:
    return f"{v:,}" if isinstance(v, int) else None


def _delta(a, b, lower_is_better: bool) -> str:
    if a is None or b is None:
        return "-"
    d = b - a
    if d == 0:
        return _f(d, 4, True)
    better = d < 0 if lower_is_better else d > 0
    return f"<span class=\"{'good' if better else 'bad'}\">{_f(d, 4, True)}</span>"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")
