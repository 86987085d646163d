"""What a sweep leaves behind: a table of trials, the best config as YAML, plots, sweep.html and sweep.json.

    OUT/
      study.db            the Optuna study (default storage), shared by every worker
      trial-NNNN/         one ordinary run folder per trial
      sweep.json          study, objective, space, best trial, every trial (parameters, value, state, time, error)
      best_config.yaml    the base config with the best trial's values: `tunesmith train best_config.yaml`
      history.png, importances.png, curves.png   optimisation history, parameter importances, learning curves
      sweep.html          all of the above in one self-contained page (plots embedded)
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import warnings
from pathlib import Path

import yaml

from ..config import Config, ConfigError


def claim_folder(out: Path, study_name: str, storage: str) -> None:
    """Refuse a sweep folder that belongs to another study (its trial-NNNN folders would collide)."""
    marker = out / "sweep.json"
    if marker.is_file():
        try:
            known = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        if known.get("study") not in (None, study_name) or known.get("storage") not in (None, storage):
            raise ConfigError(f"{out} holds the sweep of study {known.get('study')!r} in {known.get('storage')}: "
                              f"continue that one (--study/--storage), or give another folder (--out)")
        return
    _write_atomic(marker, json.dumps({"study": study_name, "storage": storage, "trials": []}, indent=2))


def _write_atomic(path: Path, text: str) -> None:
    # Several workers may write the same report: each writes its own temporary file, then renames it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "params": attrs.get("values", t.params),
            "value": _finite(t.value),  # a pruned trial's is its last reported value
            "duration_s": round(t.duration.total_seconds(), 2) if t.duration is not None else None,
            "run_dir": attrs.get("run_dir"),
            "steps": attrs.get("steps"),
            "pruned_at_step": attrs.get("pruned_at_step"),
            "interrupted": bool(attrs.get("interrupted", False)),
            "error": attrs.get("error"),
            "intermediate": {str(k): _finite(v) for k, v in sorted(t.intermediate_values.items())},
        })
    return rows


def _best(study):
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def trial_line(trial, objective: str) -> str:
    """One line per finished trial, for the console."""
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.user_attrs.get("values", trial.params).items())
    took = f" in {trial.duration.total_seconds():.1f} s" if trial.duration is not None else ""
    state = trial.state.name
    if state == "COMPLETE":
        what = f"{objective} {trial.value:.4f}"
    elif state == "PRUNED":
        what = f"pruned at step {trial.user_attrs.get('pruned_at_step')}"
    else:
        what = f"failed: {trial.user_attrs.get('error', 'unknown error')}"
    return f"trial {trial.number:4d}  {what}{took}  ({params})"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict], objective: str, best: int | None = None):
    """A rich Table of the trials, the best one in bold."""
    from rich.table import Table

    table = Table("trial", "parameters", objective, "status", "time (s)", "run folder / error")
    for r in rows:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        status = r["state"].lower() + (f" @{r['pruned_at_step']}" if r["pruned_at_step"] is not None else "")
        status += " (interrupted)" if r["interrupted"] else ""
        where = r["error"] if r["state"] == "FAIL" and r["error"] else (r["run_dir"] or "")
        table.add_row(str(r["number"]), params, value, status,
                      f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "-", where,
                      style="bold" if best is not None and r["number"] == best else None)
    return table


def best_config(cfg: Config, values: dict) -> dict:
    """The base config with the best values, ready for `tunesmith train` (no sweep section, absolute paths)."""
    from .space import config_with_values

    data = config_with_values(cfg, values)
    for key in ("train", "valid", "test"):
        p = data["data"].get(key)
        if p and Path(p).exists():
            data["data"][key] = str(Path(p).resolve())
    if Path(data["model"]["name"]).exists():
        data["model"]["name"] = str(Path(data["model"]["name"]).resolve())
    Config.model_validate(data)  # it must load as it is written
    return data


# ---------------------------------------------------------------- plots


def _plots(study, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """PNG files of the optimisation history, parameter importances and learning curves; and why any is missing."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    varied = {k for t in done for k in t.params if len({json.dumps(u.params.get(k)) for u in done}) > 1}
    plots = {
        "history": (ovm.plot_optimization_history, None if done else "no completed trial yet"),
        "importances": (ovm.plot_param_importances,
                        None if len(done) >= 2 and varied else
                        "parameter importances need at least 2 completed trials whose parameters differ"),
        "curves": (ovm.plot_intermediate_values,
                   None if any(t.intermediate_values for t in study.get_trials(deepcopy=False))
                   else "no evaluation was reported yet"),
    }
    files, skipped = {}, {}
    for name, (plot, reason) in plots.items():
        if reason:
            skipped[name] = reason
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files[name] = str(path)
        except (ValueError, RuntimeError, optuna.exceptions.OptunaError) as e:  # a plot must not lose the report
            skipped[name] = f"could not be drawn: {e}"
    return files, skipped


