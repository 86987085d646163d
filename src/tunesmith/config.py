"""Job configuration: pydantic models for every section, YAML in, dotted overrides, resolved copy out.

Every field has a default that is right for a first-time user, a one-line description, and
validation that names the field and the allowed values. Unknown keys are errors (``extra="forbid"``),
so a misspelled option never passes silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(Exception):
    """A configuration problem, worded for the user (field, value, what is allowed)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="Built-in alias, local Hugging Face folder, GGUF file, or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub to run. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training precision. auto: bf16 where the hardware supports it, else fp32 (always fp32 on CPU).")
    chat_template: str | None = Field(
        None, description="Chat template: a built-in name (chatml) or a path to a Jinja file; default is the tokenizer's own.")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0, description="Override the model's attention/hidden dropout probability (None keeps the model's).")


class DataConfig(_Section):
    train: str | None = Field(None, description="Training file: .jsonl, .json, .csv or .parquet.")
    valid: str | None = Field(None, description="Validation file. If absent, `valid_fraction` of the training file is held out.")
    test: str | None = Field(
        None, description="Held-out test file for the final base-versus-tuned comparison (default: the validation split).")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of the training file held out for validation when `valid` is not given.")
    format: Literal["auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt"] = Field(
        "auto", description="Record format; auto detects it from the fields of the records.")
    max_length: int = Field(1024, ge=8, description="Maximum tokens per example after rendering.")
    overflow: Literal["error", "truncate", "drop"] = Field(
        "error", description="What to do with examples longer than max_length: error (report them), truncate, or drop.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: assistant/completion tokens (plus end-of-turn), or all tokens.")
    min_examples: int = Field(1, ge=1, description="Fewest training examples accepted.")
    shuffle: bool = Field(True, description="Shuffle training examples every epoch (seeded).")


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is (alpha / r) * B A x.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear'.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")


class FreezeConfig(_Section):
    train_last_layers: int | None = Field(None, ge=0, description="Train only the last N transformer blocks.")
    train_layers: list[str] = Field(
        default_factory=list, description="Block indices or ranges to train, e.g. ['0-3', '10'].")
    train_patterns: list[str] = Field(
        default_factory=list, description="Regular expressions over parameter names to train, e.g. ['lm_head', 'norm'].")

    @field_validator("train_layers", mode="before")
    @classmethod
    def _layers_as_strings(cls, v):
        # YAML gives ints for `[0, 5]` and one string for `"0-3, 10"`: accept both spellings.
        if isinstance(v, (int, str)):
            v = [v]
        if isinstance(v, list):
            out = []
            for item in v:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise ValueError(f"layer entries are indices or ranges like '0-3', got {item!r}")
                out += [p.strip() for p in str(item).split(",") if p.strip()]
            return out
        return v


class MethodConfig(_Section):
    name: Literal["lora", "freeze", "full"] = Field("lora", description="lora (adapters via PEFT), freeze (train named parts), or full.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (method lora).")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="What to train (method freeze).")

    @model_validator(mode="after")
    def _freeze_names_something(self) -> "MethodConfig":
        f = self.freeze
        if self.name == "freeze" and not (f.train_last_layers or f.train_layers or f.train_patterns):
            raise ValueError(
                "method.name is 'freeze' but nothing is selected to train: set method.freeze.train_last_layers, "
                "method.freeze.train_layers or method.freeze.train_patterns")
        return self


class AugmentConfig(_Section):
    system_prompts: list[str] = Field(
        default_factory=list, description="System-prompt variants; each epoch an example gets one (seeded) in place of its own.")
    system_prompt_prob: float = Field(0.5, ge=0.0, le=1.0, description="Chance that an example's system prompt is replaced.")
    prompt_noise: float = Field(0.0, ge=0.0, le=0.5, description="Per-character chance of light noise (case flip, dropped/duplicated char) in user text.")
    paraphrase: bool = Field(False, description="Replace user prompts by model-written paraphrases (cached), one per epoch.")
    paraphrase_model: str | None = Field(None, description="Model that writes paraphrases; default is the base model.")
    paraphrase_count: int = Field(2, ge=1, le=8, description="Paraphrases written per prompt.")


class TrainConfig(_Section):
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size in examples per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size * grad_accum * processes).")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (not applied to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of total steps used for linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value (None: no clipping).")
    seed: int = Field(42, description="Seed for weights init of adapters, shuffling, dropout and augmentation.")
    neftune_alpha: float | None = Field(None, gt=0, description="NEFTune noise scale on input embeddings (off when None).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Data augmentation applied per epoch.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    log_every: int = Field(1, ge=1, description="Log train metrics every N optimizer steps.")


class EvalConfig(_Section):
    every_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (None: once per epoch) and at the end.")
    batch_size: int = Field(8, ge=1, description="Batch size for validation loss and generation.")
    max_batches: int | None = Field(None, ge=1, description="Cap on validation batches per evaluation (None: all).")
    samples: int = Field(3, ge=0, description="Sample generations logged per evaluation.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss (None: never).")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest validation-loss improvement that counts as better.")
    compare_base: bool = Field(True, description="At the end, compare base and tuned models on held-out examples.")
    compare_examples: int = Field(50, ge=1, description="Held-out examples used in the base-versus-tuned comparison.")


class CheckpointConfig(_Section):
    every_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps (None: at each evaluation).")
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints (the best is always kept).")


class Config(_Section):
    """A whole fine-tuning job."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output_dir: str = Field("runs/latest", description="Run folder: config, metrics, checkpoints, best model, log.")

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


# ---------------------------------------------------------------- loading and overrides


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `tunesmith train --help-config` lists every field)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; {msg.lower()}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"got {e['input']!r}: {msg}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate.

    Relative data paths in a config file are taken relative to the file, so an example config
    runs from any working directory.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
        data = loaded
        _resolve_relative_paths(data, p.parent)
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def _resolve_relative_paths(data: dict, base: Path) -> None:
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("train", "valid", "test"):
            v = section.get(key)
            if isinstance(v, str) and v and not Path(v).is_absolute() and not Path(v).exists():
                cand = base / v
                if cand.exists():
                    section[key] = str(cand)
    model = data.get("model")
    if isinstance(model, dict):
        v = model.get("name")
        if isinstance(v, str) and (v.startswith("./") or v.startswith("../")):
            model["name"] = str((base / v).resolve())


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False), encoding="utf-8")


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: the reference for `--help-config`."""
    rows: list[tuple[str, str, str]] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        dotted = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, dotted + "."))
        else:
            default = f.get_default(call_default_factory=True)
            rows.append((dotted, json.dumps(default), f.description or ""))
    return rows
