"""Checkpoints that are complete or absent, and resume from them.

A checkpoint folder ``checkpoints/step-000120/`` holds::

    trainable.safetensors   every parameter with requires_grad (the whole model for full fine-tuning,
                            the adapter for LoRA, the unfrozen blocks for freeze)
    optimizer.safetensors   optimizer state tensors (AdamW moments, step counts), keyed "<param>.<name>"
    optimizer.json          the rest of the optimizer state: param groups (lr, betas, ...), non-tensor values
    scheduler.json          LR scheduler state
    state.json              step, epoch, data position, best-so-far, RNG states, config and data hashes
    manifest.json           size and sha256 of each file above (written last)

Nothing is pickled: tensors go to safetensors and everything else to JSON, so loading a checkpoint
(which may come from anywhere) can never run code. It is written under ``.tmp-step-000120``, every
file fsynced, then renamed: a crash, a kill or a full disk leaves either the old set of checkpoints or
the new one, never a half-written folder with a final name. Old checkpoints are deleted only after
the new one is complete, and no tensor that holds NaN or inf is ever saved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CKPT_PREFIX = "step-"
_CKPT_NAME = re.compile(r"^step-(\d+)$")
FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "state.json")


class CheckpointError(Exception):
    """A checkpoint or saved weights could not be written or read; the message says what to do.

    Raised for a full disk (the previous checkpoint is intact), a refusal to save NaN/inf tensors, and
    a checkpoint whose files pass the manifest but cannot be restored. The CLI exits 1, no traceback.
    """


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch index
    step_in_epoch: int = 0  # optimizer steps of this epoch already consumed (data position)
    best_val_loss: float | None = None  # the held-out loss at best_step
    best_step: int | None = None
    best_score: float | None = None  # eval.best_metric at best_step (None in runs saved before it existed: the loss)
    evals_since_best: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient, over the whole run
    config_hash: str = ""
    data_hash: str = ""
    rng: dict = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- RNG states (as JSON lists)


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


# ---------------------------------------------------------------- tensors


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # copy=True: on CPU .to("cpu") would alias the live parameters, and the "best" snapshot would keep training.
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to save ``what`` when any floating tensor holds NaN or inf (a file must never carry them)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"refusing to save {what}: tensor {name} holds NaN or inf values, so the weights "
                                  "diverged; the previous checkpoint is kept. Lower train.lr or train in float32, "
                                  "then resume with --resume")


def _all_finite(t: torch.Tensor) -> bool:
    # a float32 sum is the fast test; a non-finite sum is confirmed element-wise (large values can overflow it)
    return bool(torch.isfinite(t.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(t.detach()).all())


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, JSON-able rest).

    A parameter's entries may nest: bitsandbytes' 8-bit optimizers keep their quantised moments, maps and block
    scales in one dict under ``__bnb_optimizer_quant_state__``. A nested tensor is saved as ``pid.name/sub``.
    """
    tensors, scalars = {}, {}

    def walk(pid: str, prefix: str, entries: dict, into: dict) -> None:
        for name, v in entries.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{prefix}{name}"] = v.detach().to("cpu").contiguous()
            elif isinstance(v, dict):
                walk(pid, f"{prefix}{name}/", v, into.setdefault(name, {}))
            else:
                into[name] = v

    for pid, entries in sd["state"].items():
        walk(str(pid), "", entries, scalars.setdefault(str(pid), {}))
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, live_groups: list[dict]) -> dict:
    """The inverse of split_optimizer_state; tuples (AdamW betas) come back as the live optimizer has them."""
    state: dict[int, dict] = {}
    for pid, entries in meta["scalars"].items():
        state[int(pid)] = entries
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        *path, leaf = name.split("/")
        entries = state.setdefault(int(pid), {})
        for part in path:
            entries = entries.setdefault(part, {})
        entries[leaf] = t
    groups = meta["param_groups"]
    if len(groups) != len(live_groups):
        raise ValueError(f"{len(groups)} parameter groups saved, the optimizer has {len(live_groups)}")
    groups = [{k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in g.items()}
              for g, live in zip(groups, live_groups)]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- saving


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_text(obj, what: str) -> str:
    try:
        return json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save the {what} state as JSON: {e}") from None


