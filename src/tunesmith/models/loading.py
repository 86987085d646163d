"""Load a tokenizer and a causal LM from a local HF folder, and check what was loaded.

Checks after loading (STYLE.md practice 3): missing and unexpected weight keys, parameter dtypes,
tokenizer vocabulary against embedding rows, and no non-finite tensor.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError, ModelWarning

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dropout probabilities a config may carry, by the names architectures use. The override sets the
# ones the model's config has: Llama/SmolLM2, Mistral, Qwen2, Gemma have only `attention_dropout`
# (no hidden dropout exists in those blocks); GPT-2 style: attn_pdrop, resid_pdrop, embd_pdrop;
# GPT-NeoX, Falcon: attention_dropout, hidden_dropout; OPT: dropout, attention_dropout; Phi: also
# resid_pdrop, embd_pdrop. Classifier heads' dropout is left alone.
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_dropout", "embed_dropout")

# Pad candidates, best first: a dedicated pad token, then end-of-text (never the end-of-turn eos).
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware: bf16 with AVX512-BF16 or AMX (Intel Sapphire
    Rapids and newer, AMD Zen 4 and newer), fp16 with AMX-FP16. Elsewhere such matmuls are emulated, hundreds of
    times slower than fp32 (measured on an AVX2 CPU: ~500x)."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    if dtype == torch.float16:
        return bool(cpu._is_amx_fp16_supported())
    return dtype == torch.float32


PRECISIONS = ("auto", "float32", "bf16-mixed", "bfloat16", "float16")

# auto picks bf16-mixed on a CPU only where its bf16 matrix products run at least this many times as fast as fp32 ones
# (``cpu_bf16_speedup``). Measured on a 2-core Intel Xeon with AMX (2026-12): the built-in model's products at 6.3x fp32,
# the LoRA step forward + backward 1.93x (744 vs 386 trained tokens/s), full fine-tuning 1.63x, validation loss of the
# 24-step LoRA job +0.01% (1.7760 vs 1.7758); the same CPU restricted to AVX512-BF16 (ONEDNN_MAX_CPU_ISA=
# AVX512_CORE_BF16) multiplied bf16 at 0.58x fp32, so there auto stays fp32. 1.5 keeps auto on fp32 wherever the
# products alone would not pay for the casts around them.
BF16_SPEEDUP_FOR_AUTO = 1.5
# ... and only for models at least this wide: narrower products are overhead-bound (bf16 0.4-1.1x fp32 at hidden 32-64
# on an AMX CPU), and their timings are too short to measure reliably on a busy machine, so auto is fp32 for them
# without measuring (the tests' tiny models among them: their numbers do not depend on the machine).
MIN_HIDDEN_FOR_BF16 = 256


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``name`` (float32, bf16-mixed, bfloat16, float16), the dtype the model is loaded in, the
    dtype trained parameters are kept in (None: as loaded), the autocast dtype of the forward (None: no autocast), and
    why it was chosen (for the run log)."""
    name: str
    load_dtype: torch.dtype
    trained_dtype: torch.dtype | None
    autocast: torch.dtype | None
    reason: str


