"""`tunesmith sweep` end to end on the tiny model: search, pruning, the report and the best config."""

import json
from pathlib import Path

import optuna
import pytest
from sweep_helpers import sweep_config

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.sweep import run_sweep
from tunesmith.sweep.runner import _TrialSink
from tunesmith.sweep.storage import open_study, storage_url
from tunesmith.train import train
from tunesmith.events import EvalEnd, RunStarted


def test_lr_sweep_finds_better_than_worst_and_best_config_trains(tmp_path, tiny_model_dir, tiny_data, capsys):
    cfg = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data,
                       {"train.lr": {"low": 1e-5, "high": 0.3, "log": True}}, pruner="none", seed=0)
    assert main(["sweep", str(cfg), "--trials", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "sweep"
    summary = json.loads((out / "sweep.json").read_text())
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and {t["state"] for t in trials} == {"COMPLETE"}
    values = [t["value"] for t in trials]
    lrs = [t["params"]["train.lr"] for t in trials]
    assert len(set(lrs)) == 4 and all(1e-5 <= lr <= 0.3 for lr in lrs)
    # the objective is the best validation loss a trial reached at any of its evaluations
    for t in trials:
        assert t["value"] == min(t["intermediate"].values()) and list(t["intermediate"]) == ["2", "4"]
        assert t["duration_s"] > 0
        assert (tmp_path / "sweep" / f"trial-{t['number']:04d}" / "best").is_dir()
    best = summary["best"]
    assert best["value"] == min(values) < max(values)
    assert summary["direction"] == "minimize" and summary["objective"] == "val_loss"
    # the table: every trial with its parameters, objective, status and time; the best named after it
    for t in trials:
        assert f"{t['value']:.4f}" in printed
    assert f"best: trial {best['number']}" in printed and "complete" in printed
    # the report is self-contained: plots embedded, not linked
    page = (out / "sweep.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Parameter importances" in page
    assert all((out / f"{p}.png").stat().st_size > 1000 for p in ("history", "importances", "curves"))

    # best_config.yaml is a ready config: it loads, holds the best lr and no sweep, and trains
    best_cfg = load_config(out / "best_config.yaml", [f"output_dir={tmp_path / 'best-run'}", "train.max_steps=2"])
    assert best_cfg.train.lr == best["params"]["train.lr"] and best_cfg.sweep.params == {}
    run = train(best_cfg, quiet=True)
    assert run.status == "completed" and run.steps == 2 and (tmp_path / "best-run" / "best").is_dir()


def test_pruning_stops_a_far_worse_trial_early(tmp_path, tiny_model_dir, tiny_data):
    # lr 1e-7 barely moves the model: after one completed trial at a useful lr, the median pruner stops it
    # at its first evaluation (step 2 of 6); the run checkpoints there, as on Ctrl-C.
    path = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data, {"train.lr": [0.01, 1e-7]},
                        prune_after_trials=1)
    cfg = load_config(path, ["train.max_steps=6"])
    url = storage_url(None, tmp_path / "sweep")
    study = open_study(url, "sweep", "minimize", None, None)
    for lr in (0.01, 1e-7):
        study.enqueue_trial({"train.lr": lr})
    lines = []
    result = run_sweep(cfg, n_trials=2, echo=lines.append)
    good, bad = result.rows
    assert good["state"] == "COMPLETE" and good["steps"] == 6 and list(good["intermediate"]) == ["2", "4", "6"]
    assert bad["state"] == "PRUNED" and bad["params"] == {"train.lr": 1e-7}
    assert bad["pruned_at_step"] == 2 and bad["steps"] == 2 and list(bad["intermediate"]) == ["2"]
    assert bad["intermediate"]["2"] > good["intermediate"]["2"]
    run = tmp_path / "sweep" / "trial-0001"
    assert (run / "checkpoints" / "step-000002").is_dir()
    kinds = [json.loads(line)["kind"] for line in open(run / "metrics.jsonl")]
    assert kinds.count("train") == 2 and kinds.count("eval") == 1
    assert "pruned at step 2" in lines[1]
    assert result.best["number"] == 0 and not result.stopped


def test_a_task_metric_objective_is_maximised(tmp_path, tiny_model_dir, tiny_data):
    from tunesmith.config import EvalConfig

    if "metric_examples" not in EvalConfig.model_fields:
        pytest.skip("this build reports no task metrics at evaluation")
    path = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data, {"train.lr": [0.01, 0.05]},
                        objective="chrf", pruner="none", sampler="random", seed=0)
    result = run_sweep(load_config(path, ["eval.metric_examples=4", "eval.metrics=[chrf]"]), n_trials=2,
                       echo=lambda line: None)
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["direction"] == "maximize" and summary["objective"] == "chrf"
    values = [r["value"] for r in result.rows]
    assert all(0 <= v <= 100 for v in values) and result.best["value"] == max(values)
    for r in result.rows:  # the chrF at each evaluation, as the run itself logged it
        logged = [json.loads(line) for line in open(Path(r["run_dir"]) / "metrics.jsonl")]
        assert [e["metrics"]["chrf"] for e in logged if e["kind"] == "eval"] == list(r["intermediate"].values())


def test_the_trial_sink_stops_a_run_whose_objective_is_not_reported():
    study = optuna.create_study()
    trial = study.ask()
    sink = _TrialSink(trial, "exact_match", prune=True)
    sink(RunStarted("r", "lora", 1, 2, 6, 6, 8, 8, "cpu", "float32", 1))
    sink(EvalEnd(2, 0.3, val_loss=5.0, perplexity=148.4, token_accuracy=0.1, val_tokens=40, is_best=True))
    assert sink.stopping and "val_loss" in sink.missing and study.trials[0].intermediate_values == {}
    sink = _TrialSink(trial, "val_loss", prune=True)
    sink(EvalEnd(2, 0.3, val_loss=5.0, perplexity=148.4, token_accuracy=0.1, val_tokens=40, is_best=True))
    assert not sink.stopping and sink.values == [(2, 5.0)]
    assert study.trials[0].intermediate_values == {2: 5.0}
