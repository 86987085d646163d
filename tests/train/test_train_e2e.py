"""The whole training loop on a tiny seeded model: golden losses, accumulation, resume, methods."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.testing import assert_close_scaled
from tunesmith.train import train


def _cfg(tmp_path, tiny_model_dir, tiny_data, *overrides):
    train_f, valid_f = tiny_data
    base = [f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}",
            f"output_dir={tmp_path / 'run'}", "data.max_length=64", "train.batch_size=4", "train.max_steps=4",
            "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=2", "eval.samples=1", "eval.max_new_tokens=4",
            "eval.compare_examples=4", "method.lora.r=4", "method.lora.dropout=0.0"]
    return load_config(None, base + list(overrides))


def _losses(run_dir):
    events = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [e["loss"] for e in events if e["kind"] == "train"]


def _weights(model_dir):
    return {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}


# Recorded on the seeded tiny model (fp32, CPU, torch 2.13.0). Step 1 runs at lr 0 (one warmup step), so
# steps 1-2 agree across methods; from step 3 each method's update shows. A change here means the
# data rendering, loss normalisation, optimizer or schedule changed: find out which before updating.
GOLDEN = {
    "lora": [6.03588551488416, 6.015549129909939, 5.906897055136191, 5.883197206439394],
    "full": [6.03588551488416, 6.015549129909939, 5.69397632495777, 5.429915919448391],
    "freeze": [6.03588551488416, 6.015549129909939, 5.912893346838049, 5.891203446821733],
}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_golden_losses(tmp_path, tiny_model_dir, tiny_data, method):
    extra = ["method.freeze.train_last_layers=1"] if method == "freeze" else []
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data, f"method.name={method}", *extra), quiet=True)
    assert _losses(res.output_dir) == pytest.approx(GOLDEN[method], rel=1e-5)


def test_run_folder(tmp_path, tiny_model_dir, tiny_data):
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data), quiet=True)
    run = res.output_dir
    assert res.status == "completed" and res.steps == 4
    for f in ("config.resolved.yaml", "run.json", "metrics.jsonl", "train.log", "compare.json",
              "best/tunesmith.json", "best/adapter_model.safetensors", "checkpoints/best.safetensors"):
        assert (run / f).exists(), f
    kinds = [json.loads(line)["kind"] for line in open(run / "metrics.jsonl")]
    assert kinds.count("train") == 4 and kinds.count("eval") == 2 and "run_ended" in kinds
    info = json.loads((run / "run.json").read_text())
    assert 0 < info["trainable_params"] < info["total_params"]
    assert res.best_step in (2, 4) and res.comparison is not None


def test_accumulation_4x1_equals_batch_4(tmp_path, tiny_model_dir, tiny_data):
    a = train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, "method.name=full", "train.batch_size=4"), quiet=True)
    b = train(_cfg(tmp_path / "b", tiny_model_dir, tiny_data, "method.name=full", "train.batch_size=1",
                   "train.grad_accum=4"), quiet=True)
    wa, wb = _weights(a.output_dir / "best"), _weights(b.output_dir / "best")
    for k in wa:
        assert_close_scaled(wb[k], wa[k], msg=k)


def _tensors(d):
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_freeze_leaves_frozen_tensors_bit_identical(tmp_path, tiny_model_dir, tiny_data):
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data, "method.name=freeze", "method.freeze.train_last_layers=1"),
                quiet=True)
    base, tuned = _tensors(tiny_model_dir), _tensors(res.output_dir / "best")
    assert set(base) == set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    # the tiny model has two blocks: only block 1 trains, and every one of its tensors moved
    assert changed and all(k.startswith("model.layers.1.") for k in changed), sorted(changed)
    block1 = {k for k in base if k.startswith("model.layers.1.")}
    assert changed == block1


def test_lora_changes_only_adapter_tensors(tmp_path, tiny_model_dir, tiny_data):
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data), quiet=True)
    adapter = load_file(res.output_dir / "best" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # lora_B starts at zero: training moved it, so the adapter does something
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # the base folder is untouched and the run delivered no full copy of it
    assert not (res.output_dir / "best" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, tiny_data, method):
    """Stop after step 2 (as Ctrl-C would), resume: per-step losses and final weights equal one straight run."""
    over = [f"method.name={method}", "train.max_steps=5", "eval.every_steps=5", "checkpoint.every_steps=5"]
    straight = train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, *over), quiet=True)

    calls = iter(range(100))
    cfg = _cfg(tmp_path / "b", tiny_model_dir, tiny_data, *over)
    first = train(cfg, quiet=True, stop_requested=lambda: next(calls) >= 1)
    assert first.status == "interrupted" and first.steps == 2
    assert (first.output_dir / "checkpoints" / "step-000002").is_dir()
    second = train(cfg, resume=True, quiet=True)
    assert second.status == "completed" and second.steps == 5

    assert _losses(second.output_dir) == _losses(straight.output_dir)
    wa, wb = _weights(straight.output_dir / "best"), _weights(second.output_dir / "best")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_refuses_a_changed_config(tmp_path, tiny_model_dir, tiny_data):
    cfg = _cfg(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=2")
    train(cfg, quiet=True)
    changed = _cfg(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=2", "train.lr=5e-3")
    with pytest.raises(Exception, match="config"):
        train(changed, resume=True, quiet=True)


def test_tensorboard_events_read_back(tmp_path, tiny_model_dir, tiny_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data), quiet=True)
    acc = EventAccumulator(str(res.output_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any("loss" in t and "train" in t for t in tags) and any("val" in t for t in tags), tags
    train_tag = next(t for t in tags if "loss" in t and "train" in t)
    assert [e.step for e in acc.Scalars(train_tag)] == [1, 2, 3, 4]
    assert [round(e.value, 5) for e in acc.Scalars(train_tag)] == [round(x, 5) for x in _losses(res.output_dir)]


def test_tensorboard_drops_steps_logged_after_the_checkpoint_a_resume_starts_from(tmp_path, tiny_model_dir, tiny_data):
    """A run killed after step 3 had logged step 3 past its step-2 checkpoint; the resumed run logs step 3
    again, and TensorBoard must show it once, with the resumed value (purge_step)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    calls = iter(range(100))
    cfg = _cfg(tmp_path, tiny_model_dir, tiny_data, "train.max_steps=5", "eval.every_steps=5")
    first = train(cfg, quiet=True, stop_requested=lambda: next(calls) >= 1)
    assert first.status == "interrupted" and first.steps == 2
    # TensorBoard reads a folder's event files in name order: time in whole seconds, host, pid, then a per-process
    # counter compared as text ("10" < "9"), so files one process writes within a second can be read out of order.
    # A real resume is another process, seconds later: wait past the second so the names sort as the runs happened.
    time.sleep(1.1)
    stale = SummaryWriter(log_dir=str(first.output_dir / "tensorboard"))  # what the killed run wrote past step 2
    stale.add_scalar("train/loss", 99.0, 3)
    stale.close()
    time.sleep(1.1)
    second = train(cfg, resume=True, quiet=True)
    acc = EventAccumulator(str(second.output_dir / "tensorboard"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5]
    assert [v for _, v in points] == pytest.approx(_losses(second.output_dir), rel=1e-6)  # TensorBoard stores float32


def test_early_stopping_delivers_the_best_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    """A learning rate far too high makes validation loss rise; patience 1 stops and best/ is the best step."""
    res = train(_cfg(tmp_path, tiny_model_dir, tiny_data, "method.name=full", "train.lr=0.5", "train.max_steps=12",
                     "train.warmup_steps=0", "train.max_grad_norm=null", "train.schedule=constant",
                     "eval.every_steps=1", "eval.early_stopping_patience=1", "eval.samples=0"), quiet=True)
    assert res.status == "early_stopped" and res.steps < 12
    evals = [json.loads(line) for line in open(res.output_dir / "metrics.jsonl")]
    vals = {e["step"]: e["val_loss"] for e in evals if e["kind"] == "eval"}
    assert res.best_step == min(vals, key=vals.get) and vals[res.steps] > vals[res.best_step]
    # the delivered weights are the best step's, not the last step's
    best = load_file(res.output_dir / "checkpoints" / "best.safetensors")
    delivered = _weights(res.output_dir / "best")
    for k, v in best.items():
        assert torch.equal(delivered[k], v), k


def test_paraphrase_augmentation_writes_and_reuses_its_cache(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(tmp_path / "cache"))
    over = ["train.augment.paraphrase=true", "train.augment.paraphrase_count=1", "train.max_steps=2", "eval.samples=0"]
    train(_cfg(tmp_path / "a", tiny_model_dir, tiny_data, *over), quiet=True)
    caches = list((tmp_path / "cache" / "paraphrases").glob("*.json"))
    assert len(caches) == 1
    entries = json.loads(caches[0].read_text())["entries"]
    assert len(entries) == len({json.loads(line)["messages"][1]["content"] for line in open(tiny_data[0])})
    stamp = caches[0].stat().st_mtime_ns
    train(_cfg(tmp_path / "b", tiny_model_dir, tiny_data, *over), quiet=True)
    assert caches[0].stat().st_mtime_ns == stamp  # every prompt was cached: nothing regenerated


def test_a_resumed_auto_run_keeps_the_precision_it_started_with(tmp_path, tiny_model_dir, tiny_data):
    """auto measures the machine; a run resumed on a busier (or other) machine must still compute as it started, or it
    would not be the run that was started: the precision run.json recorded is used, and the log says so."""
    from types import SimpleNamespace

    from tunesmith.train.run import run_precision

    cfg = _cfg(tmp_path, tiny_model_dir, tiny_data)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"precision": {"name": "bf16-mixed"}}))
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    kept = run_precision(cfg, tiny_model_dir, acc, resumed=True)
    assert kept.name == "bf16-mixed" and "as when the run started" in kept.reason
    fresh = run_precision(cfg, tiny_model_dir, acc, resumed=False)  # a new run of the tiny model: fp32, whatever the CPU
    assert fresh.name == "float32" and "too small" in fresh.reason
    explicit = run_precision(_cfg(tmp_path, tiny_model_dir, tiny_data, "model.dtype=float32"), tiny_model_dir, acc, True)
    assert explicit.name == "float32"  # what the config names wins over what was recorded
