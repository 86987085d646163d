"""Checkpoints are complete or absent; damaged ones are skipped; state round-trips exactly."""

import random

import torch

from tunesmith.config import TrainConfig
from tunesmith.testing import tiny_model
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.optim import build_optimizer, build_scheduler, plan_steps


def _setup(tok, seed=0):
    model = tiny_model(tok, seed=seed)
    cfg = TrainConfig(lr=1e-3, max_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, plan_steps(16, cfg))
    return model, opt, sched


def _one_step(model, opt, sched):
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(); sched.step(); opt.zero_grad()


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tok, tmp_path):
    model, opt, sched = _setup(tok)
    _one_step(model, opt, sched)
    state = ckpt.TrainState(step=1, epoch=0, step_in_epoch=1)
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, state, keep_last=2)
    expected_rand = (torch.rand(3), random.random())
    _one_step(model, opt, sched)  # continue the original...
    after_original = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2 = _setup(tok, seed=9)  # ...and a fresh process that resumes
    st = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert (st.step, st.step_in_epoch) == (1, 1)
    assert torch.equal(torch.rand(3), expected_rand[0]) and random.random() == expected_rand[1]
    ckpt.restore_rng(st.rng)
    torch.rand(3); random.random()
    _one_step(model2, opt2, sched2)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, after_original[k]), k


def test_damaged_checkpoints_are_skipped(tok, tmp_path):
    model, opt, sched = _setup(tok)
    good = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(step=1), keep_last=5)
    trunc = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(step=2), keep_last=5)
    zero = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(step=3), keep_last=5)
    with open(trunc / "trainable.safetensors", "r+b") as f:
        f.truncate(100)
    (zero / "optimizer.safetensors").write_bytes(b"")
    (tmp_path / "step-000004").mkdir()  # a folder without a manifest: an interrupted write
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append) == good
    assert len(warnings) == 3 and "manifest" in warnings[0]


def test_hash_mismatch_is_detected(tok, tmp_path):
    model, opt, sched = _setup(tok)
    p = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(step=1), keep_last=2)
    data = bytearray((p / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (p / "trainable.safetensors").write_bytes(bytes(data))
    assert "hash" in ckpt.verify_checkpoint(p)


def test_prune_keeps_the_newest(tok, tmp_path):
    model, opt, sched = _setup(tok)
    for s in range(1, 5):
        ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(step=s), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert not list(tmp_path.glob(".tmp-*"))
