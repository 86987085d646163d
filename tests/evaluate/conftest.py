import pytest

from eval_helpers import lively_model


@pytest.fixture(scope="module")
def eval_tok():
    from tunesmith.testing import tiny_tokenizer

    return tiny_tokenizer()  # our own copy: these tests read its padding side


@pytest.fixture(scope="module")
def model(eval_tok):
    return lively_model(eval_tok)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    barrier waits make every small matmul ~20 ms (a 2-layer forward went from 1 ms to 400 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
