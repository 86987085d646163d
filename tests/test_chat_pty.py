"""`tunesmith chat` driven through a real pseudo-terminal, as a person would type into it.

The tiny model is made "talkative": its untied output head scores only lowercase word tokens, so
greedy replies are printable words that depend on the conversation (a freshly initialised model
answers every prompt with the same blank line). Expected replies come from evaluate.generate_batch,
an independent greedy decoder, run in this process on the same model.
"""

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from tunesmith import models
from tunesmith.chat import Chat, Sampling, run
from tunesmith.evaluate import generate_batch

MAX_NEW = 10
SYSTEM = {"role": "system", "content": "reverse"}


def talkative_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.testing import tiny_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_model(tok).config.to_dict() | {"tie_word_embeddings": False}))
    words = torch.tensor([bool(re.fullmatch(r" ?[a-z]+", tok.decode([i]))) for i in range(len(tok))])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.lm_head.weight[~words] = 0  # only word tokens can win the argmax
    return model.eval()


@pytest.fixture(scope="module")
def talkative(tmp_path_factory):
    """(model, tokenizer, HF folder, GGUF file) of one talkative tiny model."""
    from tunesmith.export import write_gguf
    from tunesmith.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = talkative_model(tok)
    folder = tmp_path_factory.mktemp("talkative") / "hf"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder, write_gguf(model, tok, folder.parent / "talkative.gguf", dtype="f32")


def answer(model, tok, conversation):
    return generate_batch(model, tok, [conversation], max_new_tokens=MAX_NEW)[0]


