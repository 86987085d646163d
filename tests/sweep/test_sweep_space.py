"""The `sweep:` section: ranges and choices over dotted config fields, types, direction, trial configs."""

import optuna
import pytest
import yaml

from tunesmith.config import Config, ConfigError, load_config
from tunesmith.sweep.runner import trial_config
from tunesmith.sweep.space import SweepConfig, check_space, suggest


def _space(**params):
    return SweepConfig(params=params).params


def test_lists_are_choices_and_ranges_take_the_field_type():
    space = _space(**{"train.lr": {"low": "1e-5", "high": 1e-2, "log": True}, "method.lora.r": {"low": 2, "high": 16},
                      "method.lora.target_modules": [["q_proj", "v_proj"], "all-linear"], "method.name": ["lora", "full"]})
    assert space["method.name"].choices == ["lora", "full"] and space["train.lr"].low == 1e-5
    assert check_space(space, Config) == []
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(12):
        trial = study.ask()
        values = suggest(trial, space, Config)
        seen.append(values)
        assert 1e-5 <= values["train.lr"] <= 1e-2 and isinstance(values["train.lr"], float)
        assert isinstance(values["method.lora.r"], int) and 2 <= values["method.lora.r"] <= 16  # r is an int field
        # non-scalar choices come back as themselves, though Optuna stores them as JSON text
        assert values["method.lora.target_modules"] in (["q_proj", "v_proj"], "all-linear")
        study.tell(trial, 0.0)
    assert {str(v["method.lora.target_modules"]) for v in seen} == {"['q_proj', 'v_proj']", "all-linear"}


def test_trial_config_applies_values_and_drops_the_sweep(tmp_path):
    base = load_config(None, ["sweep.params={train.lr: [0.1]}", "output_dir=x"])
    cfg = trial_config(base, {"train.lr": 0.003, "method.lora.r": 8}, tmp_path / "trial-0007")
    assert cfg.train.lr == 0.003 and cfg.method.lora.r == 8 and cfg.output_dir == str(tmp_path / "trial-0007")
    assert cfg.sweep.params == {} and base.train.lr == 2e-4
    with pytest.raises(ConfigError, match="train.lr"):
        trial_config(base, {"train.lr": 5.0}, tmp_path / "t")  # lr must be below 1


@pytest.mark.parametrize("params, problem", [
    ({"train.nope": [1, 2]}, "not a config field"),
    ({"method.lora": [1]}, "a whole section"),
    ({"data.format": {"low": 0, "high": 1}}, "a range needs a numeric field"),
    ({"train.batch_size": {"low": 1, "high": 8.5}}, "whole numbers"),
    ({"train.max_steps": {"low": 1, "high": 8, "type": "float"}}, "takes whole numbers"),
])
def test_space_problems_name_the_field(params, problem):
    (name,) = params
    problems = check_space(_space(**params), Config)
    assert len(problems) == 1 and f"sweep.params.{name}" in problems[0] and problem in problems[0]


@pytest.mark.parametrize("param, message", [
    ({"low": 1}, "needs both low and high"),
    ({"low": 0, "high": 1, "log": True}, "needs low > 0"),
    ({"low": 1, "high": 2, "choices": [1]}, "not both"),
    ([], "must not be empty"),
    ({"low": 1, "high": 2, "lo": 3}, "sweep.params.train.lr.lo: unknown key"),
])
def test_malformed_params_fail_when_the_config_loads(tmp_path, param, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"sweep": {"params": {"train.lr": param}}}))
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_the_output_folder_and_the_sweep_itself_cannot_be_searched():
    for name in ("output_dir", "sweep.n_trials"):
        with pytest.raises(ConfigError, match="cannot be searched"):
            load_config(None, [f"sweep.params={{{name}: [1, 2]}}"])


def test_direction_auto_minimises_losses_and_maximises_task_metrics():
    assert SweepConfig().resolved_direction() == "minimize"  # val_loss
    assert SweepConfig(objective="perplexity").resolved_direction() == "minimize"
    assert SweepConfig(objective="exact_match").resolved_direction() == "maximize"
    assert SweepConfig(objective="rouge_l").resolved_direction() == "maximize"
    assert SweepConfig(objective="exact_match", direction="minimize").resolved_direction() == "minimize"
