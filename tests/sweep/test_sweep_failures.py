"""Failed trials are recorded and the sweep goes on; a stop request ends it cleanly and it continues later."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from sweep_helpers import sweep_config

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.sweep import run_sweep
from tunesmith.sweep.storage import open_study, storage_url


def _enqueue(out, *params, name="sweep"):
    study = open_study(storage_url(None, out), name, "minimize", None, None)
    for p in params:
        study.enqueue_trial(p)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model_dir, tiny_data, capsys):
    # max_length 8 cannot hold one example (data.overflow is error): that trial raises a DataError in train()
    cfg = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data, {"data.max_length": [8, 64]}, pruner="none")
    _enqueue(tmp_path / "sweep", {"data.max_length": 8}, {"data.max_length": 64})
    assert main(["sweep", str(cfg), "--trials", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    failed, done = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"]
    assert failed["state"] == "FAIL" and failed["value"] is None
    assert failed["error"].startswith("DataError:") and "max_length" in failed["error"]
    assert done["state"] == "COMPLETE" and done["params"] == {"data.max_length": 64} and done["value"] > 0
    assert "trial    0  failed: DataError" in printed and "fail" in printed
    # the traceback is kept with the trial, for whoever opens the study
    study = optuna.load_study(study_name="sweep", storage=storage_url(None, tmp_path / "sweep"))
    assert "Traceback" in study.trials[0].user_attrs["traceback"]


def test_every_trial_failing_exits_1_with_errors_recorded(tmp_path, tiny_model_dir, tiny_data, capsys):
    # LoRA dropout must be below 1: each trial's config is invalid, so each fails before it loads a model
    cfg = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data, {"method.lora.dropout": {"low": 1.5, "high": 2}})
    assert main(["sweep", str(cfg), "--trials", "2", "--quiet"]) == 1
    captured = capsys.readouterr()
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["trials"]
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]
    assert all("ConfigError" in r["error"] and "method.lora.dropout" in r["error"] for r in rows)
    assert "every trial this process ran failed" in captured.err
    assert not (tmp_path / "sweep" / "best_config.yaml").exists()


def test_bad_sweep_sections_exit_2_before_any_trial(tmp_path, tiny_model_dir, tiny_data, capsys):
    cases = [({"train.learning_rate": {"low": 1e-4, "high": 1e-2}}, {}, "train.learning_rate: not a config field"),
             ({"method.name": {"low": 0, "high": 1}}, {}, "a range needs a numeric field"),
             ({"method.lora.r": {"low": 2.5, "high": 8}}, {}, "an int range needs whole numbers"),
             ({}, {}, "sweep.params is empty"),
             ({"train.lr": [0.01]}, {"objective": "banana"}, "sweep.objective 'banana'")]
    for i, (params, extra, message) in enumerate(cases):
        cfg = sweep_config(tmp_path / f"c{i}.yaml", tiny_model_dir, tiny_data, params, **extra)
        assert main(["sweep", str(cfg), "--trials", "1", "--out", str(tmp_path / f"s{i}")]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert not (tmp_path / f"s{i}").exists()
    # pydantic catches malformed ranges when the config loads
    cfg = sweep_config(tmp_path / "bad.yaml", tiny_model_dir, tiny_data, {"train.lr": {"low": 0.1, "high": 0.01}})
    assert main(["sweep", str(cfg)]) == 2
    assert "must be smaller than high" in capsys.readouterr().err


def test_stop_request_checkpoints_the_trial_and_the_sweep_continues(tmp_path, tiny_model_dir, tiny_data):
    path = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data,
                        {"train.lr": {"low": 1e-3, "high": 1e-1, "log": True}}, pruner="none", seed=1)
    cfg = load_config(path)
    calls = []

    def stop_at_step_3():  # polled before the sweep, before the trial, then at each step boundary
        calls.append(1)
        return len(calls) >= 5

    first = run_sweep(cfg, n_trials=3, stop_requested=stop_at_step_3, echo=lambda line: None)
    assert first.stopped and first.ran == [0]
    (row,) = first.rows
    assert row["state"] == "FAIL" and row["interrupted"] and row["steps"] == 3
    assert row["error"].startswith("SweepInterrupted: interrupted at step 3")
    assert (tmp_path / "sweep" / "trial-0000" / "checkpoints" / "step-000003").is_dir()
    # continued later with the same study and storage: numbering goes on, the stopped trial stays recorded
    second = run_sweep(cfg, n_trials=1, echo=lambda line: None)
    assert not second.stopped and second.ran == [1]
    assert [(r["number"], r["state"]) for r in second.rows] == [(0, "FAIL"), (1, "COMPLETE")]
    assert second.best["number"] == 1


def test_ctrl_c_on_the_command_exits_130_and_says_how_to_continue(tmp_path, tiny_model_dir, tiny_data):
    cfg = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data, {"train.lr": [0.01, 0.02]},
                       pruner="none")
    # enough steps that the first trial is still training when the signal comes
    exe = Path(sys.executable).parent / "tunesmith"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), "sweep", str(cfg), "--trials", "3", "--quiet", "--set", "train.max_steps=400",
                             "--set", "eval.every_steps=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "sweep" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Continue the sweep with" in err and "--study sweep --storage sqlite:///" in err
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    (row,) = summary["trials"]
    assert row["state"] == "FAIL" and row["interrupted"] and 0 < row["steps"] < 400
    assert any((tmp_path / "sweep" / "trial-0000" / "checkpoints").glob("step-*"))