class Terminal:
    """A child process on a pseudo-terminal: send keystrokes, wait for text (a tiny pexpect)."""

    def __init__(self, argv):
        self.fd, child = pty.openpty()
        env = dict(os.environ, TERM="dumb", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(child)
        self.pending = ""

    def expect(self, text: str, timeout: float = 120) -> str:
        """Everything printed before ``text`` (consumed up to and including it), \\r\\n turned into \\n."""
        deadline = time.time() + timeout
        while text not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"waited {timeout} s for {text!r}; the terminal shows {self.pending!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"the chat ended before printing {text!r}: {self.pending!r}")
            self.pending += data.decode("utf-8", "replace").replace("\r\n", "\n")
        before, _, self.pending = self.pending.partition(text)
        return before

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def say(self, line: str) -> str:
        """Type a line and return what the chat printed in reply (the echoed line removed)."""
        self.send(line + "\n")
        echoed, _, reply = self.expect(">>> ").partition("\n")
        assert echoed == line
        return reply.strip()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def start(*args):
        t = Terminal([sys.executable, "-m", "tunesmith.cli", "chat", *map(str, args)])
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def test_chat_on_a_gguf_file_keeps_the_conversation_and_obeys_commands(talkative, terminal):
    model, tok, _, gguf_file = talkative
    u1, u2 = {"role": "user", "content": "hello world"}, {"role": "user", "content": "fox dog"}
    a1 = answer(model, tok, [SYSTEM, u1])
    with_history, without = answer(model, tok, [SYSTEM, u1, {"role": "assistant", "content": a1}, u2]), \
        answer(model, tok, [SYSTEM, u2])
    assert a1 and with_history != without  # the history changes the answer, so the test can tell

    t = terminal(gguf_file, "--system", "reverse", "--temperature", "0", "--max-new-tokens", MAX_NEW)
    assert "/exit or Ctrl-D" in t.expect(">>> ")
    assert t.say("hello world") == a1
    assert t.say("fox dog") == with_history  # the second turn sees the first
    assert t.say("/reset") == "(conversation cleared)"
    assert t.say("fox dog") == without
    assert t.say("/system be brief") == "(system prompt set; new conversation)"
    assert t.say("/system") == "(system prompt: 'be brief')"
    assert t.say("hello world") == answer(model, tok, [{"role": "system", "content": "be brief"}, u1])
    assert "unknown command /nope" in t.say("/nope")
    assert "/reset" in t.say("/help")
    t.send("/exit\n")
    assert t.proc.wait(60) == 0


def test_chat_on_a_run_folder_exits_on_ctrl_d(talkative, terminal, tmp_path):
    from tunesmith.config import MethodConfig

    model, tok, folder, _ = talkative
    lora, _ = models.adapt(talkative_model(tok), MethodConfig(name="lora"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    run_dir = tmp_path / "run"
    models.save_model(lora, tok, run_dir / "best", base_ref=str(folder), method="lora")
    (run_dir / "config.resolved.yaml").write_text("method:\n  name: lora\n")
    tuned, tuned_tok = models.load_for_inference(run_dir, device="cpu")
    u = {"role": "user", "content": "quick brown"}
    expected = answer(tuned, tuned_tok, [u])
    assert expected != answer(model, tok, [u])  # the run's adapter, not the base, is talking

    t = terminal(run_dir, "--temperature", "0", "--max-new-tokens", MAX_NEW)
    t.expect(">>> ")
    assert t.say("quick brown") == expected
    t.send("\x04")  # Ctrl-D at the prompt
    assert t.proc.wait(60) == 0


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_replies_stream_in_pieces_and_sampling_is_seeded(talkative):
    model, tok, _, _ = talkative
    out = Recorder()
    chat = Chat(model, tok, sampling=Sampling(temperature=0, max_new_tokens=16), out=out)
    reply = chat.reply("hello world")
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) >= 2 and "".join(out.writes).strip() == reply  # written word by word, not at the end
    assert chat.messages == [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": reply}]

    def sampled(seed):
        torch.manual_seed(seed)
        return Chat(model, tok, sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16),
                    out=io.StringIO()).reply("hello world")

    assert sampled(1) == sampled(1) and len({sampled(s) for s in range(4)}) > 1


def test_ctrl_c_drops_the_unfinished_exchange_and_the_loop_goes_on(talkative, monkeypatch):
    model, tok, _, _ = talkative
    out = io.StringIO()
    chat = Chat(model, tok, sampling=Sampling(temperature=0, max_new_tokens=4), out=out)
    keys = iter(["hello world", KeyboardInterrupt, "fox dog", "   ", "/exit"])

    def read(prompt):
        key = next(keys)
        if key is KeyboardInterrupt:
            raise KeyboardInterrupt
        return key

    real_generate = chat._generate
    calls = []

    def generate(prompt_ids):
        calls.append(prompt_ids)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply is being written
        return real_generate(prompt_ids)

    monkeypatch.setattr(chat, "_generate", generate)
    assert run(chat, read=read) == 0
    text = out.getvalue()
    assert "(stopped; that exchange was not kept)" in text and "(use /exit or Ctrl-D to quit)" in text
    assert [m["content"] for m in chat.messages][:1] == ["fox dog"] and len(chat.messages) == 2


def test_a_long_conversation_drops_its_oldest_exchanges(talkative):
    model, tok, _, _ = talkative
    out = io.StringIO()
    chat = Chat(model, tok, system="reverse", sampling=Sampling(temperature=0, max_new_tokens=400), out=out)
    for i in range(6):
        chat.messages += [{"role": "user", "content": f"question {i} " * 5},
                          {"role": "assistant", "content": "x " * 20}]
    chat.reply("last question")  # 512-token context: 400 new tokens leave room for little history
    assert "oldest exchange" in out.getvalue()
    assert chat.messages[0]["content"] != "question 0 " * 5 and chat.messages[-2]["content"] == "last question"
    prompt = tok.apply_chat_template(chat.conversation()[:-1], add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert len(prompt) + 400 <= 512


def test_a_model_without_chat_template_is_refused(talkative):
    import copy

    from tunesmith.models import ModelError

    model, tok, _, _ = talkative
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        Chat(model, bare)
