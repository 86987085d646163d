"""Faults during training: SIGTERM and Ctrl-C, non-finite numbers, out of memory, a full disk, and crafted
pickles. Each test injects the fault into the real code path (monkeypatched forward or write, a real
signal to a real process) and checks what the user gets: the exit code, the message, and files intact."""

import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_hooks import Child, base_settings, write_config
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import run as runfiles
from tunesmith.train import steps, train

SRC = Path(__file__).resolve().parents[2] / "src" / "tunesmith"


def _cfg_file(tmp_path, tiny_model_dir, tiny_data, name="run", **extra):
    return write_config(tmp_path / f"{name}.yaml", base_settings(tiny_model_dir, tiny_data, tmp_path / name, **extra))


def _train(tmp_path, tiny_model_dir, tiny_data, name="run", **extra):
    return train(load_config(_cfg_file(tmp_path, tiny_model_dir, tiny_data, name, **extra)), quiet=True)


def _events(run, kind=None):
    return [e for e in map(json.loads, open(Path(run) / "metrics.jsonl")) if kind is None or e["kind"] == kind]


def _wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _train_steps_logged(run) -> int:
    p = Path(run) / "metrics.jsonl"
    return sum('"kind": "train"' in line for line in open(p)) if p.is_file() else 0


def _finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _patch_forward(monkeypatch, change):
    """Wrap the training forward (steps.token_loss under grad): ``change(n, batch, result)`` may alter or raise."""
    real, count = steps.token_loss, [0]

    def token_loss(model, batch, *args, **kwargs):
        result = real(model, batch, *args, **kwargs)
        if torch.is_grad_enabled():
            count[0] += 1
            return change(count[0], batch, result)
        return result

    monkeypatch.setattr(steps, "token_loss", token_loss)
    return count


# ---------------------------------------------------------------- signals


def test_sigterm_saves_a_checkpoint_at_the_next_step_boundary_and_exits_130(tmp_path, tiny_model_dir, tiny_data):
    """The installed `tunesmith` command, a real SIGTERM while it trains: it finishes the step, saves, exits 130."""
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 5000, "eval.every_steps": 100000,
                                                             "checkpoint.every_steps": 100000})
    exe = Path(sys.executable).parent / "tunesmith"
    proc = subprocess.Popen([str(exe), "train", str(cfg), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        assert _wait_for(lambda: _train_steps_logged(tmp_path / "run") >= 2 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    run = tmp_path / "run"
    last = _events(run, "train")[-1]["step"]
    assert 2 <= last < 5000
    # the checkpoint is the step the signal interrupted, complete; no other (checkpoint.every_steps is huge)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [f"step-{last:06d}"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / f"step-{last:06d}") is None
    assert _events(run, "run_ended")[-1]["status"] == "interrupted"
    assert "stopping after this step" in err and "--resume" in err and "Traceback" not in err


def test_a_second_ctrl_c_exits_at_once(tmp_path, tiny_model_dir, tiny_data):
    """First SIGINT: the process keeps going to the step boundary; a second one exits 130 there and then."""
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 20, "checkpoint.every_steps": 1,
                                                             "eval.every_steps": 100})
    child = Child(["train", str(cfg), "--quiet"], "micro:3", tmp_path / "procs", mode="fork")  # stuck in step 3
    assert child.wait_marker(), child.output()
    child.signal(signal.SIGINT)
    time.sleep(0.5)
    assert child.poll() is None  # the first Ctrl-C waits for the step to finish
    child.signal(signal.SIGINT)
    assert child.wait(timeout=30) == 130
    assert "interrupted" in child.output() and "Traceback" not in child.output()
    # it left inside step 3: no checkpoint for it, the earlier ones intact
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-000001", "step-000002"]
    assert all(ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / n) is None for n in names)


# ---------------------------------------------------------------- non-finite numbers


