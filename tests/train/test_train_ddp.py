"""Several processes on CPU (gloo) give the numbers one process gives.

Every multi-process run is started by a real launcher in a subprocess, one per supported path:
``tunesmith train --nproc 2`` (torchrun called as a function), ``torchrun -m tunesmith`` and
``accelerate launch -m tunesmith``; OMP_NUM_THREADS=1 per process. The one-process references run in
this process. The data is built so the multi-process paths are exercised where they break: examples
of 1 to 9 words, so the ranks' target-token counts differ (a per-rank mean would show), 28 training
examples, so the 4th step holds one micro-batch and rank 1 runs a pass with no loss, and one
validation batch, so rank 1 evaluates a pass with no loss too.

Tolerances: fp32 on the tiny model. Losses agree to rel 1e-6 and weights to abs 1e-6 (measured: within
2e-7), the difference being the order of float additions (a gradient all-reduce sums in another
order than one process's backward). A resumed run on the same number of processes agrees exactly.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.testing import assert_close_scaled
from tunesmith.train import train
from tunesmith.train.launch import without_nproc
from tunesmith.train.steps import IGNORE, no_loss, step_micro_batches, token_loss

WORDS = ["fox", "dog", "paris", "france", "date", "iso", "hello", "world", "quick", "brown", "lazy", "capital"]
STEPS = 4  # 28 examples / (2 processes x micro-batch 4) = 3.5: the 4th step is short


def _write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words)},
                                             {"role": "assistant", "content": " ".join(reversed(words))}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tunesmith.testing import save_tiny_model

    d = tmp_path_factory.mktemp("ddp")
    return {"model": save_tiny_model(d / "model"), "train": _write(d / "train.jsonl", 28, 0),
            "valid": _write(d / "valid.jsonl", 6, 1), "cache": d / "cache", "root": d}


def _overrides(setup, out, *extra):
    return [f"model.name={setup['model']}", f"data.train={setup['train']}", f"data.valid={setup['valid']}",
            f"output_dir={out}", "data.max_length=64", "method.name=full", "train.batch_size=4",
            f"train.max_steps={STEPS}", "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=2",
            "eval.batch_size=8", "eval.samples=1", "eval.max_new_tokens=4", "eval.metric_examples=2",
            "eval.compare_examples=2", "checkpoint.every_steps=1", "checkpoint.keep_last=10", *extra]


def _env(setup):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TUNESMITH_CACHE_DIR=str(setup["cache"]))
    env.pop("LOCAL_RANK", None)
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


LAUNCHERS = {
    "nproc": [sys.executable, "-m", "tunesmith", "train", "--nproc", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "tunesmith", "train"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "{port}", "-m", "tunesmith", "train"],
}


def _launch(setup, launcher, out, *extra, resume=False):
    return _launch_with(setup, launcher, _overrides(setup, out, *extra), resume)


def _launch_with(setup, launcher, overrides, resume=False):
    cmd = [a.replace("{port}", _free_port()) for a in LAUNCHERS[launcher]] + ["--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, env=_env(setup), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _events(run, kind):
    return [e for e in map(json.loads, open(run / "metrics.jsonl")) if e["kind"] == kind]


def _losses(run):
    return [e["loss"] for e in _events(run, "train")]


def _weights(model_dir):
    return {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}


def _assert_weights_close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert_close_scaled(b[k], a[k], msg=k)


@pytest.fixture(scope="module")
def one_process(setup):
    """The references: one process, micro-batch 8, and micro-batch 4 x accumulation 2."""
    root = setup["root"]
    b8 = train(load_config(None, _overrides(setup, root / "one-b8", "train.batch_size=8")), quiet=True)
    a2 = train(load_config(None, _overrides(setup, root / "one-a2", "train.grad_accum=2")), quiet=True)
    return b8.output_dir, a2.output_dir


@pytest.fixture(scope="module")
def ddp_run(setup):
    out = setup["root"] / "ddp"
    _launch(setup, "torchrun", out)
    return out


def test_two_processes_equal_one_process_with_batch_8_and_with_accumulation_2(one_process, ddp_run):
    b8, a2 = one_process
    assert len(_losses(ddp_run)) == STEPS
    for ref in (b8, a2):
        assert _losses(ddp_run) == pytest.approx(_losses(ref), rel=1e-6, abs=0)
        # target tokens per step are counted over both ranks: the loss is normalised by the global count
        assert [e["tokens"] for e in _events(ddp_run, "train")] == [e["tokens"] for e in _events(ref, "train")]
        # validation: one batch, on rank 0; rank 1's pass with no loss adds nothing (token-weighted sum)
        ev, ev_ref = _events(ddp_run, "eval"), _events(ref, "eval")
        assert [e["val_tokens"] for e in ev] == [e["val_tokens"] for e in ev_ref]
        assert [e["val_loss"] for e in ev] == pytest.approx([e["val_loss"] for e in ev_ref], rel=1e-6, abs=0)
        _assert_weights_close(_weights(ref / "best"), _weights(ddp_run / "best"))
    # the main process alone wrote files, samples and the base comparison
    info = json.loads((ddp_run / "run.json").read_text())
    assert info["hardware"]["processes"] == 2 and info["plan"]["examples_per_step"] == 8
    assert _events(ddp_run, "eval")[0]["samples"] and (ddp_run / "compare.json").is_file()
    assert len(_events(ddp_run, "run_started")) == 1


def _cut_back_to(run, step):
    """The run folder as an interruption right after ``step`` would have left it (newer checkpoints gone)."""
    for ckpt in (run / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "best")


def test_checkpoint_and_resume_on_two_processes_equal_the_uninterrupted_run(setup, ddp_run):
    cut = setup["root"] / "ddp-resumed"
    shutil.copytree(ddp_run, cut)
    _cut_back_to(cut, 2)
    _launch(setup, "nproc", cut, resume=True)
    assert any("step-000002" in e.get("text", "") for e in _events(cut, "message"))
    assert _losses(cut) == _losses(ddp_run)  # exactly: the same processes, the same order of additions
    wa, wb = _weights(ddp_run / "best"), _weights(cut / "best")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_on_two_processes_equals_one_process_and_its_checkpoint_resumes_on_one(setup, one_process):
    b8, _ = one_process
    run = setup["root"] / "fsdp"
    _launch(setup, "accelerate", run, "distributed.strategy=fsdp")
    assert _losses(run) == pytest.approx(_losses(b8), rel=1e-6, abs=0)
    _assert_weights_close(_weights(b8 / "best"), _weights(run / "best"))
    # checkpoints hold full (gathered) tensors, the format one process writes
    saved = load_file(run / "checkpoints" / "step-000002" / "trainable.safetensors")
    ref = load_file(b8 / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ref.items()}
    opt = load_file(run / "checkpoints" / "step-000002" / "optimizer.safetensors")
    opt_ref = load_file(b8 / "checkpoints" / "step-000002" / "optimizer.safetensors")
    assert {k: v.shape for k, v in opt.items()} == {k: v.shape for k, v in opt_ref.items()}

    # resume the 2-process FSDP run on 1 process with micro-batch 8: the same effective batch
    cut = setup["root"] / "fsdp-resumed-on-one"
    shutil.copytree(run, cut)
    _cut_back_to(cut, 2)
    res = train(load_config(None, _overrides(setup, cut, "train.batch_size=8", "distributed.strategy=fsdp")),
                resume=True, quiet=True)
    assert res.status == "completed" and res.steps == STEPS
    assert _losses(cut) == pytest.approx(_losses(b8), rel=1e-6, abs=0)
    _assert_weights_close(_weights(b8 / "best"), _weights(cut / "best"))


def test_resume_refuses_another_effective_batch(setup, one_process):
    b8, _ = one_process
    cut = setup["root"] / "other-batch"
    shutil.copytree(b8, cut)
    _cut_back_to(cut, 2)
    with pytest.raises(Exception, match="effective batch"):  # 8 examples per step then, 4 now
        train(load_config(None, _overrides(setup, cut)), resume=True, quiet=True)


# ---------------------------------------------------------------- reinforcement fine-tuning on two processes


def _grpo_overrides(setup, out, *extra):
    """A GRPO run whose last step is short (9 prompts, 4 a step: one rank has none) and whose 5 held-out prompts
    split unevenly (batches of 2: rank 1 evaluates one batch and a pass with nothing); rewards scaled by the whole
    step's spread, so the processes must share their rewards."""
    from tunesmith.testing import write_prompt_jsonl

    root = setup["root"]
    train_f, valid_f = write_prompt_jsonl(root / "prompts.jsonl", 9, 0), write_prompt_jsonl(root / "held.jsonl", 5, 1)
    return [f"model.name={setup['model']}", f"data.train={train_f}", f"data.valid={valid_f}", f"output_dir={out}",
            "objective.name=grpo", "objective.grpo.grader=tunesmith.testing:reward_char_overlap",
            "objective.grpo.num_generations=3", "objective.grpo.max_completion_length=6",
            "objective.grpo.mask_truncated_completions=false", "objective.grpo.scale_rewards=batch",
            "data.max_length=48", "method.name=full", "train.max_steps=3", "train.lr=1e-2", "train.warmup_steps=0",
            "eval.every_steps=3", "eval.batch_size=2", "eval.samples=1", "eval.compare_examples=2",
            "eval.metric_examples=0", "checkpoint.every_steps=3", *extra]


