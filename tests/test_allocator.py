"""The allocator a training process runs with (tunesmith/allocator.py): tcmalloc preloaded by re-executing the
command when it is installed, glibc tuned otherwise, the user's choice respected, and the choice on record."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith import allocator, cpus
from tunesmith.cli import main

TCMALLOC = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="no tcmalloc on this machine (make setup installs "
                                    "Debian's libtcmalloc-minimal4 where apt-get can)")

# Prints its pid before and after the re-exec point: a re-executed process runs this program twice.
PROBE = ("import os, sys; from tunesmith import allocator, cpus; print('pid', os.getpid(), flush=True); "
         "allocator.reexec_with_tcmalloc(training='training' in sys.argv); print('after', os.getpid(), "
         "allocator.in_use(), allocator.prepare_training_process(), flush=True); "
         "print('release_rate', os.environ.get('TCMALLOC_RELEASE_RATE'), flush=True)")


def _fresh_env() -> dict:
    """This environment as a new shell would have it: no allocator preloaded, chosen or marked."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV, allocator.REEXEC_MARKER)}


def _probe(*args, **env):
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       env={k: v for k, v in (_fresh_env() | env).items() if k != "TCMALLOC_RELEASE_RATE"}, timeout=60)
    assert r.returncode == 0, r.stderr
    *lines, (_, rate) = [line.split() for line in r.stdout.splitlines()]
    return lines if not args else (lines, rate)


@needs_tcmalloc
def test_the_process_reexecutes_itself_once_with_tcmalloc_keeping_its_pid():
    lines = _probe()
    pids = {line[1] for line in lines}
    assert [line[0] for line in lines] == ["pid", "pid", "after"] and len(pids) == 1  # same process, run twice
    assert lines[-1][2:] == ["tcmalloc", "tcmalloc"]  # in use; nothing to tune


@needs_tcmalloc
def test_a_training_process_keeps_freed_memory_and_others_return_it():
    """Training: TCMALLOC_RELEASE_RATE=0, so the next step reuses freed pages instead of faulting them in again;
    other commands keep tcmalloc's default."""
    lines, rate = _probe("training")
    assert lines[-1][2] == "tcmalloc" and rate == "0"
    lines, rate = _probe("other")
    assert lines[-1][2] == "tcmalloc" and rate == "None"


def test_system_leaves_malloc_alone():
    lines = _probe(TUNESMITH_ALLOCATOR="system")
    assert [line[0] for line in lines] == ["pid", "after"]
    assert lines[-1][2:] == ["system", "system"]


def test_without_tcmalloc_glibc_is_tuned_instead(tmp_path):
    # the marker of an already re-executed process: no re-exec, so no tcmalloc; then train start tunes glibc
    lines = _probe(**{allocator.REEXEC_MARKER: "1"})
    assert [line[0] for line in lines] == ["pid", "after"] and lines[-1][2] == "system"
    assert " ".join(lines[-1][3:]).startswith("system (glibc, tuned")


def test_a_missing_tcmalloc_asked_for_by_name_warns_and_goes_on(monkeypatch, capsys):
    monkeypatch.setenv(allocator.ENV, "tcmalloc")
    monkeypatch.delenv(allocator.REEXEC_MARKER, raising=False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "in_use", lambda: "system")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("must not re-execute"))
    allocator.reexec_with_tcmalloc()
    assert "libtcmalloc-minimal4" in capsys.readouterr().err


def test_only_the_command_reexecutes_not_a_call_from_python(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "reexec_with_tcmalloc", lambda training=False: calls.append(training))
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", missing]) == 2 and calls == []  # argv given: a Python caller
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", missing])
    assert main() == 2 and calls == [True]
    monkeypatch.setattr(sys, "argv", ["tunesmith", "check", missing])
    main()
    assert calls == [True]  # check runs no model
    monkeypatch.setattr(sys, "argv", ["tunesmith", "generate", missing, "--prompt", "hi"])
    main()
    assert calls == [True, False]  # a model, no training


@needs_tcmalloc
def test_tunesmith_train_runs_on_tcmalloc_and_says_so_in_run_json(tmp_path, tiny_model_dir, tiny_data):
    exe = Path(sys.executable).parent / "tunesmith"
    train_f, valid_f = tiny_data
    r = subprocess.run([str(exe), "train", "--model", str(tiny_model_dir), "--data", str(train_f), "--valid",
                        str(valid_f), "--max-steps", "1", "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet",
                        "--set", "data.max_length=64", "--set", "eval.compare_base=false"],
                       capture_output=True, text=True, env=_fresh_env() | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["hardware"]["allocator"] == "tcmalloc"
    assert "tcmalloc: large alloc" not in r.stderr
    # the command also shortens OpenMP's spin before its threads sleep (cpus.py), unless the environment set a wait
    assert info["hardware"]["omp_wait"] == (os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT")
                                            or cpus.SPINCOUNT)
