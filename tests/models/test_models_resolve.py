import json
import time
from pathlib import Path

import pytest

from tunesmith import models
from tunesmith.models import ModelError, registry, resolver


def test_folder_resolves_to_itself(tiny_model_dir):
    assert models.ensure_local(str(tiny_model_dir)) == tiny_model_dir
    assert models.resolve(tiny_model_dir) == tiny_model_dir


def test_run_folder_resolves_to_best_then_final(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.resolved.yaml").write_text("model: {}\n")
    with pytest.raises(ModelError, match="no best/ or final/"):
        models.ensure_local(str(run))
    (run / "final").symlink_to(tiny_model_dir)
    assert models.ensure_local(str(run)) == run / "final"
    (run / "best").symlink_to(tiny_model_dir)
    assert models.ensure_local(str(run)) == run / "best"


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model", "missing.gguf", "a/b/c"])
def test_missing_path_names_it(ref):
    with pytest.raises(ModelError, match="not found: no such file or folder") as e:
        models.ensure_local(ref)
    assert ref.lstrip("./") in str(e.value)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelError, match="not a .gguf model"):
        models.ensure_local(str(f))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.ensure_local(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="give one of them"):
        models.ensure_local(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="LoRA adapter, not a whole model"):
        models.ensure_local(str(tmp_path))


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelError) as e:
        models.ensure_local("some-org/some-model-that-is-not-cached")
    assert time.time() - t0 < 2
    msg = str(e.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg and "smollm2-135m-instruct" in msg


def test_hub_id_without_connection_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    t0 = time.time()
    with pytest.raises(ModelError, match="cannot be reached"):
        models.ensure_local("some-org/some-model")
    assert time.time() - t0 < 5


def test_alias_typo_is_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="did you mean the built-in alias 'smollm2-135m-instruct'"):
        models.ensure_local("smollm2-135m-instrct")


def test_hub_id_found_in_hf_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A cached hub snapshot is used offline, without any network call."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snap / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.ensure_local("org/tiny") == snap
    assert models.ensure_local("org/tiny", revision="a" * 40) == snap
    with pytest.raises(ModelError, match="revision v2"):
        models.ensure_local("org/tiny", revision="v2")


def test_alias_whose_package_is_missing(monkeypatch):
    alias = registry.Alias("ghost", "a test alias", package="no_such_pkg_for_tunesmith", filename="x.gguf")
    monkeypatch.setitem(registry.ALIASES, "ghost", alias)
    with pytest.raises(ModelError, match="pip install no-such-pkg-for-tunesmith"):
        models.ensure_local("ghost")
    row = next(r for r in models.list_models() if r.alias == "ghost")
    assert not row.installed and not row.cached and row.cache_path is None


def test_list_models_reports_builtin_alias(cache):
    rows = {r.alias: r for r in models.list_models()}
    row = rows["smollm2-135m-instruct"]
    assert row.installed and Path(row.source).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not row.cached and row.cache_path.parent == cache / "gguf"
    assert models.cache_dir() == cache
    json.dumps([r.__dict__ | {"cache_path": str(r.cache_path)} for r in rows.values()])  # the CLI prints this


def test_alias_resolves_through_the_gguf_cache(cache, monkeypatch, tiny_model_dir):
    """The built-in alias goes to its package's GGUF and converts once (conversion itself: test_models_gguf)."""
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(resolver, "convert_gguf", fake_convert)
    first = models.ensure_local("smollm2-135m-instruct")
    second = models.ensure_local("smollm2-135m-instruct")
    assert first == second and len(calls) == 1 and calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert first.parent == cache / "gguf"
    assert next(r for r in models.list_models() if r.alias == "smollm2-135m-instruct").cached
