"""Chat completions for the job server: base and fine-tuned models, loaded on first use, a small LRU kept.

One code path serves both response kinds: ``model.generate`` runs in a thread and pushes each new token
id through a streamer into a queue; the caller decodes incrementally and gets text deltas (streaming) or
joins them (non-streaming). Generation on one model is serialised by a lock: a model's forward pass is
not guaranteed thread-safe, and CPU generation in parallel would only split the same cores.

Differences from the hosted API, on purpose: decoding is greedy unless ``temperature`` > 0 (fine-tuned task
models are usually wanted deterministic), and ``n`` must be 1.
"""

from __future__ import annotations

import queue
from pathlib import Path
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

DEFAULT_MAX_TOKENS = 256


class InferenceError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass
class Loaded:
    model: object
    tokenizer: object
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelPool:
    """Loaded models by API name, least recently used evicted beyond ``capacity``."""

    def __init__(self, capacity: int, loader: Callable[[str], tuple] | None = None):
        self.capacity = max(1, capacity)
        self._loader = loader or _load
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, name: str, ref: str) -> Loaded:
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
            name_lock = self._loading.setdefault(name, threading.Lock())
        with name_lock:  # one load per model even when requests for it arrive together
            with self._lock:
                if name in self._models:
                    return self._models[name]
            model, tok = self._loader(ref)
            entry = Loaded(model, tok)
            with self._lock:
                self._models[name] = entry
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)  # a generation still using it keeps its reference
            return entry

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def evict(self, name: str) -> None:
        """Forget a model and its checkpoints (a deleted fine-tuned model); generations under way keep theirs."""
        with self._lock:
            for key in [k for k in self._models if k == name or k.startswith(name + ":ckpt-step-")]:
                del self._models[key]


@dataclass(frozen=True)
class CheckpointRef:
    """A fine-tuned model at one of its checkpoints: the delivered model with the checkpoint's trained weights."""
    run_dir: str
    checkpoint: str


def _load(ref):
    from ..models import load_for_inference
    from .routes_images import ImageRef, load_image_model

    if isinstance(ref, ImageRef):  # a text-to-image pipeline: (pipeline, its run's denoise settings)
        return load_image_model(ref)
    if isinstance(ref, CheckpointRef):
        return load_checkpoint_model(ref)
    return load_for_inference(ref)


def load_checkpoint_model(ref: CheckpointRef):
    """The run's delivered model (same architecture, adapters and tokenizer), its trainable parameters replaced by the
    checkpoint's ``trainable.safetensors`` (the same names: both are the trained model's parameters). Every tensor
    must find its parameter with the same shape, or the model is refused rather than served half-loaded."""
    import torch
    from safetensors.torch import load_file

    from ..models import ModelError, load_for_inference

    model, tok = load_for_inference(ref.run_dir)
    tensors = load_file(str(Path(ref.checkpoint) / "trainable.safetensors"))
    params = dict(model.named_parameters())
    bad = [n for n, t in tensors.items() if n not in params or params[n].shape != t.shape]
    if bad:
        raise ModelError(f"checkpoint {Path(ref.checkpoint).name} does not fit the delivered model ({len(bad)} of "
                         f"{len(tensors)} tensors, e.g. {bad[0]})")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].dtype))
    return model, tok


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages to plain {role, content} text; content parts of type text are joined."""
    if not messages:
        raise InferenceError("messages must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise InferenceError(f"messages[{i}].role {m.get('role')!r} is not supported; use system, developer, "
                                 "user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise InferenceError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise InferenceError(f"messages[{i}].content must be a string or a list of text parts",
                                 f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


@dataclass
class Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


def stream_chat(entry: Loaded, messages: list[dict], *, max_tokens: int | None, temperature: float | None,
                top_p: float | None, seed: int | None, stop: list[str], outcome: Outcome) -> Iterator[str]:
    """An iterator of the reply's text deltas; ``outcome`` is filled in by the time it ends.

    Bad requests (a prompt longer than the context) raise here, before anything is streamed. Closing the
    iterator early (a client that went away) stops generation at the next token.
    """
    from ..evaluate.generate import eos_token_ids, render_prompt

    model, tok = entry.model, entry.tokenizer
    try:
        prompt = render_prompt(tok, messages)
    except Exception as e:  # a template that cannot render these roles, or no template
        raise InferenceError(f"the model's chat template cannot render these messages: {e}", "messages") from None
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = (limit - len(prompt)) if limit else None
    if room is not None and room < 1:
        raise InferenceError(f"the prompt is {len(prompt)} tokens; this model's context is {limit}", "messages",
                             "context_length_exceeded")
    new_tokens = min(max_tokens or DEFAULT_MAX_TOKENS, room) if room is not None else (max_tokens or DEFAULT_MAX_TOKENS)
    outcome.prompt_tokens = len(prompt)
    return _deltas(entry, prompt, new_tokens, eos_token_ids(model, tok), temperature, top_p, seed, stop, outcome)


def _deltas(entry: Loaded, prompt: list[int], new_tokens: int, eos: list[int], temperature, top_p, seed,
            stop: list[str], outcome: Outcome) -> Iterator[str]:
    tok = entry.tokenizer
    ids: queue.Queue = queue.Queue()
    cancel = threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(target=_generate, daemon=True,
                              args=(entry, prompt, new_tokens, temperature, top_p, seed, eos, ids, cancel, errors))
    thread.start()
    received: list[int] = []
    sent, stopped = "", False
    hold = max((len(s) for s in stop), default=1) - 1  # text held back while it may begin a stop string

    def decoded() -> str:
        return tok.decode([t for t in received if t not in eos], skip_special_tokens=True)

    try:
        while (item := ids.get()) is not None:
            received.append(item)
            if item in eos:
                continue
            text = decoded()
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                continue
            cut = _first_stop(text, stop)
            if cut is not None:
                if cut > len(sent):
                    yield text[len(sent):cut]
                stopped = True
                break
            if len(text) - hold > len(sent):
                yield text[len(sent):len(text) - hold]
                sent = text[:len(text) - hold]
        if not stopped:
            text = decoded()
            if len(text) > len(sent):
                yield text[len(sent):]
        outcome.finish_reason = "stop" if stopped or any(t in eos for t in received) else "length"
    finally:
        cancel.set()
        thread.join()
        outcome.completion_tokens = len(received)
    if errors:
        raise errors[0]


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.index(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _generate(entry: Loaded, prompt: list[int], max_new_tokens: int, temperature, top_p, seed, eos, out: queue.Queue,
              cancel: threading.Event, errors: list) -> None:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class _Ids(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate first passes the prompt
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                out.put(int(t))

        def end(self):
            pass

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    model, tok = entry.model, entry.tokenizer
    sample = bool(temperature) and temperature > 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos or None, use_cache=True,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0))
    if sample:
        options.update(temperature=float(temperature), top_p=float(top_p) if top_p is not None else 1.0, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    try:
        with entry.lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            device = next(model.parameters()).device
            input_ids = torch.tensor([prompt], dtype=torch.long, device=device)
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=_Ids(),
                           stopping_criteria=StoppingCriteriaList([_Cancelled()]), **options)
    except BaseException as e:  # surfaced to the caller after the stream ends
        errors.append(e)
    finally:
        out.put(None)


def completion_id() -> str:
    from .store import new_id

    return new_id("chatcmpl-", 29)


def created() -> int:
    return int(time.time())