def test_grpo_on_two_processes_samples_and_trains_as_one_process(setup):
    """Each process samples and grades the answers to its share of a step's prompts, each answer from its own seeded
    stream: two processes of 2 prompts sample the answers one process of 4 does, and train to the same losses,
    rewards and weights."""
    root = setup["root"]
    one = train(load_config(None, _grpo_overrides(setup, root / "grpo-one", "train.batch_size=4")), quiet=True)
    two = root / "grpo-two"
    _launch_with(setup, "nproc", _grpo_overrides(setup, two, "train.batch_size=2"))
    a, b = _events(one.output_dir, "train"), _events(two, "train")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["stats"]["reward"] == pytest.approx(x["stats"]["reward"], rel=1e-6)  # the same answers (fp32 sums)
        assert y["stats"]["completion_length"] == x["stats"]["completion_length"]
        assert y["tokens"] == x["tokens"]  # the step's divisor counted over both processes
        # the loss is a sum of advantages that cancel within each group (about 0, rounding apart): the gradient shows
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    ev, ev_ref = _events(two, "eval"), _events(one.output_dir, "eval")
    assert [e["val_loss"] for e in ev] == pytest.approx([e["val_loss"] for e in ev_ref], rel=1e-6)
    assert [e["stats"]["reward_sampled"] for e in ev] == pytest.approx([e["stats"]["reward_sampled"] for e in ev_ref])
    # Weights: GRPO's gradient is a sum of advantage-weighted terms that cancel, so many of its elements are rounding
    # noise, which Adam divides by its own tiny second moment: such elements move by different fractions of lr on one
    # process and on two. The trained update agrees as a whole (measured: 2e-5 of its norm).
    w0, w1, w2 = _weights(setup["model"]), _weights(one.output_dir / "best"), _weights(two / "best")
    update = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w2[k] - w1[k]) ** 2).sum()) for k in w1) ** 0.5
    assert update > 0.1 and apart <= 1e-4 * update, (apart, update)


