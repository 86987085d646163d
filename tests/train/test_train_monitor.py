"""Evaluation during training: task metrics on a fixed validation subset, the overfitting monitor, metric sinks."""

import json

import pytest

from tunesmith.config import ConfigError, EvalConfig, load_config
from tunesmith.evaluate import compute_metrics
from tunesmith.train import train
from tunesmith.train.monitor import EvalMonitor, check_metrics, rising_streak

from tunesmith.testing import write_chat_jsonl


def _events(run_dir, kind=None):
    events = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [e for e in events if kind is None or e["kind"] == kind]


def _overfit_cfg(tmp_path, tiny_model_dir, *overrides):
    """Full fine-tuning of 4 examples at a high constant lr: training loss falls steadily, validation loss
    bottoms out and climbs (memorisation). Recorded: best at step 10, rising from step 12."""
    train_f = write_chat_jsonl(tmp_path / "train.jsonl", 4, seed=0)
    valid_f = write_chat_jsonl(tmp_path / "valid.jsonl", 8, seed=1)
    base = [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
            f"output_dir={tmp_path / 'run'}", "data.max_length=64", "train.batch_size=4", "train.max_steps=30",
            "train.lr=1e-2", "train.warmup_steps=1", "train.schedule=constant", "method.name=full",
            "eval.every_steps=2", "eval.samples=0", "eval.metric_examples=0", "eval.max_new_tokens=4",
            "eval.compare_base=false"]
    return load_config(None, base + list(overrides))


# ---------------------------------------------------------------- the monitor on its own


def test_rising_streak_counts_back_from_the_end():
    assert rising_streak([]) == 0 and rising_streak([3.0]) == 0
    assert rising_streak([3, 2, 2.5, 2.7]) == 2
    assert rising_streak([3, 2, 2.5, 2.5]) == 0  # equal is not a rise
    assert rising_streak([1, 2, 3, 4]) == 3


def test_monitor_warns_once_per_streak_and_only_while_training_loss_falls():
    m = EvalMonitor(EvalConfig(overfit_patience=2))
    seq = [(2, 5.0, 6.0), (4, 4.0, 5.0), (6, 4.2, 4.5), (8, 4.4, 4.0),  # rose twice, train fell: warn at 8
           (10, 4.6, 3.5),  # still rising: already warned for this streak
           (12, 4.5, 3.0), (14, 4.7, 2.5), (16, 4.9, 2.0)]  # a new streak reaches 2 at 16: warn again
    warned = [s for s, v, t in seq if m.observe(s, v, t, best_step=4) is not None]
    assert warned == [8, 16]

    both_rising = EvalMonitor(EvalConfig(overfit_patience=2))  # lr too high, not overfitting
    assert all(both_rising.observe(s, v, t, 2) is None for s, v, t in [(2, 4.0, 4.0), (4, 4.5, 4.6), (6, 5.0, 5.2)])


def test_monitor_warning_names_the_losses_and_the_best_step():
    m = EvalMonitor(EvalConfig(overfit_patience=1, early_stopping_patience=None))
    assert m.observe(2, 4.0, 5.0, 2) is None
    w = m.observe(4, 4.1, 4.5, 2)
    assert w.kind == "overfit_warning" and w.level == "warning" and w.step == 4 and w.streak == 1
    assert w.val_losses == [4.0, 4.1] and w.train_losses == [5.0, 4.5] and w.best_step == 2
    assert "step 2" in w.text and "early_stopping_patience" in w.text


def test_train_loss_mean_is_token_weighted_and_resets():
    m = EvalMonitor(EvalConfig())
    m.add_train_loss(10.0, 5)  # a step with summed loss 10 over 5 tokens
    m.add_train_loss(2.0, 5)
    assert m.take_train_loss() == pytest.approx(1.2)
    assert m.take_train_loss() is None


