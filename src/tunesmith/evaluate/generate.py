"""Batched generation from chat conversations.

Prompts are rendered with the tokenizer's chat template, sorted by length so that each batch holds
prompts of similar length (less padding, less wasted compute), padded on the LEFT so every row's
last prompt token sits in the same column (generation appends to the right), generated with the KV
cache, and put back in input order. ``transformers.generate`` derives position ids from the
attention mask (cumsum - 1), so a left-padded row sees the same positions as the row alone: batched
greedy output equals one-at-a-time greedy output (up to float rounding, tested in fp32).

We pad by hand from token ids rather than through ``tokenizer.pad``: the caller's tokenizer is
never modified (no padding_side flip to restore), and a tokenizer without a pad token still works.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

Conversation = Sequence[dict]  # OpenAI-style messages: [{"role": ..., "content": ...}, ...]


def generate_batch(model, tokenizer, conversations: Sequence[Conversation], *, max_new_tokens: int = 64,
                   batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int | None = None, stop_strings: Sequence[str] | None = None) -> list[str]:
    """One reply per conversation, in input order (new tokens only, special tokens skipped, stripped)."""
    prompts = [render_prompt(tokenizer, conv) for conv in conversations]
    return generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_strings=stop_strings)


def generate_text(model, tokenizer, prompt: str, *, system: str | None = None, raw: bool = False,
                  max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int | None = None, stop_strings: Sequence[str] | None = None) -> str:
    """Reply to one user message (with an optional system message), or continue ``prompt`` as is when raw."""
    if raw:  # e.g. a base model without a chat template: the text is the whole prompt
        ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    else:
        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = [render_prompt(tokenizer, conv)]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=1,
                             do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                             stop_strings=stop_strings)[0]


def render_prompt(tokenizer, conversation: Conversation) -> list[int]:
    """Token ids of the conversation followed by the template's assistant header (the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, so conversations cannot be rendered: set "
                         "model.chat_template (e.g. 'chatml') or use generate_text(..., raw=True) for plain text")
    # transformers 5 returns a BatchEncoding for tokenize=True unless return_dict=False.
    return list(tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def generate_from_ids(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                      batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, seed: int | None = None,
                      stop_strings: Sequence[str] | None = None) -> list[str]:
    """The core of generate_batch, on already tokenized prompts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt rendered to zero tokens; check the conversation and the chat template")
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    options = generate_options(max_new_tokens, do_sample, temperature, top_p, top_k, eos, pad_id, stop_strings)
    if stop_strings:
        options["tokenizer"] = tokenizer  # StopStringCriteria needs it to map strings onto tokens
    return [decode_reply(tokenizer, ids, eos, stop_strings)
            for ids in _new_ids(model, prompts, batch_size, pad_id, options, seed)]


def generate_ids(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 8,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, row_seeds: Sequence[int] | None = None) -> list[tuple[list[int], bool]]:
    """Per prompt: the reply's token ids through its first eos (kept: a model trained on them learns to stop), and
    whether it ended there (False: cut at ``max_new_tokens``). For training on sampled answers (objectives/grpo.py).

    ``row_seeds`` (one per prompt, with ``do_sample``): each reply is sampled with a random stream of its own
    (``RowSeededSampling``), so it depends on its prompt and seed alone, not on the batch it was generated in, the
    batch size, or which process generated it."""
    from transformers.generation.logits_process import LogitsProcessorList

    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    if row_seeds is not None:
        if not do_sample:
            raise ValueError("row_seeds need do_sample=True: greedy decoding draws nothing")
        if len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {len(prompts)} prompts")
        options = generate_options(max_new_tokens, False, temperature, top_p, top_k, eos, pad_id, None)
        warpers = sampling_warpers(temperature, top_p, top_k)
        outputs: list = [None] * len(prompts)
        with _eval_mode(model), torch.inference_mode():
            for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
                sampler = RowSeededSampling([row_seeds[i] for i in batch], _device(model))
                rows = _generate_one_batch(model, [prompts[i] for i in batch], pad_id,
                                           dict(options, logits_processor=LogitsProcessorList([*warpers, sampler])))
                for i, ids in zip(batch, rows):
                    outputs[i] = ids
        generated = outputs
    else:
        options = generate_options(max_new_tokens, do_sample, temperature, top_p, top_k, eos, pad_id, None)
        generated = _new_ids(model, prompts, batch_size, pad_id, options, seed)
    out = []
    for ids in generated:
        end = next((pos for pos, tok in enumerate(ids) if tok in eos), None)
        out.append((ids[:end + 1], True) if end is not None else (ids, False))
    return out


class RowSeededSampling:
    """Sampling with one random stream per row, for replies that do not depend on their batch.

    ``transformers`` samples a batch with one ``torch.multinomial`` call on the global generator, so a row's tokens
    depend on the rows beside it. Here decoding is greedy over scores that leave one token possible per row: the token
    where the row's cumulative distribution (softmax of the warped scores, float64) first exceeds u * total, u uniform
    in [0, 1) from the row's own generator (inverse-CDF sampling: an exact sample of softmax(scores)). Each generated
    position takes one number from the row's stream, so the k-th token of a reply uses the same draw in any batch.
    Tokens the warpers removed (probability 0) are never chosen. (A logits processor in ``transformers``' sense: called
    with (input_ids, scores); not a subclass, so that importing this module does not import ``transformers``.)"""

    def __init__(self, seeds: Sequence[int], device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores (B, V)
        cdf = torch.softmax(scores.double(), dim=-1).cumsum_(dim=-1)  # (B, V)
        u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=scores.device)
                       for g in self.generators])  # (B,)
        # side right: the first token whose cumulative probability exceeds the draw, never one of probability 0
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=scores.size(1) - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, pick, 0.0)


def sampling_warpers(temperature: float, top_p: float, top_k: int) -> list:
    """The logits warpers ``transformers.generate`` applies when sampling, in its order (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p))
    return out


