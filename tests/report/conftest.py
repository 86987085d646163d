import json
import random

import pytest

WORDS = ["fox", "dog", "paris", "france", "date", "iso", "hello", "world", "quick", "brown", "lazy", "capital"]


def write_chat_jsonl(path, n, seed=0):
    """The tests' tiny task (answer with the user's words reversed); the root conftest's module name is
    shadowed inside this conftest, so the ten lines are repeated here."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            f.write(json.dumps({"messages": [{"role": "system", "content": "reverse"},
                                             {"role": "user", "content": " ".join(words)},
                                             {"role": "assistant", "content": " ".join(reversed(words))}]}) + "\n")
    return path


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One run with everything a report shows: curves, task metrics, an overfitting warning, early stopping,
    the base-versus-tuned comparison. Full fine-tuning of 4 examples at a high lr memorises them, so
    validation loss turns up after step 10 and patience 3 stops the run at step 16."""
    from tunesmith.config import load_config
    from tunesmith.train import train

    d = tmp_path_factory.mktemp("report-run")
    train_f, valid_f = write_chat_jsonl(d / "train.jsonl", 4, seed=0), write_chat_jsonl(d / "valid.jsonl", 8, seed=1)
    cfg = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={train_f}", f"data.valid={valid_f}", f"output_dir={d / 'run'}",
        "data.max_length=64", "train.batch_size=4", "train.max_steps=30", "train.lr=1e-2", "train.warmup_steps=1",
        "train.schedule=constant", "method.name=full", "eval.every_steps=2", "eval.samples=2",
        "eval.metric_examples=4", "eval.max_new_tokens=4", "eval.compare_examples=6",
        "eval.early_stopping_patience=3"])
    return train(cfg, quiet=True)