# ---------------------------------------------------------------- the report


def write_report(study, cfg: Config, out: Path, storage: str) -> tuple[dict, dict[str, str]]:
    """Write sweep.json, best_config.yaml, the plots and sweep.html; return (the summary, the files written)."""
    sc = cfg.sweep
    rows = trial_rows(study)
    best = _best(study)
    files: dict[str, str] = {}
    best_info = None
    if best is not None:
        values = best.user_attrs.get("values", best.params)
        best_info = {"number": best.number, "value": best.value, "params": values,
                     "run_dir": best.user_attrs.get("run_dir")}
        try:
            data = best_config(cfg, values)
            header = (f"# Best of study {study.study_name!r}: trial {best.number}, {sc.objective} {best.value:.6g}.\n"
                      f"# Written by `tunesmith sweep`; train with: tunesmith train {out / 'best_config.yaml'}\n")
            _write_atomic(out / "best_config.yaml", header + yaml.safe_dump(data, sort_keys=False))
            files["best_config"] = str(out / "best_config.yaml")
        except Exception as e:  # noqa: BLE001 — reported in sweep.json instead
            best_info["config_error"] = str(e)
    plot_files, skipped = _plots(study, out)
    files.update(plot_files)
    summary = {
        "study": study.study_name,
        "storage": storage,
        "objective": sc.objective,
        "direction": study.direction.name.lower(),
        "sampler": sc.sampler,
        "pruner": sc.pruner,
        "space": {k: p.describe() for k, p in sc.params.items()},
        "counts": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
        "best": best_info,
        "plots": {k: Path(v).name for k, v in plot_files.items()},
        "plots_skipped": skipped,
        "trials": rows,
    }
    _write_atomic(out / "sweep.json", json.dumps(summary, indent=2, default=str))
    files["json"] = str(out / "sweep.json")
    _write_atomic(out / "sweep.html", _html(summary, plot_files, out))
    files["html"] = str(out / "sweep.html")
    return summary, files


def _html(summary: dict, plot_files: dict[str, str], out: Path) -> str:
    e = html.escape
    best = summary["best"]
    head = (f"<h1>Sweep: study {e(summary['study'])}</h1>"
            f"<p>Objective <b>{e(summary['objective'])}</b> ({e(summary['direction'])}), sampler {e(summary['sampler'])}, "
            f"pruner {e(summary['pruner'])}; storage <code>{e(summary['storage'])}</code>.</p>"
            f"<p>Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in summary["counts"].items() if n) + "</p>")
    space = "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in summary["space"].items())
    if best:
        cfg_file = out / "best_config.yaml"
        best_html = (f"<h2>Best trial: {best['number']}</h2><p>{e(summary['objective'])} = {best['value']:.6g}; "
                     f"run folder <code>{e(str(best['run_dir']))}</code></p>"
                     + (f"<pre>{e(cfg_file.read_text(encoding='utf-8'))}</pre>" if cfg_file.is_file() else ""))
    else:
        best_html = "<h2>Best trial</h2><p>No trial has completed yet.</p>"
    body = ["<table><tr><th>trial</th><th>parameters</th><th>" + e(summary["objective"]) +
            "</th><th>status</th><th>time (s)</th><th>run folder / error</th></tr>"]
    best_n = best["number"] if best else None
    for r in summary["trials"]:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        value = f"{r['value']:.4f}" if r["value"] is not None else "–"
        status = r["state"].lower() + (f" at step {r['pruned_at_step']}" if r["pruned_at_step"] is not None else "")
        status += " (interrupted)" if r["interrupted"] else ""
        where = r["error"] if r["state"] == "FAIL" and r["error"] else (r["run_dir"] or "")
        cls = ' class="best"' if r["number"] == best_n else ""
        body.append(f"<tr{cls}><td>{r['number']}</td><td>{e(params)}</td><td>{value}</td><td>{e(status)}</td>"
                    f"<td>{r['duration_s'] if r['duration_s'] is not None else '–'}</td><td>{e(str(where))}</td></tr>")
    body.append("</table>")
    titles = {"history": "Optimisation history", "importances": "Parameter importances",
              "curves": "Learning curves (objective at each evaluation; pruned trials stop early)"}
    figs = []
    for name, title in titles.items():
        if name in plot_files:
            data = base64.b64encode(Path(plot_files[name]).read_bytes()).decode()
            figs.append(f"<h2>{title}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
        else:
            figs.append(f"<h2>{title}</h2><p><i>{e(summary['plots_skipped'].get(name, ''))}</i></p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}tr.best{background:#e8f6e8}"
             "pre{background:#f6f6f6;padding:8px;font-size:12px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tunesmith sweep {e(summary['study'])}</title>"
            f"<style>{style}</style></head><body>{head}<h2>Search space</h2><ul>{space}</ul>{best_html}"
            f"<h2>Trials</h2>{''.join(body)}{''.join(figs)}</body></html>")
