"""Config: defaults, overrides, and errors that name the field and the allowed values."""

from pathlib import Path

import pytest

from tunesmith.config import Config, ConfigError, describe_fields, dump_config, load_config


def test_defaults_are_valid_and_documented():
    cfg = Config()
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.method.name == "lora"
    assert not cfg.model.trust_remote_code
    rows = describe_fields()
    assert all(desc for _, _, desc in rows), [n for n, _, d in rows if not d]
    assert "train.lr" in {n for n, _, _ in rows}


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.001\nmethod:\n  name: full\n")
    cfg = load_config(p, ["train.lr=5e-5", "method.lora.target_modules=[q_proj, v_proj]", "eval.early_stopping_patience=3"])
    assert cfg.train.lr == 5e-5 and cfg.method.name == "full"
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval.early_stopping_patience == 3


def test_relative_data_paths_follow_the_config_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("{}\n")
    (tmp_path / "d" / "c.yaml").write_text("data:\n  train: train.jsonl\n")
    assert load_config(tmp_path / "d" / "c.yaml").data.train == str(tmp_path / "d" / "train.jsonl")


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lrr: 0.1\n", "train.lrr: unknown key"),
    ("method:\n  name: qlora\n", "method.name: got 'qlora'"),
    ("train:\n  batch_size: zero\n", "train.batch_size"),
    ("data:\n  overflow: cut\n", "'error', 'truncate' or 'drop'"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("train: [\n", "not valid YAML"),
    ("method:\n  name: freeze\n", "nothing is selected to train"),
])
def test_errors_name_the_field_and_allowed_values(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "data.train=x.jsonl"])
    dump_config(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml") == cfg


EXAMPLE_CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").rglob("*.yaml")
                         if p.parent.name != "distributed")  # those are accelerate launcher configs, not ours


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_example_config_validates(path):
    """A config a user copies from examples/ must load as it is."""
    cfg = load_config(path)
    for split in ("train", "valid", "test"):
        f = getattr(cfg.data, split)
        image_folder = cfg.objective.name == "denoise" and f is not None and Path(f).is_dir()
        assert f is None or Path(f).is_file() or image_folder, f
    if cfg.sweep.params:
        from tunesmith.sweep.space import check_space

        assert check_space(cfg.sweep.params, Config) == []  # every searched field exists and fits its range


def test_compile_without_a_cxx_compiler_is_a_config_error_before_anything_loads(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.001\n  compile: true\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ / c++ here
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"c\.yaml:3: train\.compile: true needs a C\+\+ compiler.*\[C009\]"):
        load_config(p)
    monkeypatch.undo()
    assert load_config(p).train.compile  # with the system's compiler back on PATH it loads
