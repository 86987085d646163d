"""Every shipped example config is a valid config (the validation `tunesmith train` runs before anything loads), so
an example is not found broken by the first user who copies it."""

from pathlib import Path

import pytest

from tunesmith.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*/config*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_validates(path):
    cfg = load_config(path, [])
    assert cfg.model.name and cfg.data.train
