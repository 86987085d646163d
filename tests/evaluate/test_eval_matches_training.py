"""One loss path: evaluation's loss on a run's validation file is the validation loss the run logged.

The validation file is chosen to tell the renderings apart: multi-turn chats (every assistant turn is
trained), an assistant turn with weight 0 (not trained), and an example longer than data.max_length that
data.overflow=truncate cuts. A loss that scored only the last reply, or rendered without the run's data
settings, would differ from the run's.
"""

import json
import random

import pytest
import torch

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data import load_examples, render_examples
from tunesmith.evaluate import reference_loss, validation_loss
from tunesmith.models import load_for_inference
from tunesmith.testing import WORDS, tiny_tokenizer
from tunesmith.train import train


def _turn(rng, n=3):
    words = rng.sample(WORDS, n)
    return [{"role": "user", "content": " ".join(words)}, {"role": "assistant", "content": " ".join(reversed(words))}]


def _valid_file(path):
    rng = random.Random(7)
    rows = [[{"role": "system", "content": "reverse"}, *_turn(rng)] for _ in range(3)]
    rows += [[*_turn(rng), *_turn(rng)] for _ in range(3)]  # two trained replies each
    weighted = [*_turn(rng), *_turn(rng)]
    weighted[1]["weight"] = 0  # the first reply carries no loss
    rows.append(weighted)
    rows.append([{"role": "user", "content": "reverse"}, {"role": "assistant", "content": " ".join(WORDS * 3)}])
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


@pytest.fixture(scope="module", params=["lora", "full"])
def run(request, tmp_path_factory, tiny_model_dir, tiny_data):
    d = tmp_path_factory.mktemp(f"val-{request.param}")
    valid = _valid_file(d / "valid.jsonl")
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={tiny_data[0]}", f"data.valid={valid}", f"output_dir={d / 'run'}",
        "model.dtype=float32", "data.max_length=64", "data.overflow=truncate", "train.batch_size=4",
        "train.max_steps=4", "train.lr=1e-2", "train.warmup_steps=1", "eval.every_steps=4", "eval.batch_size=3",
        "eval.samples=0", "eval.metric_examples=0", "eval.compare_base=false", f"method.name={request.param}",
        "method.lora.r=4"])
    res = train(cfg, quiet=True)
    evals = [e for e in map(json.loads, open(res.output_dir / "metrics.jsonl")) if e["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["is_best"]  # one evaluation, so the delivered weights are the ones it scored
    return res.output_dir, cfg, evals[-1]


def test_the_validation_file_exercises_what_differs(run):
    _, cfg, _ = run
    rendered = render_examples(load_examples(cfg.data.valid), tiny_tokenizer(), cfg.data)
    assert rendered.truncated == 1 and len(rendered.items) == 8


def test_validation_loss_equals_the_runs_last_val_loss(run):
    out, cfg, logged = run
    model, tok = load_for_inference(out, dtype=torch.float32, device="cpu")
    examples = load_examples(cfg.data.valid)
    got = validation_loss(model, tok, examples, cfg.data, batch_size=5)  # batches other than the run's: same figure
    assert got["tokens"] == logged["val_tokens"] and got["truncated"] == 1
    assert got["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(logged["token_accuracy"], rel=1e-5)
    # the loss of the last replies alone, as evaluation used to compute it, is another number
    from tunesmith.data import prompt_and_reference

    pairs = [prompt_and_reference(e) for e in examples]
    alone = reference_loss(model, tok, [p for p, _ in pairs], [r for _, r in pairs])
    assert alone["tokens"] != got["tokens"] and abs(alone["loss"] - got["loss"]) > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="tunesmith eval loads the model in bf16 on a GPU")
def test_tunesmith_eval_reports_the_runs_val_loss(run, tmp_path):
    out, cfg, logged = run
    assert main(["eval", str(out), "--data", cfg.data.valid, "--no-baseline", "--max-new-tokens", "1",
                 "--out", str(tmp_path)]) == 0
    loss = json.loads((tmp_path / "eval.json").read_text())["tuned"]["loss"]
    assert loss["tokens"] == logged["val_tokens"]
    assert loss["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_overflow_error_scores_a_long_example_cut_as_truncate_would(model, eval_tok, tmp_path):
    """overflow: error refuses a run's own data before training; a file scored afterwards is cut, not refused."""
    from tunesmith.config import DataConfig

    examples = load_examples(_valid_file(tmp_path / "valid.jsonl"))
    cut = validation_loss(model, eval_tok, examples, DataConfig(max_length=64, overflow="truncate"))
    got = validation_loss(model, eval_tok, examples, DataConfig(max_length=64, overflow="error"))
    assert got == cut and got["truncated"] == 1
    whole = validation_loss(model, eval_tok, examples)  # no run settings: nothing is cut
    assert whole["truncated"] == 0 and whole["tokens"] > got["tokens"]