# ---------------------------------------------------------------- text-to-image on two processes


def _denoise_overrides(setup, out, *extra):
    """A tiny pixel-space pipeline (the built-in model's layout) on 9 captioned images: 2 steps of 4 images and a short
    one of 1 (one process has none), validation of 1 image at 4 fixed timesteps in batches of 2."""
    from tunesmith.images import model as M
    from tunesmith.images import synth

    root = setup["root"]
    pipe, data = root / "t2i-pipe", root / "t2i-data"
    if not pipe.exists():
        M.build_pipeline(M.ModelShape(resolution=16, channels=(8, 16), heads=2, text_dim=16, text_layers=1,
                                      text_heads=2, text_ff=32), seed=0).save_pretrained(pipe, safe_serialization=True)
        synth.write_dataset(data, "cross", n=10, seed=0, resolution=16)
    return [f"model.name={pipe}", f"data.train={data}", f"output_dir={out}", "objective.name=denoise",
            "method.name=lora", "method.lora.r=4", "method.lora.dropout=0.0", "data.valid_fraction=0.1",
            "train.max_steps=3", "train.lr=1e-3", "train.warmup_steps=0", "eval.every_steps=3", "eval.batch_size=2",
            "eval.compare_base=false", "checkpoint.every_steps=3", "objective.denoise.inference_steps=2",
            "objective.denoise.random_crop=true", "objective.denoise.random_flip=true", *extra]