def save_checkpoint(ckpt_root: Path, model, optimizer, scheduler, state: TrainState, keep_last: int,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a complete checkpoint atomically; then prune to the newest ``keep_last``. ``extra``: more tensors to keep,
    by file name (the EMA's shadows: ema.safetensors), in the manifest like the rest.

    Raises CheckpointError, with every earlier checkpoint intact, when a tensor is non-finite or the
    disk is full (or any other write fails); the half-written temporary folder is removed.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"{CKPT_PREFIX}{state.step:06d}"
    final, tmp = ckpt_root / name, ckpt_root / f".tmp-{name}"
    state.rng = capture_rng()
    weights = trainable_state(model)
    opt_tensors, opt_meta = split_optimizer_state(optimizer.state_dict())
    what = f"checkpoint {name}"
    check_finite(weights, what)
    check_finite(opt_tensors, f"{what} (optimizer state)")
    texts = {"optimizer.json": _json_text(opt_meta, "optimizer"),
             "scheduler.json": _json_text(scheduler.state_dict(), "scheduler"),
             "state.json": _json_text(asdict(state), "training")}
    for fname, tensors in (extra or {}).items():
        check_finite(tensors, f"{what} ({fname})")
    try:
        _write_folder(tmp, weights, opt_tensors, texts, extra or {})
        if final.exists():  # re-saving the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give back the space the partial write took
        raise CheckpointError(write_failure(e, f"{what} in {ckpt_root}", ckpt_root)) from None
    _fsync(ckpt_root)
    prune_checkpoints(ckpt_root, keep_last)
    return final


def _write_folder(tmp: Path, weights: dict, opt_tensors: dict, texts: dict[str, str], extra: dict) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, tmp / "trainable.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    for fname, tensors in extra.items():
        save_file(tensors, tmp / fname)
    for fname, text in texts.items():
        (tmp / fname).write_text(text, encoding="utf-8")
    files = FILES + tuple(extra)
    manifest = {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for f in files + ("manifest.json",):
        _fsync(tmp / f)


def write_failure(e: OSError, what: str, ckpt_root: Path) -> str:
    """The message for a failed write: why (a full disk, most often), and which checkpoint is left to resume from."""
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"{type(e).__name__}"
    prev = list_checkpoints(ckpt_root)
    kept = (f"the previous checkpoint {prev[-1]} is intact: free some space, then continue with --resume"
            if prev else "there is no earlier checkpoint: free some space and start the run again")
    return f"could not write {what}: {reason} ({e.strerror or e}); {kept}"


# ---------------------------------------------------------------- finding and pruning


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    mpath = path / "manifest.json"
    if not mpath.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        entries = [(fname, int(meta["size"]), str(meta["sha256"])) for fname, meta in manifest.items()]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return "manifest unreadable"
    for fname, size, digest in entries:
        f = path / fname
        if not f.is_file():
            return f"{fname} missing"
        if f.stat().st_size != size:
            return f"{fname} has {f.stat().st_size} bytes, manifest says {size}"
        if sha256_file(f) != digest:
            return f"{fname} hash mismatch"
    return None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _CKPT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    return int(_CKPT_NAME.match(path.name).group(1))


def latest_checkpoint(ckpt_root: Path, warn=lambda msg: None) -> Path | None:
    """Newest complete checkpoint; damaged ones are reported through ``warn`` and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"skipping damaged checkpoint {path}: {problem}")
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and leftovers of interrupted writes/deletes.

    A checkpoint is renamed to ``.del-*`` before its files go, so a kill during the deletion leaves a
    hidden folder that the next prune removes, never a half-deleted ``step-*``.
    """
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        trash = ckpt_root / f".del-{p.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for p in list(ckpt_root.glob(".tmp-*")) + list(ckpt_root.glob(".del-*")):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- loading


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG; return the saved TrainState.

    Only safetensors and JSON are read (nothing is unpickled); a file that passes the manifest but
    cannot be restored raises CheckpointError naming it.
    """
    if not (path / "optimizer.safetensors").is_file() and (path / "optimizer.pt").is_file():
        raise CheckpointError(f"checkpoint {path} is in the older pickle format (optimizer.pt), which tunesmith "
                              "no longer loads because unpickling can run code: start a new run (--overwrite)")
    current = "trainable.safetensors"
    try:
        tensors = load_file(path / current)
        params = dict(model.named_parameters())
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise ValueError(f"unknown parameters {unknown[:3]}: the checkpoint belongs to another model or method")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        current = "optimizer.safetensors"
        opt_tensors = load_file(path / current)
        current = "optimizer.json"
        meta = json.loads((path / current).read_text(encoding="utf-8"))
        optimizer.load_state_dict(join_optimizer_state(opt_tensors, meta, optimizer.state_dict()["param_groups"]))
        current = "scheduler.json"
        scheduler.load_state_dict(json.loads((path / current).read_text(encoding="utf-8")))
        current = "state.json"
        state = TrainState(**json.loads((path / current).read_text(encoding="utf-8")))
        restore_rng(state.rng)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be restored: {current}: {type(e).__name__}: {e}") from None
    return state


def load_extra(path: Path, fname: str) -> dict[str, torch.Tensor] | None:
    """The tensors of an extra file of a checkpoint (save_checkpoint's ``extra``), None when it has none."""
    f = path / fname
    if not f.is_file():
        return None
    try:
        return load_file(f)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be restored: {fname}: {type(e).__name__}: {e}") from None