def _new_ids(model, prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, options: dict,
             seed: int | None) -> list[list[int]]:
    """The generated ids of every prompt (padding after an early eos included), in input order."""
    outputs: list[list[int] | None] = [None] * len(prompts)
    with _eval_mode(model), _seeded(seed), torch.inference_mode():
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            for i, ids in zip(batch, _generate_one_batch(model, [prompts[i] for i in batch], pad_id, options)):
                outputs[i] = ids
    return outputs  # type: ignore[return-value]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and the generation config's (which may be a list)."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, both (B, T_max), with the padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _generate_one_batch(model, prompts: Sequence[Sequence[int]], pad_id: int, options: dict) -> list[list[int]]:
    input_ids, attention_mask = left_pad(prompts, pad_id, _device(model))  # (B, T)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)  # (B, T + new)
    return out[:, input_ids.shape[1]:].tolist()


def generate_options(max_new_tokens, do_sample, temperature, top_p, top_k, eos, pad_id, stop_strings) -> dict:
    """Keyword arguments for ``model.generate`` (greedy unless ``do_sample``), shared with `tunesmith chat`."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                   eos_token_id=eos or None, pad_token_id=pad_id)
    if do_sample:  # passing sampling knobs with do_sample=False only makes transformers warn
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        # Explicit neutral values override a model generation_config that ships sampling settings.
        options.update(temperature=None, top_p=None, top_k=None)
    if stop_strings:
        options["stop_strings"] = list(stop_strings)
    return options


def decode_reply(tokenizer, new_ids: list[int], eos: list[int], stop_strings: Sequence[str] | None) -> str:
    """The reply text of generated ids: cut before the first eos (and stop string), special tokens skipped."""
    # Cut at the first eos ourselves: rows that finished early are padded afterwards, and the pad
    # (or an eos used as pad) is not always flagged special, so skip_special_tokens alone can miss it.
    for pos, tok in enumerate(new_ids):
        if tok in eos:
            new_ids = new_ids[:pos]
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    for s in stop_strings or ():
        if s and s in text:
            text = text[:text.index(s)]
    return text.strip()


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Dropout off while evaluating; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed sampling without disturbing the caller's RNG stream (e.g. a training loop's)."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
