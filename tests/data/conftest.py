import pytest
from data_helpers import write_jsonl


@pytest.fixture
def jsonl(tmp_path):
    def make(records, name="train.jsonl"):
        return write_jsonl(tmp_path / name, records)
    return make
