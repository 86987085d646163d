"""`tunesmith chat`: talk to a model in the terminal, replies streamed token by token.

The conversation is kept and re-rendered with the model's chat template on every turn (so the model
sees exactly what it saw in training); when it outgrows the model's context, the oldest exchanges
are dropped (the system prompt stays). Commands: /help, /reset, /system [TEXT], /exit (or Ctrl-D).
Ctrl-C stops a reply that is being written; at the prompt it says how to quit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, TextIO

PROMPT = ">>> "
HELP = """commands:
  /reset           forget the conversation (the system prompt stays)
  /system TEXT     set the system prompt and start a new conversation (/system alone shows it)
  /help            this list
  /exit            quit (also /quit, /bye, or Ctrl-D)"""


@dataclass
class Sampling:
    """How replies are drawn: temperature 0 means greedy (the most likely token every step)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256


class Chat:
    """A conversation with one model: ``reply(text)`` streams the answer to ``out`` and keeps both turns."""

    def __init__(self, model, tokenizer, *, system: str | None = None, sampling: Sampling | None = None,
                 out: TextIO | None = None):
        if not getattr(tokenizer, "chat_template", None):
            from .models import ModelError

            raise ModelError("the model's tokenizer has no chat template, so a conversation cannot be rendered: "
                             "chat with an instruct/chat model, or one trained with model.chat_template set")
        # sys.stdout looked up now, not bound when this module is imported (a test's captured stream may be closed
        # by the time a later Chat writes)
        self.model, self.tokenizer, self.out = model, tokenizer, out if out is not None else sys.stdout
        self.sampling = sampling or Sampling()
        self.system = system
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None
        self.reset()

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, text: str) -> str:
        """Stream the model's answer to ``text``; on Ctrl-C the partial answer and ``text`` are dropped."""
        self.messages.append({"role": "user", "content": text})
        try:
            answer = self._generate(self._fitted_prompt())
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _fitted_prompt(self) -> list[int]:
        """The rendered conversation, oldest exchanges dropped until it and the reply fit the context."""
        from .evaluate.generate import render_prompt

        limit = getattr(self.model.config, "max_position_embeddings", None)
        ids = render_prompt(self.tokenizer, self.conversation())
        dropped = 0
        while limit and len(ids) + self.sampling.max_new_tokens > limit and len(self.messages) > 1:
            del self.messages[:2]  # the oldest user message and its answer
            dropped += 1
            ids = render_prompt(self.tokenizer, self.conversation())
        if dropped:
            self.out.write(f"(dropped the {dropped} oldest exchange(s) to fit the model's {limit}-token context)\n")
        return ids

    def _generate(self, prompt: list[int]) -> str:
        import torch
        from transformers import TextStreamer

        from .evaluate.generate import decode_reply, eos_token_ids, generate_options

        out = self.out

        class _Streamer(TextStreamer):  # TextStreamer prints to stdout; ours writes to `out`
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        s = self.sampling
        eos = eos_token_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
        # The same generate() arguments as batched evaluation: temperature 0 is greedy, and greedy passes
        # explicit None sampling values that override those a generation_config ships.
        options = generate_options(s.max_new_tokens, s.temperature > 0, s.temperature, s.top_p, s.top_k, eos, pad, None)
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt], device=device)  # (1, T)
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                streamer=_Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True), **options)
        return decode_reply(self.tokenizer, generated[0, ids.shape[1]:].tolist(), eos, None)  # ends before eos


def run(chat: Chat, *, read: Callable[[str], str] = input) -> int:
    """The read-reply loop; returns the exit code (0 on /exit or end of input)."""
    out = chat.out
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(use /exit or Ctrl-D to quit)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(chat, text):
                return 0
            continue
        try:
            chat.reply(line.strip())
        except KeyboardInterrupt:
            out.write("\n(stopped; that exchange was not kept)\n")
        out.write("\n")
        out.flush()


def _command(chat: Chat, text: str) -> bool:
    """Run a /command; False means quit."""
    name, _, arg = text.partition(" ")
    out = chat.out
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        chat.reset()
        out.write("(conversation cleared)\n")
    elif name == "/system":
        if arg.strip():
            chat.set_system(arg.strip())
            out.write("(system prompt set; new conversation)\n")
        else:
            out.write(f"(system prompt: {chat.system!r})\n" if chat.system else "(no system prompt)\n")
    elif name in ("/help", "/?"):
        out.write(HELP + "\n")
    else:
        out.write(f"(unknown command {name}; /help lists the commands)\n")
    out.flush()
    return True


def cmd_chat(args) -> int:
    """`tunesmith chat MODEL`: load the model (run folder, adapter, HF folder, GGUF, alias) and talk to it."""
    from . import models

    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    from .safety.gate import safety_warning

    warning = safety_warning(args.model)  # failed the release gate, or never measured
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model, tok = models.load_for_inference(args.model)
    chat = Chat(model, tok, system=args.system, sampling=sampling)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)  # one seed for the session: the same inputs give the same replies
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:
            pass
    mode = "greedy" if sampling.temperature <= 0 else f"temperature {sampling.temperature}, top-p {sampling.top_p}"
    print(f"chatting with {args.model} ({mode}). /help for commands, /exit or Ctrl-D to quit.", flush=True)
    return run(chat)


def add_parser(sub) -> None:
    """The `chat` verb's arguments (called by cli._parser)."""
    import argparse

    c = sub.add_parser("chat", help="talk to a model or a run's tuned model in the terminal (replies stream)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="An interactive chat that keeps the conversation.\n\n" + HELP)
    c.add_argument("model", metavar="MODEL_OR_RUN_DIR",
                   help="run folder (its best model), saved or exported model folder, GGUF file, alias")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    c.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    c.add_argument("--seed", type=int, help="seed the sampling, for replies that repeat")
