"""Checkpoints that are complete or absent, and resume from them.

A checkpoint folder ``checkpoints/step-000120/`` holds::

    trainable.safetensors   every parameter with requires_grad (the whole model for full fine-tuning,
                            the adapter for LoRA, the unfrozen blocks for freeze)
    optimizer.pt            AdamW state (tensors only; loaded with weights_only=True)
    scheduler.pt            LR scheduler state
    state.json              step, epoch, data position, best-so-far, RNG states, config and data hashes
    manifest.json           size and sha256 of each file above (written last)

It is written under ``.tmp-step-000120``, every file fsynced, then renamed: a crash leaves either the
old set of checkpoints or the new one, never a half-written folder with a final name. Old checkpoints
are deleted only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_PREFIX = "step-"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch index
    step_in_epoch: int = 0  # optimizer steps of this epoch already consumed (data position)
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    tokens_seen: int = 0
    config_hash: str = ""
    data_hash: str = ""
    rng: dict = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict) -> None:
    if not rng:
        return
    random.setstate(_lists_to_tuples(rng["python"]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])


def _tuples_to_lists(x):
    return [_tuples_to_lists(i) for i in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(i) for i in x) if isinstance(x, list) else x


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # copy=True: on CPU .to("cpu") would alias the live parameters, and the "best" snapshot would keep training.
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: TrainState, keep_last: int) -> Path:
    """Write a complete checkpoint atomically; then prune to the newest ``keep_last``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"{CKPT_PREFIX}{state.step:06d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state.rng = capture_rng()
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    files = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json"]
    manifest = {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for f in files + ["manifest.json"]:
        _fsync(tmp / f)
    if final.exists():  # re-saving the same step (e.g. after resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    mpath = path / "manifest.json"
    if not mpath.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest unreadable"
    for fname, meta in manifest.items():
        f = path / fname
        if not f.is_file():
            return f"{fname} missing"
        if f.stat().st_size != meta["size"]:
            return f"{fname} has {f.stat().st_size} bytes, manifest says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{fname} hash mismatch"
    return None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)),
                  key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(ckpt_root: Path, warn=lambda msg: None) -> Path | None:
    """Newest complete checkpoint; damaged ones are reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping damaged checkpoint {path}: {problem}")
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG; return the saved TrainState."""
    tensors = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
    # weights_only=True: never unpickle arbitrary objects from a file on disk.
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    restore_rng(state.rng)
    return state
