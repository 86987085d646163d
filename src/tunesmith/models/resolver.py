"""Turn a model reference into a local Hugging Face folder.

A reference is one of: a built-in alias, a local HF folder, a GGUF file, a run folder, or a hub id.
GGUF files (the built-in default is one) are converted once into a safetensors folder in the cache,
because every later step (PEFT, save_pretrained, export) wants an ordinary HF model.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from .errors import ModelError
from .registry import ALIASES, Alias, gguf_cache_path, package_file

log = logging.getLogger("tunesmith.models")

# org/name or name, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
# What a training run needs from a hub repo: config, weights, tokenizer, chat template, remote code.
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def ensure_local(ref: str, revision: str | None = None) -> Path:
    """A local HF model folder for ``ref`` (alias, folder, GGUF file, run folder or hub id).

    Raises ModelError with what to do when the reference cannot be found, converted or downloaded.
    """
    ref = str(ref).strip()
    if not ref:
        raise ModelError("model.name is empty: give a built-in alias (see `tunesmith models`), a folder, "
                         "a .gguf file or a hub id")
    if ref in ALIASES:
        return _alias_local(ALIASES[ref], revision)
    path = Path(ref).expanduser()
    if path.exists():
        return _local(path)
    if _looks_like_path(ref) or not _HUB_ID.match(ref):
        raise ModelError(f"model {ref!r} not found: no such file or folder ({path.resolve()}). "
                         "Check the path, or give a built-in alias (see `tunesmith models`) or a hub id like org/name.")
    return _hub_local(ref, revision)


resolve = ensure_local


def _looks_like_path(ref: str) -> bool:
    return (ref.startswith(("/", "./", "../", "~", "\\")) or ref.lower().endswith((".gguf", ".safetensors", ".bin"))
            or ref.count("/") > 1 or "\\" in ref or ref in (".", ".."))


def _alias_local(alias: Alias, revision: str | None) -> Path:
    if alias.builtin:
        return _builtin_local(alias)
    if alias.hub_id:
        return _hub_local(alias.hub_id, revision)
    gguf = package_file(alias)
    if gguf is None:
        pip_name = alias.package.replace("_", "-")
        raise ModelError(f"built-in model {alias.name!r} lives in the pip package {pip_name}, which is not installed "
                         f"(or lacks {alias.filename}): run `pip install {pip_name}`, or set model.name to another model")
    return gguf_local(gguf)


def _builtin_local(alias: Alias) -> Path:
    from .registry import builtin_folder

    folder = builtin_folder()
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"built-in model {alias.name!r}: its pipeline folder {folder} is not in this copy of tunesmith "
                         "(no model_index.json). Reproduce it with `python -m tunesmith.images.pretrain --out "
                         "runs/image-base --seed 0` and copy runs/image-base/pipeline there, install a tunesmith "
                         "release that ships it, or give the path of another diffusers pipeline folder")
    return folder


def _local(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_local(path)
        raise ModelError(f"model {str(path)!r} is a file but not a .gguf model: give a Hugging Face model folder "
                         "(with config.json), a .gguf file, a built-in alias or a hub id")
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():  # transformers model / diffusers pipeline
        return path
    if (path / "config.resolved.yaml").is_file():  # a run folder: its delivered model
        return _local(run_output(path))
    if (path / "adapter_config.json").is_file():
        raise ModelError(f"{path} is a LoRA adapter, not a whole model: train from its base model, or load it for "
                         "inference with `tunesmith generate --model` (the adapter is put on its base)")
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" It holds GGUF files: give one of them, e.g. {ggufs[0]}." if ggufs else ""
    raise ModelError(f"{path} is a folder but not a Hugging Face model folder (no config.json).{hint}")


def run_output(run: Path) -> Path:
    """The delivered model of a run folder: best/ if it was kept, else final/."""
    for name in ("best", "final"):
        if (run / name).is_dir():
            return run / name
    raise ModelError(f"{run} is a run folder without a delivered model (no best/ or final/): "
                     "the run has not finished; resume it with `tunesmith train --resume`")


# ---------------------------------------------------------------- hub


def hub_cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub repo if its config and weights are in the HF cache, else None."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cfg = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except HFValidationError:
        return None
    if not isinstance(cfg, str):
        return None
    snap = Path(cfg).parent
    return snap if _has_weights(snap) else None


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(g)) for g in _WEIGHT_GLOBS)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return constants.HF_HUB_OFFLINE or env in ("1", "on", "yes", "true")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint, so no connection fails in seconds, not after a chain of retries."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy may reach what a direct connection cannot; let the download try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub_local(repo_id: str, revision: str | None) -> Path:
    snap = hub_cached_snapshot(repo_id, revision)
    if snap is not None:
        return snap
    rev = f" (revision {revision})" if revision else ""
    why = None
    if hub_offline():
        why = "downloads are switched off (HF_HUB_OFFLINE=1): unset it on a machine with a connection to download once"
    elif not _hub_reachable():
        from huggingface_hub import constants
        why = f"{constants.ENDPOINT} cannot be reached (no network connection): connect and run again to download once"
    if why:
        raise ModelError(f"model {repo_id!r}{rev} is not a built-in alias or a local path, and as a hub id it is not "
                         f"in the local Hugging Face cache; {why}. Or give a local model folder or .gguf file"
                         f"{_alias_hint(repo_id)}")
    return _download(repo_id, revision)


def _alias_hint(ref: str) -> str:
    close = difflib.get_close_matches(ref, list(ALIASES), n=1, cutoff=0.6)
    if close:
        return f" (did you mean the built-in alias {close[0]!r}?)"
    return f"; built-in aliases: {', '.join(ALIASES)}"


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES,
                                      ignore_patterns=["consolidated*", "original/*"]))
        if not _has_weights(path):  # an older repo with PyTorch .bin weights only
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES + ["*.bin"]))
    except GatedRepoError:
        raise ModelError(f"hub model {repo_id!r} is gated: accept its licence on https://huggingface.co/{repo_id} "
                         "and log in with `hf auth login`, then run again") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no hub model {repo_id!r} (or it is private: log in with `hf auth login`); "
                         f"check the id, or see `tunesmith models` for built-in aliases") from None
    except RevisionNotFoundError:
        raise ModelError(f"hub model {repo_id!r} has no revision {revision!r} (model.revision): "
                         "give a branch, tag or commit that exists") from None
    except OSError as e:
        raise ModelError(f"downloading {repo_id!r} failed: {e}. Check the connection and run again") from None
    if not (path / "config.json").is_file() or not _has_weights(path):
        raise ModelError(f"hub repo {repo_id!r} has no transformers model (config.json + weights); "
                         "if it only holds GGUF files, download one and give its path")
    return path


# ---------------------------------------------------------------- GGUF -> cached safetensors folder


def gguf_local(gguf: Path) -> Path:
    """The cached HF folder converted from ``gguf``; converts once (written to a temp dir, then renamed)."""
    dest = gguf_cache_path(gguf.resolve())
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    log.info("converting %s to a safetensors folder in %s (once; about 30 s for 135M parameters)", gguf, dest)
    t0 = time.time()
    try:
        convert_gguf(gguf, tmp)
        _write_json(tmp / "tunesmith-source.json", {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size,
                                                    "mtime_ns": gguf.stat().st_mtime_ns,
                                                    "converted_in_s": round(time.time() - t0, 1)})
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_temps(dest: Path) -> None:
    """Delete temp folders left by conversions that were killed (their process is gone)."""
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers' loader and save model, tokenizer and generation config.

    transformers refuses ``save_pretrained`` on a model whose config still carries the GGUF
    ``quantization_config``, so the weights are moved into a model built from a clean config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import ensure_pad_token

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the GGUF loader raises many kinds (unsupported arch, bad file, missing tokenizer)
        raise ModelError(f"could not read GGUF {gguf}: {type(e).__name__}: {e}. transformers can convert GGUF files of "
                         "common architectures (llama, mistral, qwen2, gemma, phi3, ...) that embed a tokenizer; "
                         "otherwise give the original Hugging Face folder") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the GGUF lands in the clean model; tied lm_head is re-tied after.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    ensure_pad_token(tok)
    _stop_tokens(model, tok)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _stop_tokens(model, tok) -> None:
    """Make generation stop at the end of a turn: eos, plus <|im_end|> when the chat template uses it."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if im_end is not None and "<|im_end|>" in (tok.chat_template or "") and im_end not in eos:
        eos.append(im_end)
    model.config.pad_token_id = tok.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tok.pad_token_id
    gen.bos_token_id = model.config.bos_token_id


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