def select_precision(requested: str, device, method: str = "lora", shape: tuple[int, int] = (1024, 4096)) -> Precision:
    """The training precision for ``model.dtype`` = ``requested`` on ``device``.

    - float32: everything fp32.
    - bf16-mixed: mixed precision as GPU trainers run it: matrix products in bf16 (autocast), the loss and softmax in
      fp32, trained weights (LoRA adapters, or the master weights of full/freeze fine-tuning) and the optimizer state in
      fp32; the frozen base weights of a LoRA run are stored in bf16 (a frozen layer of freeze fine-tuning stays fp32,
      since it is delivered as part of the model).
    - bfloat16 / float16: every weight in that dtype (LoRA adapters stay fp32, as PEFT keeps them); float16 on a GPU
      with a loss scaler.
    - auto: on a GPU bf16-mixed where it has bf16, else float16; on a CPU bf16-mixed where its bf16 matrix units are
      measured faster than fp32 at the model's ``shape`` (hidden, intermediate size): ``cpu_bf16_speedup`` >=
      BF16_SPEEDUP_FOR_AUTO (AMX) and hidden >= MIN_HIDDEN_FOR_BF16, else float32.
    """
    if requested not in PRECISIONS:
        raise ModelError(f"model.dtype: got {requested!r}; allowed: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    reason = "set by model.dtype"
    if requested == "auto":
        if cuda:
            requested = "bf16-mixed" if torch.cuda.is_bf16_supported() else "float16"
            reason = "auto: " + ("this GPU has bf16" if requested == "bf16-mixed" else "this GPU has no bf16")
        elif shape[0] < MIN_HIDDEN_FOR_BF16:
            requested, reason = "float32", f"auto: a model of hidden size {shape[0]} is too small for bf16 to pay"
        else:
            speedup = cpu_bf16_speedup(shape)
            requested = "bf16-mixed" if speedup >= BF16_SPEEDUP_FOR_AUTO else "float32"
            reason = (f"auto: this CPU multiplies bf16 matrices of this model's shape {speedup:.1f}x as fast as fp32 "
                      f"(bf16-mixed from {BF16_SPEEDUP_FOR_AUTO}x)" if speedup else
                      "auto: this CPU has no bf16 matrix units")
    elif device.type == "cpu" and requested != "float32":
        half = torch.bfloat16 if requested in ("bf16-mixed", "bfloat16") else torch.float16
        if not cpu_has_fast(half):
            warnings.warn(f"model.dtype={requested} on {device}: this CPU has no {half} matrix hardware (AVX512-BF16 "
                          "or AMX), so it runs far slower than float32 (use model.dtype: auto)", ModelWarning, stacklevel=2)
    if cuda and requested in ("bf16-mixed", "bfloat16") and not torch.cuda.is_bf16_supported():
        raise ModelError(f"model.dtype={requested} but this GPU does not support bf16: use float16 or auto")
    if requested == "bf16-mixed":
        frozen_base = method == "lora"
        return Precision("bf16-mixed", torch.bfloat16 if frozen_base else torch.float32, torch.float32, torch.bfloat16,
                         reason)
    dtype = _DTYPES[requested]
    autocast = dtype if cuda and dtype != torch.float32 else None  # GPUs: autocast as before; CPUs: the weights' dtype
    return Precision(requested, dtype, None, autocast, reason)


_speedups: dict[tuple[int, int], float] = {}


def cpu_bf16_speedup(shape: tuple[int, int] = (1024, 4096)) -> float:
    """How many times as fast this CPU multiplies bf16 matrices as fp32 ones at a model's shape: (512 tokens, hidden) @
    (hidden, intermediate), best of 7, this process's threads. 0.0 where it has no bf16 matrix instructions (there they
    are emulated, hundreds of times slower: not measured). Measured once per process and shape (~10-50 ms).

    At a small model's shapes the products are too small for bf16 to pay (on an AMX CPU: 0.4-0.9x at hidden 32,
    ~1.1x at 64, 2.5x at 128, 7x at the built-in model's 576 x 1536), so such a model trains in fp32."""
    if shape not in _speedups:
        _speedups[shape] = 0.0
        if cpu_has_fast(torch.bfloat16):
            import time

            g = torch.Generator().manual_seed(0)  # never the global RNG: the run's seeded draws come after this

            def best(dtype) -> float:
                a = torch.randn(512, shape[0], generator=g).to(dtype)
                b = torch.randn(shape[0], shape[1], generator=g).to(dtype)
                a @ b
                times = []
                for _ in range(7):
                    t = time.perf_counter()
                    a @ b
                    times.append(time.perf_counter() - t)
                return min(times)

            _speedups[shape] = best(torch.float32) / best(torch.bfloat16)
    return _speedups[shape]


def matmul_shape(path, trust_remote_code: bool = False) -> tuple[int, int]:
    """(hidden size, MLP intermediate size) of the model in ``path``, from its config: the shape at which auto precision
    measures bf16 against fp32. (1024, 4096) when the config does not say."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return (1024, 4096)
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return int(hidden), int(inter)


def select_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype a model is loaded in for inference with ``model.dtype`` = ``requested``: auto -> bf16 on a CUDA GPU
    that has it (else fp16), fp32 on a CPU; bf16-mixed -> bf16 (its frozen weights' dtype)."""
    if requested not in PRECISIONS:
        raise ModelError(f"model.dtype: got {requested!r}; allowed: {', '.join(PRECISIONS)}")
    cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested == "bf16-mixed":
        requested = "bfloat16"
    dtype = _DTYPES[requested]
    if torch.device(device).type == "cpu" and not cpu_has_fast(dtype):
        warnings.warn(f"model.dtype={requested} on {device}: this CPU has no {requested} matrix hardware (AVX512-BF16 "
                      f"or AMX), so it runs far slower than float32 (use model.dtype: auto)", ModelWarning, stacklevel=2)
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelError("model.dtype=bfloat16 but this GPU does not support bf16: use float16 or auto")
    return dtype


def keep_trained_in(model, dtype: torch.dtype) -> int:
    """Cast every parameter that trains to ``dtype`` (the fp32 master weights of mixed precision); returns how many."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """The folder's tokenizer with a pad token, and ``chat_template`` (a built-in name, file or Jinja) if given."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer from {path}: {e}. "
                         "The folder needs tokenizer.json or the tokenizer files of its model type"
                         + ("" if trust_remote_code else
                            "; if it uses custom code, set model.trust_remote_code: true")) from None
    if chat_template is not None:
        from ..data import resolve_chat_template  # the data package owns named templates (chatml, ...)

        tok.chat_template = resolve_chat_template(chat_template)
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tok) -> None:
    """Give the tokenizer a pad token other than eos when the vocabulary has one.

    Our labels come from rendering, not from pad ids, so pad == eos would not hide eos from the loss;
    but a distinct pad keeps attention masks and anything that looks at pad ids unambiguous.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in _PAD_CANDIDATES:
        if cand in vocab and cand != tok.eos_token:
            tok.pad_token = cand
            return
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token: give a tokenizer with special tokens")
        warnings.warn(f"the tokenizer has no pad token and no spare special token: padding with eos "
                      f"{tok.eos_token!r} (labels come from the chat rendering, so the model still learns to stop)",
                      ModelWarning, stacklevel=3)
        tok.pad_token = tok.eos_token


# ---------------------------------------------------------------- model


def load_model(path: str | Path, *, dtype: torch.dtype, trust_remote_code: bool = False,
               dropout: float | None = None, tokenizer=None):
    """Load a causal LM in ``dtype`` and check it; ``dropout`` overrides the config's dropout fields.

    ``tokenizer`` is only used for the vocabulary check; without it the folder's own is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not read the model config in {path}: {e}"
                         + ("" if trust_remote_code else
                            " (if the model uses custom code, set model.trust_remote_code: true)")) from None
    if dropout is not None:
        set_dropout(config, dropout)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a pickle that is more than tensors
        raise ModelError(f"{path}: a PyTorch .bin weights file holds Python objects besides tensors; it was not loaded, "
                         "because unpickling them could run code. Use the model's safetensors weights, from a source "
                         "you trust") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the model weights from {path}: {type(e).__name__}: {e}") from None
    check_loaded(model, info, dtype, path)
    check_vocab(model, tokenizer if tokenizer is not None else _folder_tokenizer(path, trust_remote_code), path)
    return model


