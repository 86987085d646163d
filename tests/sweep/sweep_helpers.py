"""A sweep config on the tiny model: trials of 4 steps, evaluated every 2, ~1-2 s each."""

from pathlib import Path

import yaml


def sweep_config(path: Path, tiny_model_dir, tiny_data, params: dict, **sweep) -> Path:
    """Write CONFIG.yaml for a sweep over ``params`` (sweep.* keys from ``sweep``); return its path."""
    from tunesmith.config import EvalConfig

    train_f, valid_f = tiny_data
    evals = {"every_steps": 2, "samples": 0, "compare_base": False, "max_new_tokens": 4}
    if "metric_examples" in EvalConfig.model_fields:  # task metrics at each evaluation cost generation time
        evals["metric_examples"] = 0
    cfg = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(train_f), "valid": str(valid_f), "max_length": 64},
        "method": {"name": "lora", "lora": {"r": 4, "dropout": 0.0}},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "eval": evals,
        "checkpoint": {"keep_last": 1},
        "sweep": {"params": params, "output_dir": str(path.parent / "sweep"), **sweep},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
