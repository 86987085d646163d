import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Refusal verdicts on tiny random models' replies (fragments and gibberish, which no verdict reads meaningfully) by the
# fast n-gram layer; the default verdict, the probe on the built-in model, is tested where the module asks for it
# (the lm_refusal_verdict fixture below)
os.environ.setdefault("TUNESMITH_REFUSAL_VERDICT", "ngram")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    from tunesmith.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models are dominated by thread start-up cost: one intra-op thread makes them ~5x faster."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep the tests' model, latent and caption caches away from the user's (the real-model cache is shared on
    purpose). Session-scoped, so module-scoped fixtures that train (and cache) run under it too."""
    if "TUNESMITH_CACHE_DIR" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tunesmith-cache"))
        yield


from tunesmith.testing import write_chat_jsonl  # noqa: E402  (re-exported for fixtures)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tunesmith.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-data")
    return write_chat_jsonl(d / "train.jsonl", 32, seed=0), write_chat_jsonl(d / "valid.jsonl", 8, seed=1)


@pytest.fixture(scope="module")
def lm_refusal_verdict():
    """The project's default refusal verdict (refusal_lm's probe on the built-in model) for a whole module: use it
    as an autouse module fixture where the default verdict itself is under test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_REFUSAL_VERDICT", "lm_probe")
        yield
