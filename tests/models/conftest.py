import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty conversion cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(d))
    return d