def test_denoise_on_two_processes_trains_as_one_process(setup):
    """Each image's crop, flip, caption dropout, timestep and noise are drawn from its own seeded stream: two
    processes of 2 images a step train as one process of 4, to the same losses and adapter weights."""
    root = setup["root"]
    one = train(load_config(None, _denoise_overrides(setup, root / "t2i-one", "train.batch_size=4")), quiet=True)
    two = root / "t2i-two"
    _launch_with(setup, "nproc", _denoise_overrides(setup, two, "train.batch_size=2"))
    a, b = _events(one.output_dir, "train"), _events(two, "train")
    assert len(a) == len(b) == 3
    assert [e["loss"] for e in b] == pytest.approx([e["loss"] for e in a], rel=1e-6)
    assert [e["val_loss"] for e in _events(two, "eval")] == pytest.approx(
        [e["val_loss"] for e in _events(one.output_dir, "eval")], rel=1e-6)
    # The adapters as a whole, not element by element: lora_B starts at 0, so after 3 steps many of its elements are
    # tiny, and Adam divides their rounding noise by an equally tiny second moment (measured: B within 1.2e-5 of its
    # norm on an Intel Xeon, 1.01e-4 on an AMD EPYC, which sums in another order; A within 1e-7 on both).
    w1, w2 = _weights(one.output_dir / "best"), _weights(two / "best")
    assert w1.keys() == w2.keys()
    for part in ("lora_A", "lora_B"):
        names = [k for k in w1 if part in k]
        apart = sum(float(((w2[k] - w1[k]) ** 2).sum()) for k in names) ** 0.5
        norm = sum(float((w1[k] ** 2).sum()) for k in names) ** 0.5
        assert names and apart <= (1e-3 if part == "lora_B" else 1e-4) * norm, (part, apart, norm)


# ---------------------------------------------------------------- the pieces, without processes


def test_every_rank_makes_the_same_number_of_passes():
    order = list(range(28))
    ranks = [step_micro_batches(order, micro=4, accum=1, processes=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in ranks[0]] == [len(s) for s in ranks[1]] == [1, 1, 1, 1]
    assert ranks[1][3] == [[]]  # the short last step: rank 1 has no data and runs a pass with no loss
    ranks = [step_micro_batches(list(range(20)), micro=2, accum=3, processes=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in ranks[0]] == [len(s) for s in ranks[1]] == [3, 2]
    assert sorted(i for r in ranks for s in r for mb in s for i in mb) == list(range(20))


def test_a_pass_with_no_loss_adds_nothing(tok):
    from tunesmith.testing import tiny_model

    model = tiny_model(tok, seed=3)
    ids = torch.tensor([tok("the quick brown fox")["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss_sum, n, correct = token_loss(model, no_loss(batch))
    loss_sum.backward()
    assert float(loss_sum.detach()) == 0.0 and n == 0 and correct == 0
    assert (no_loss(batch)["labels"] == IGNORE).all() and (batch["labels"] == ids).all()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_nproc_is_taken_out_of_what_each_process_runs():
    assert without_nproc(["train", "c.yaml", "--nproc", "2", "--quiet"]) == ["train", "c.yaml", "--quiet"]
    assert without_nproc(["train", "--nproc=4", "--set", "a=b"]) == ["train", "--set", "a=b"]


def test_bad_nproc_and_fsdp_with_lora_are_bad_input(setup, tmp_path, capsys):
    from tunesmith.cli import main

    base = ["train", "--data", str(setup["train"]), "--model", str(setup["model"]), "--out", str(tmp_path / "r")]
    assert main(base + ["--nproc", "0"]) == 2
    assert "--nproc 0" in capsys.readouterr().err
    assert main(base + ["--method", "lora", "--set", "distributed.strategy=fsdp", "--nproc", "2"]) == 2
    assert "fsdp" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_launched_process_takes_one_stop_delivered_twice_as_one(monkeypatch):
    """SLURM signals every process of a job step and torchrun passes its copy on: one stop, not "quit now"."""
    from tunesmith.cli import _GracefulStop

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    stop = _GracefulStop()
    stop._handle(15, None)
    stop._handle(15, None)  # the duplicate, a moment later: ignored
    assert stop.requested
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(KeyboardInterrupt):  # one process: a second signal quits at once, as before
        stop._handle(2, None)


def test_example_launch_files_are_valid():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    here = Path(__file__).resolve().parents[2] / "examples" / "distributed"
    one, two = (load_config_from_file(str(here / f)) for f in ("accelerate_1node_8gpu.yaml", "accelerate_2nodes_8gpu.yaml"))
    assert (one.num_machines, one.num_processes) == (1, 8) and (two.num_machines, two.num_processes) == (2, 16)
    assert two.main_process_ip and two.machine_rank == 0
    assert subprocess.run(["bash", "-n", str(here / "slurm_2nodes.sbatch")]).returncode == 0