def test_unknown_metric_fails_as_a_config_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="eval.metrics: unknown metric 'exact'"):
        check_metrics(["exact"])
    (tmp_path / "monitor_metric_mod.py").write_text("def length(p, r):\n    return float(len(p))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_metrics(["rouge_l", "monitor_metric_mod:length"])


# ---------------------------------------------------------------- in a training run


def test_overfitting_warning_then_early_stop_restores_best(tmp_path, tiny_model_dir):
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "eval.early_stopping_patience=3"), quiet=True)
    evals = _events(res.output_dir, "eval")
    steps = [e["step"] for e in evals]
    vals = [e["val_loss"] for e in evals]
    trains = [e["train_loss"] for e in evals]
    assert all(t is not None for t in trains) and trains[-1] < trains[0]

    # The warning fires at the first evaluation where validation loss has risen twice in a row while the
    # mean training loss over those evaluations fell, and records those numbers.
    expected = next(steps[i] for i in range(2, len(vals))
                    if vals[i] > vals[i - 1] > vals[i - 2] and trains[i] < trains[i - 2])
    warnings = _events(res.output_dir, "overfit_warning")
    assert [w["step"] for w in warnings] == [expected]
    i = steps.index(expected)
    assert warnings[0]["val_losses"] == vals[i - 2:i + 1] and warnings[0]["train_losses"] == trains[i - 2:i + 1]
    assert warnings[0]["level"] == "warning" and f"step {res.best_step}" in warnings[0]["text"]
    assert "possible overfitting" in (res.output_dir / "train.log").read_text()

    # Early stopping: three evaluations without a better loss, the best weights delivered, all in the report.
    stop = _events(res.output_dir, "early_stop")[0]
    assert res.status == "early_stopped" and stop["best_step"] == res.best_step == steps[vals.index(min(vals))]
    assert stop["step"] == res.steps == res.best_step + 3 * 2
    html = (res.output_dir / "report.html").read_text()
    assert f"Early stopping fired at step {stop['step']}" in html and "possible overfitting" in html


def test_task_metrics_on_the_fixed_validation_subset(tmp_path, tiny_model_dir):
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=6", "eval.samples=4", "eval.metric_examples=4",
                             "eval.metrics=[exact_match, rouge_l, chrf]"), quiet=True)
    evals = _events(res.output_dir, "eval")
    assert len(evals) == 3
    valid = [json.loads(line) for line in open(tmp_path / "valid.jsonl")][:4]
    for e in evals:
        assert list(e["metrics"]) == ["exact_match", "rouge_l", "chrf"]
        # samples and metrics come from one generation pass over the same first 4 validation examples
        assert [s["reference"] for s in e["samples"]] == [r["messages"][-1]["content"] for r in valid]
        outputs, refs = [s["output"] for s in e["samples"]], [s["reference"] for s in e["samples"]]
        assert e["metrics"] == pytest.approx(compute_metrics(outputs, refs, ["exact_match", "rouge_l", "chrf"]))
    assert any(s["output"] for e in evals for s in e["samples"])  # the tuned model says something
    assert "rouge_l" in (res.output_dir / "train.log").read_text()


def test_task_metrics_off_and_samples_kept(tmp_path, tiny_model_dir):
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=2", "eval.samples=2"), quiet=True)
    (e,) = _events(res.output_dir, "eval")
    assert e["metrics"] == {} and len(e["samples"]) == 2


def test_tensorboard_has_the_eval_metrics(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=4", "eval.metric_examples=2",
                             "eval.metrics=[exact_match, chrf]"), quiet=True)
    acc = EventAccumulator(str(res.output_dir / "tensorboard"))
    acc.Reload()
    evals = _events(res.output_dir, "eval")
    for tag, key in (("eval/chrf", "chrf"), ("eval/exact_match", "exact_match")):
        assert [(s.step, round(s.value, 4)) for s in acc.Scalars(tag)] == \
               [(e["step"], round(e["metrics"][key], 4)) for e in evals]
    tl = acc.Scalars("eval/train_loss_since_last_eval")
    assert [round(s.value, 4) for s in tl] == [round(e["train_loss"], 4) for e in evals]


