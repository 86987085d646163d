"""The CPUs a training process may use, how its OpenMP threads wait, and the oversubscription warning (cpus.py)."""

import json
import os

import pytest
import torch

from tunesmith import cpus


def test_the_wait_setting_is_set_unless_the_environment_has_one():
    assert cpus.prepare_environment({}) == {"GOMP_SPINCOUNT": cpus.SPINCOUNT}
    assert cpus.prepare_environment({"GOMP_SPINCOUNT": "300000"}) == {"GOMP_SPINCOUNT": "300000"}
    assert cpus.prepare_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2 with a quota
    ({"cpu.max": "max 100000\n"}, None),  # v2 without one
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cgroup_cpu_quota_is_read_in_both_cgroup_versions(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpus.cgroup_cpu_limit(tmp_path) == expected


def test_threads_are_capped_at_the_cpus_this_process_may_use(monkeypatch):
    """A container with a quota of 1.5 CPUs on a 4-CPU affinity mask: 2 threads, not torch's default."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 1.5)
    assert cpus.available_cpus() == 2
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        t = cpus.configure_threads()
        assert (t.threads, t.available, torch.get_num_threads()) == (2, 2, 2) and "capped" in t.reason
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own setting is kept
        torch.set_num_threads(4)
        assert cpus.configure_threads().threads == 4
    finally:
        torch.set_num_threads(before)


def test_oversubscription_is_said_once_after_several_busy_steps(monkeypatch):
    loads = iter([0.1, 1.6, 1.9, 0.2, 1.8, 1.7, 1.9, 2.0, 1.9])
    watch = cpus.Oversubscription(threads=2, available=2, patience=3)
    monkeypatch.setattr(watch.load, "sample", lambda: next(loads))
    said = [watch.step() for _ in range(9)]
    assert [i for i, s in enumerate(said) if s] == [6]  # after three busy steps in a row, and only once
    assert "oversubscribed" in said[6] and "1.8 of its 2 CPUs" in said[6]


def test_other_processes_load_is_measured_from_proc():
    if not os.path.exists("/proc/stat"):
        pytest.skip("Linux only")
    load = cpus.OtherLoad()
    sum(i * i for i in range(200_000))  # this process's own work is not counted
    others = load.sample()
    assert others is not None and 0.0 <= others <= os.cpu_count()


def test_a_training_run_says_its_threads_and_wait_in_the_log_and_run_json(tmp_path, tiny_model_dir, tiny_data):
    from tunesmith.config import load_config
    from tunesmith.train import train

    train_f, valid_f = tiny_data
    res = train(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
                                   f"output_dir={tmp_path / 'run'}", "train.max_steps=1", "eval.samples=0",
                                   "eval.metric_examples=0", "eval.compare_base=false"]), quiet=True)
    info = json.loads((res.output_dir / "run.json").read_text())
    assert info["hardware"]["available_cpus"] == cpus.available_cpus()
    messages = [json.loads(x)["text"] for x in open(res.output_dir / "metrics.jsonl") if '"kind": "message"' in x]
    assert any(m.startswith("CPU threads:") and "OpenMP wait" in m for m in messages)
