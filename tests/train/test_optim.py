import pytest

from tunesmith.config import TrainConfig
from tunesmith.testing import tiny_model
from tunesmith.train.optim import build_optimizer, build_scheduler, plan_steps


def test_plan_counts_steps_and_warmup():
    p = plan_steps(100, TrainConfig(batch_size=4, grad_accum=2, epochs=3, warmup_ratio=0.1))
    assert (p.examples_per_step, p.steps_per_epoch, p.total_steps, p.warmup_steps) == (8, 13, 39, 4)
    assert plan_steps(100, TrainConfig(batch_size=4, max_steps=7)).total_steps == 7
    assert plan_steps(100, TrainConfig(batch_size=4, grad_accum=2), processes=2).examples_per_step == 16


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(tok, schedule):
    cfg = TrainConfig(lr=1.0 / 8, schedule=schedule, warmup_steps=2, max_steps=10)
    opt = build_optimizer(tiny_model(tok), cfg)
    sched = build_scheduler(opt, cfg, plan_steps(10, cfg))
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step(); sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(cfg.lr)
    if schedule == "constant":
        assert lrs[-1] == pytest.approx(cfg.lr)
    else:
        assert lrs[-1] < lrs[3] < lrs[2]


def test_no_weight_decay_on_norms_and_biases(tok):
    opt = build_optimizer(tiny_model(tok), TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