def test_mlflow_sink_logs_params_metrics_and_the_report(tmp_path, tiny_model_dir):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tunesmith.events import mlflow_uri

    store = tmp_path / "mlruns"
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=4", "eval.metric_examples=2",
                             f"eval.mlflow_tracking_uri={store}", "eval.mlflow_experiment=monitor-test"), quiet=True)
    client = MlflowClient(tracking_uri=mlflow_uri(str(store)))
    exp = client.get_experiment_by_name("monitor-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == (res.output_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED" and run.data.tags["tunesmith.status"] == "completed"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["method.name"] == "full"
    train_steps = _events(res.output_dir, "train")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(e["step"], round(e["loss"], 6)) for e in train_steps]
    evals = _events(res.output_dir, "eval")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [e["step"] for e in evals]
    assert len(client.get_metric_history(run.info.run_id, "eval/exact_match")) == len(evals)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "run.json", "config.resolved.yaml"} <= artifacts


def test_mlflow_failure_is_a_warning_not_a_crash(tmp_path, tiny_model_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store should be")
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=2", f"eval.mlflow_tracking_uri={blocker}"),
                quiet=True)
    assert res.status == "completed"
    texts = [e["text"] for e in _events(res.output_dir, "message") if e["level"] == "warning"]
    assert any(t.startswith("MLflow logging is off") for t in texts)


def test_an_interrupted_run_still_writes_its_report(tmp_path, tiny_model_dir):
    calls = iter(range(100))
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "eval.compare_base=true"), quiet=True,
                stop_requested=lambda: next(calls) >= 1)
    assert res.status == "interrupted" and not (res.output_dir / "compare.json").exists()
    html = (res.output_dir / "report.html").read_text()
    assert 'id="status">interrupted<' in html and "No comparison" in html
    assert any(e["text"].startswith("report: ") for e in _events(res.output_dir, "message"))


@pytest.mark.parametrize("greater", [True, False])
def test_best_metric_picks_the_checkpoint_by_a_figure_instead_of_the_loss(tmp_path, tiny_model_dir, greater):
    """eval.best_metric / greater_is_better (Hugging Face's metric_for_best_model): the best step is the first
    evaluation with the highest (or lowest) token accuracy, whatever the validation loss did."""
    res = train(_overfit_cfg(tmp_path, tiny_model_dir, "train.max_steps=12", "eval.best_metric=token_accuracy",
                             f"eval.greater_is_better={str(greater).lower()}"), quiet=True)
    evals = _events(res.output_dir, "eval")
    accs = [e["token_accuracy"] for e in evals]
    assert len(set(accs)) > 1, accs  # the runs must differ for the choice to mean anything
    best_i = accs.index(max(accs) if greater else min(accs))  # the first evaluation reaching it: a tie is not better
    assert res.best_step == evals[best_i]["step"]
    sign = 1 if greater else -1
    running, flags = None, []
    for a in accs:
        flags.append(running is None or sign * (a - running) > 0)
        running = a if flags[-1] else running
    assert [e["is_best"] for e in evals] == flags
    ended = _events(res.output_dir, "run_ended")[0]
    assert ended["best_step"] == res.best_step and ended["best_val_loss"] == evals[best_i]["val_loss"]


def test_best_metric_the_objective_does_not_report_fails_before_training(tmp_path, tiny_model_dir):
    from tunesmith.train.loop import TrainingError, greater_is_better

    with pytest.raises(TrainingError, match=r"eval.best_metric 'concept_rate' is not reported by objective 'sft'.*"
                                            r"'token_accuracy'"):
        train(_overfit_cfg(tmp_path, tiny_model_dir, "eval.best_metric=concept_rate"), quiet=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert [greater_is_better(EvalConfig(best_metric=m)) for m in ("loss", "perplexity", "mse", "dpo_loss",
                                                                   "exact_match", "concept_rate")] == \
        [False, False, False, False, True, True]
    assert greater_is_better(EvalConfig(best_metric="concept_rate", greater_is_better=False)) is False