def set_dropout(config, p: float) -> list[str]:
    """Set every dropout probability field the config has (see DROPOUT_FIELDS); returns their names."""
    present = config.to_dict()
    names = [f for f in DROPOUT_FIELDS if isinstance(present.get(f), (int, float)) and not isinstance(present[f], bool)]
    if not names:
        raise ModelError(f"model.dropout: the {config.model_type} config has no dropout setting "
                         f"(looked for {', '.join(DROPOUT_FIELDS)}); remove model.dropout")
    for name in names:
        setattr(config, name, p)
    return names


def check_loaded(model, info: dict, dtype: torch.dtype, path) -> None:
    """Missing weights are an error (they would be random); unexpected ones, odd dtypes are warnings."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{path}: {len(missing)} weights of the {model.config.model_type} model are missing from "
                         f"the checkpoint (e.g. {', '.join(missing[:3])}) and would be random: the folder is incomplete "
                         "or its weights belong to another architecture")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} weights in the checkpoint are not used by the model "
                      f"(e.g. {', '.join(unexpected[:3])})", ModelWarning, stacklevel=3)
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    odd = sorted({f"{n}: {p.dtype}" for n, p in model.named_parameters()
                  if p.is_floating_point() and p.dtype != dtype and not any(k in n for k in keep_fp32)})
    if odd:
        warnings.warn(f"{path}: {len(odd)} parameters are not {dtype} (e.g. {odd[0]})", ModelWarning, stacklevel=3)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not all_finite(t):
            raise ModelError(f"{path}: tensor {name} holds NaN or inf values: the checkpoint is damaged "
                             f"(or overflowed in {dtype}; try model.dtype: float32)")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. A float32 sum is the fast test (isfinite().all() is ~20x slower on CPU);
    a non-finite sum is confirmed element-wise, since a sum of large finite values can overflow."""
    return bool(torch.isfinite(t.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(t.detach()).all())


def check_vocab(model, tokenizer, path) -> None:
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: "
                         "tokens past the end would crash training; use the tokenizer that belongs to this model")


def _folder_tokenizer(path, trust_remote_code: bool):
    try:
        return load_tokenizer(path, trust_remote_code=trust_remote_code)
    except ModelError:
        return None  # a folder without a tokenizer: nothing to check against