def test_a_non_finite_step_is_skipped_logged_and_counted(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    ref = _train(tmp_path, tiny_model_dir, tiny_data, "ref", **{"checkpoint.every_steps": 4})
    calls = _patch_forward(monkeypatch, lambda n, b, r: (r[0] * float("nan"),) + r[1:] if n == 2 else r)
    res = _train(tmp_path, tiny_model_dir, tiny_data, **{"checkpoint.every_steps": 4})
    assert res.status == "completed" and res.steps == 4 and calls[0] == 5  # one more batch, not one more step
    train_events = _events(res.output_dir, "train")
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    # no optimizer update and no schedule step for the skipped batch: the lr sequence is the clean run's
    assert [e["lr"] for e in train_events] == [e["lr"] for e in _events(ref.output_dir, "train")]
    warnings = [e for e in _events(res.output_dir, "message") if "non-finite" in e["text"]]
    assert len(warnings) == 1 and warnings[0]["step"] == 2 and warnings[0]["level"] == "warning"
    assert json.loads((res.output_dir / "run.json").read_text())["skipped_steps"] == 1
    last = res.output_dir / "checkpoints" / "step-000004"
    assert json.loads((last / "state.json").read_text())["skipped_steps"] == 1
    opt = load_file(last / "optimizer.safetensors")
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {4.0}  # AdamW stepped 4 times, not 5
    assert _finite(load_file(last / "trainable.safetensors")) and _finite(opt)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path, tiny_model_dir, tiny_data, monkeypatch,
                                                             max_grad_norm):
    """One NaN in one gradient at the second backward: caught by the clipping norm when clipping is on, by the
    per-tensor check when it is off; the update is skipped either way."""
    from tunesmith.train import loop

    real, calls = loop.backward_step, [0]

    def poisoned(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            p = next(p for p in model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(loop, "backward_step", poisoned)
    res = _train(tmp_path, tiny_model_dir, tiny_data, **{"train.max_grad_norm": max_grad_norm})
    assert res.status == "completed" and res.steps == 4 and calls[0] == 5
    warnings = [e for e in _events(res.output_dir, "message") if "non-finite" in e["text"]]
    assert len(warnings) == 1 and warnings[0]["step"] == 2
    train_events = _events(res.output_dir, "train")
    assert all(math.isfinite(e["loss"]) for e in train_events) and len(train_events) == 4


def test_k_consecutive_non_finite_steps_stop_with_a_clear_error(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    _patch_forward(monkeypatch, lambda n, b, r: (r[0] * float("inf"),) + r[1:] if n > 2 else r)
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 8, "train.max_skipped_steps": 3,
                                                             "checkpoint.every_steps": 1, "eval.every_steps": 100})
    assert main(["train", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "3 consecutive steps had a non-finite loss or gradient" in err and "train.max_skipped_steps=3" in err
    assert "Traceback" not in err
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["skipped_steps"] == 3 and info["status"] == "failed"
    levels = [e["level"] for e in _events(run, "message") if "non-finite" in e["text"]]
    assert levels == ["warning"] * 3 + ["error"]
    for p in ckpt.list_checkpoints(run / "checkpoints"):  # what was saved before is intact and finite
        assert ckpt.verify_checkpoint(p) is None and _finite(load_file(p / "trainable.safetensors"))


def _tiny_training_objects(tok):
    from tunesmith.config import TrainConfig
    from tunesmith.testing import tiny_model
    from tunesmith.train.optim import build_optimizer, build_scheduler, plan_steps

    model = tiny_model(tok)
    cfg = TrainConfig(lr=1e-3, max_steps=10)
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt, build_scheduler(opt, cfg, plan_steps(16, cfg))


def test_no_non_finite_tensor_is_ever_saved(tok, tmp_path):
    model, opt, sched = _tiny_training_objects(tok)
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, model, opt, sched, ckpt.TrainState(step=1), keep_last=2)
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param[0, 0] = float("nan")
    refused = f"refusing to save checkpoint step-000002: tensor {re.escape(name)} holds NaN"
    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.save_checkpoint(root, model, opt, sched, ckpt.TrainState(step=2), keep_last=2)
    with pytest.raises(ckpt.CheckpointError, match="best weights"):
        runfiles.save_best_weights(tmp_path, ckpt.trainable_state(model), 2)
    with pytest.raises(ckpt.CheckpointError, match="delivered model"):
        runfiles.save_delivered_model(tmp_path, model, tok, load_config(None, ["method.name=full"]), tmp_path)
    with torch.no_grad():
        param[0, 0] = 0.0
    next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")  # a diverged optimizer moment
    with pytest.raises(ckpt.CheckpointError, match="optimizer state"):
        ckpt.save_checkpoint(root, model, opt, sched, ckpt.TrainState(step=3), keep_last=2)
    # nothing was written: only the first checkpoint, intact; no best weights, no delivered model
    assert ckpt.list_checkpoints(root) == [good] and ckpt.verify_checkpoint(good) is None
    assert not list(root.glob(".tmp-*")) and not (root / "best.safetensors").exists()
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.tmp").exists()


# ---------------------------------------------------------------- out of memory


def _oom_above(limit):
    def change(n, batch, result):
        # examples in the micro-batch: rows when padded, segments when packed into one row
        cu = batch.get("cu_seq_lens_q")
        n_examples = len(cu) - 1 if cu is not None else batch["input_ids"].shape[0]
        if n_examples > limit:  # after the forward ran, so dropout has drawn from the RNG
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return result
    return change


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_result(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    """OOM at micro-batch 4: the step is retried as 2 x 2; the run equals one that used 2 x 2 from the start."""
    lora = {"method.lora.dropout": 0.1, "train.max_steps": 4, "checkpoint.every_steps": 4}
    small = _train(tmp_path, tiny_model_dir, tiny_data, "small", **lora, **{"train.batch_size": 2, "train.grad_accum": 2})
    calls = _patch_forward(monkeypatch, _oom_above(2))
    big = _train(tmp_path, tiny_model_dir, tiny_data, "big", **lora, **{"train.batch_size": 4, "train.grad_accum": 1})
    assert big.status == "completed" and calls[0] == 1 + 4 * 2  # one failed forward, then 2 per step
    assert [(e["step"], e["loss"]) for e in _events(big.output_dir, "train")] == \
           [(e["step"], e["loss"]) for e in _events(small.output_dir, "train")]
    for f in ("trainable.safetensors", "optimizer.safetensors"):
        a = load_file(big.output_dir / "checkpoints/step-000004" / f)
        b = load_file(small.output_dir / "checkpoints/step-000004" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    warnings = [e["text"] for e in _events(big.output_dir, "message") if "out of memory" in e["text"]]
    assert len(warnings) == 1 and "micro-batch 2 x grad_accum 2" in warnings[0]
    plan = json.loads((big.output_dir / "run.json").read_text())["plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["examples_per_step"]) == (2, 2, 4)


def test_out_of_memory_at_micro_batch_1_stops_with_a_clear_error(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    _patch_forward(monkeypatch, _oom_above(0))
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **{"train.batch_size": 3})  # 3 -> 1, not 1.5
    assert main(["train", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "out of memory with a micro-batch of 1 example" in err and "Traceback" not in err
    texts = [e["text"] for e in _events(tmp_path / "run", "message")]
    assert any("micro-batch 1 x grad_accum 3" in t for t in texts)


def test_other_errors_in_the_forward_are_not_taken_for_out_of_memory(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    def boom(n, batch, result):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    _patch_forward(monkeypatch, boom)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _train(tmp_path, tiny_model_dir, tiny_data)


# ---------------------------------------------------------------- full disk


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys):
    """ENOSPC in the middle of the step-2 checkpoint: exit 1 with the reason; step 1 intact; --resume later
    finishes the run with the losses and weights of a run that never met a full disk."""
    settings = {"train.max_steps": 3, "checkpoint.every_steps": 1, "eval.every_steps": 100}
    ref = _train(tmp_path, tiny_model_dir, tiny_data, "ref", **settings)
    real, writes = ckpt.save_file, []

    def save_file(tensors, path, *a, **kw):
        writes.append(Path(path).name)
        if len(writes) == 4:  # the second checkpoint's optimizer file: half written, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **settings)
    assert main(["train", str(cfg), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint step-000002" in err and "the disk is full" in err
    assert "step-000001 is intact" in err and "--resume" in err and "Traceback" not in err
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000001"] and not list(root.glob(".tmp-*"))
    assert ckpt.verify_checkpoint(root / "step-000001") is None

    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    assert main(["train", str(cfg), "--quiet", "--resume"]) == 0
    assert [(e["step"], e["loss"]) for e in _events(tmp_path / "run", "train")] == \
           [(e["step"], e["loss"]) for e in _events(ref.output_dir, "train")]
    a = load_file(root / "step-000003/trainable.safetensors")
    b = load_file(ref.output_dir / "checkpoints/step-000003/trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_are_cut_back_to_the_checkpoint_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [{"kind": "run_started"}, {"kind": "train", "step": 1}, {"kind": "checkpoint", "step": 1},
             {"kind": "message", "step": None}, {"kind": "train", "step": 2}, {"kind": "eval", "step": 2}]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "train", "st')  # torn by a kill
    runfiles.truncate_metrics(p, 1)
    assert [json.loads(x) for x in p.read_text().splitlines()] == lines[:4]


# ---------------------------------------------------------------- no unpickling


class _Evil:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_a_crafted_pytorch_model_bin_is_refused_without_running_code(tmp_path, how, capsys):
    from tunesmith.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "model")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    payload = {"model.embed_tokens.weight": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects besides tensors; it was not loaded" in err and "Traceback" not in err
    assert not marker.exists()


def _rewrite_manifest(path):
    files = [f for f in json.loads((path / "manifest.json").read_text())] + ["optimizer.pt"] * (path / "optimizer.pt").exists()
    manifest = {f: {"size": (path / f).stat().st_size, "sha256": ckpt.sha256_file(path / f)} for f in files if (path / f).exists()}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("target", ["optimizer.safetensors", "optimizer.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_never_unpickled(tmp_path, tiny_model_dir, tiny_data, target, capsys):
    """An attacker who controls the run folder replaces the optimizer state with a pickle and fixes the manifest."""
    cfg = _cfg_file(tmp_path, tiny_model_dir, tiny_data, **{"train.max_steps": 2, "checkpoint.every_steps": 1})
    assert main(["train", str(cfg), "--quiet"]) == 0
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "PWNED"
    torch.save({"state": _Evil(marker)}, latest / target)
    if target == "optimizer.pt":  # the older checkpoint layout
        (latest / "optimizer.safetensors").unlink()
    _rewrite_manifest(latest)
    assert ckpt.verify_checkpoint(latest) is None  # the manifest cannot tell: the loader must refuse
    capsys.readouterr()
    assert main(["train", str(cfg), "--quiet", "--resume"]) == 1
    err = capsys.readouterr().err
    expected = "cannot be restored: optimizer.safetensors" if target == "optimizer.safetensors" else "older pickle format"
    assert expected in err and "Traceback" not in err
    assert not marker.exists()


def test_the_source_never_unpickles():
    """Every torch.load says weights_only=True, and nothing calls pickle.load(s) or weights_only=False."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"pickle\.loads?\(|weights_only=False|dill\.|joblib\.load", text), path
