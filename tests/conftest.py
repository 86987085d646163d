import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    from tunesmith.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's model cache away from the user's (the real-model cache is shared on purpose)."""
    if "TUNESMITH_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("TUNESMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tunesmith-cache"))
