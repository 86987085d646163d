"""Two `tunesmith sweep` processes on one SQLite study at once: the trials are shared, none runs twice."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
from sweep_helpers import sweep_config


def test_two_processes_share_one_sqlite_study(tmp_path, tiny_model_dir, tiny_data):
    cfg = sweep_config(tmp_path / "c.yaml", tiny_model_dir, tiny_data,
                       {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}, "method.lora.r": [2, 4, 8]},
                       pruner="none", sampler="random")
    db = tmp_path / "shared" / "study.db"
    exe = Path(sys.executable).parent / "tunesmith"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(exe), "sweep", str(cfg), "--trials", "2", "--quiet", "--study", "shared",
           "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "sweep")]
    # started together: both create the database and the study at the same moment
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err

    # each process ran two trials of its own, and together they ran each trial number once
    ran = [{int(n) for n in re.findall(r"^trial +(\d+) ", out, re.M)} for out, _ in outputs]
    assert [len(r) for r in ran] == [2, 2] and not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1, 2, 3}

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({(t.params["train.lr"], t.params["method.lora.r"]) for t in trials}) == 4
    run_dirs = [t.user_attrs["run_dir"] for t in trials]
    assert sorted(Path(d).name for d in run_dirs) == ["trial-0000", "trial-0001", "trial-0002", "trial-0003"]
    for d in run_dirs:  # each run folder was made by one training run: one start, one end
        kinds = [json.loads(line)["kind"] for line in open(Path(d) / "metrics.jsonl")]
        assert kinds.count("run_started") == 1 and kinds.count("run_ended") == 1
        assert json.loads((Path(d) / "run.json").read_text())["method"] == "lora"
    # the report written last knows the trials of both processes
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["study"] == "shared" and summary["counts"]["COMPLETE"] >= 3
