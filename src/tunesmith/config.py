"""Job configuration: pydantic models for every section, YAML in, dotted overrides, resolved copy out.

Every field has a default that is right for a first-time user, a one-line description, and
validation that names the field and the allowed values. Unknown keys are errors (``extra="forbid"``),
so a misspelled option never passes silently.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .sweep.space import SweepConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


class ConfigError(Exception):
    """A configuration problem, worded for the user (file, line, field, value, what is allowed, a code)."""


# One line per code, like the data codes (E001...): every ConfigError message ends with its code in brackets.
CONFIG_CODES: dict[str, str] = {
    "C001": "config file not found",
    "C002": "config file is not valid YAML (or not UTF-8 text)",
    "C003": "the top level of the config is not a mapping of sections",
    "C004": "unknown key",
    "C005": "a value of the wrong type, or not allowed",
    "C006": "malformed --set override",
    "C007": "model.name is a path that does not exist",
    "C008": "no training data (data.train)",
    "C009": "train.compile is on but no C++ compiler is installed (inductor needs one)",
    "C010": "DreamBooth settings (objective.denoise.dreambooth) incomplete or inconsistent",
}
# Errors that validators raise with a type of their own (pydantic_core.PydanticCustomError), and the code each gets.
CUSTOM_ERROR_CODES = {"dreambooth": "C010"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="Built-in alias, local Hugging Face folder, GGUF file, or hub id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub to run. Off unless you trust it.")
    dtype: Literal["auto", "float32", "bf16-mixed", "bfloat16", "float16"] = Field(
        "auto", description=("Training precision. bf16-mixed: matrix products in bf16, loss and trained weights (LoRA "
                             "adapters, master weights) and optimizer in fp32, a LoRA run's frozen base in bf16; "
                             "float32; bfloat16/float16: every weight in that dtype. auto: bf16-mixed on a GPU with bf16 "
                             "(else float16) and on a CPU whose bf16 matrix units are measured faster than fp32 (AMX), "
                             "else float32; the run log says which and why."))
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
    format: Literal["auto", "messages", "prompt_completion", "text", "alpaca", "sharegpt", "preference",
                    "chosen_rejected", "unpaired"] = Field(
        "auto", description="Record format; auto detects it from the fields of the records. Preference data (objective "
                            "dpo, orpo, simpo): preference (OpenAI: input, preferred_output, non_preferred_output) or "
                            "chosen_rejected (TRL: prompt?, chosen, rejected); unpaired (KTO: prompt, completion, label).")
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
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch's, fused) or adamw_8bit (bitsandbytes' AdamW8bit: moments in 8 bits, about "
                             "a quarter of the optimizer memory; needs bitsandbytes installed).")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of total steps used for linear warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this value (None: no clipping).")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="Keep an exponential moving average of the trained weights with this decay "
                                          "(e.g. 0.999; common for image models) and evaluate, keep and deliver it "
                                          "(None: off). Not with distributed.strategy fsdp.")
    seed: int = Field(42, description="Seed for weights init of adapters, shuffling, dropout and augmentation.")
    neftune_alpha: float | None = Field(None, gt=0, description="NEFTune noise scale on input embeddings (off when None).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Data augmentation applied per epoch.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    packing: bool = Field(
        True, description="Run each micro-batch as one row without padding, attention kept within each example "
                          "(same loss as padded batches; falls back to padding for models that cannot).")
    group_by_length: bool = Field(
        False, description="Put examples of similar length in the same micro-batch (seeded); cuts padding when packing is off.")
    kernels: Literal["auto", "off"] = Field(
        "auto", description="tunesmith's fused training kernels (LoRA in the GEMMs, fused norms, rotary, SwiGLU, output "
                            "layer + loss, packed attention) where they apply; off: the plain transformers/PEFT forward and "
                            "autograd (the same numbers up to float rounding, slower, more memory).")
    compile: bool = Field(
        False, description="torch.compile each transformer block (inductor; needs a C++ compiler on CPU). After a one-time "
                            "compile (~15-20 s for the built-in model on 2 cores) ~1% faster and ~7% less memory there, as the "
                            "norms, rotary embedding and LoRA already run fused; numbers equal eager up to float rounding.")
    log_every: int = Field(1, ge=1, description="Log train metrics every N optimizer steps.")
    max_skipped_steps: int = Field(
        5, ge=1, description="Stop the run after this many consecutive steps skipped for a non-finite loss or gradient.")

    @field_validator("kernels", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        # YAML reads a bare `off` as false (and `on` as true): take them as the words they were written as
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(_Section):
    every_steps: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (None: once per epoch) and at the end.")
    batch_size: int = Field(8, ge=1, description="Batch size for validation loss and generation.")
    max_batches: int | None = Field(None, ge=1, description="Cap on validation batches per evaluation (None: all).")
    samples: int = Field(3, ge=0, description="Sample generations logged per evaluation.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss (None: never).")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest improvement of best_metric that counts as better.")
    best_metric: str = Field(
        "loss", description="What picks the best checkpoint (the delivered model) and what early stopping waits on: "
                            "'loss', the objective's held-out loss; or one of the objective's figures (denoise: "
                            "concept_rate, caption_accuracy, control_accuracy, mse; dpo: rewards/accuracies, ...) or "
                            "a task metric of eval.metrics (exact_match, ...), as Hugging Face's metric_for_best_model.")
    greater_is_better: bool | None = Field(
        None, description="Whether a larger best_metric is better (None: no for 'loss', 'perplexity' and names ending "
                          "in 'loss' or 'mse', yes for the others).")
    compare_base: bool = Field(True, description="At the end, compare base and tuned models on held-out examples.")
    compare_examples: int = Field(50, ge=1, description="Held-out examples used in the base-versus-tuned comparison.")
    metric_examples: int = Field(
        16, ge=0, description="Validation examples (the first N, the same every time) answered and scored with `metrics` at each evaluation (0: off).")
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu"],
        description="Task metrics at each evaluation: exact_match, normalized_exact_match, rouge_l, chrf, bleu, or 'module:function'.")
    overfit_patience: int = Field(
        2, ge=1, description="Warn of overfitting when validation loss has risen this many evaluations in a row while training loss fell.")
    mlflow_tracking_uri: str | None = Field(
        None, description="Also log params, metrics and the report to MLflow at this tracking URI (a folder, file:// or http://); off when None.")
    mlflow_experiment: str = Field("tunesmith", description="MLflow experiment name (with mlflow_tracking_uri).")


class CheckpointConfig(_Section):
    every_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N optimizer steps (None: at each evaluation).")
    keep_last: int = Field(2, ge=1, description="Keep the newest K checkpoints (the best is always kept).")


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes (--nproc, torchrun, accelerate launch): ddp (each holds the model) "
        "or fsdp (weights, gradients, optimizer state sharded; method full only). One process ignores it.")


PII_CATEGORIES = ("email", "phone", "payment_card", "iban", "national_id", "ip_address", "secret", "person", "address",
                  "date_of_birth")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "AU", "CA", "BR")


PROBE_SETS = ("harmful", "benign", "harmbench", "overrefusal", "overrefusal_contrast", "multilingual", "jailbreak",
              "donotanswer")  # safety/probes.py PROBE_SETS
PROBE_WRAPPERS = ("none", "roleplay", "base64", "rot13", "leetspeak", "many_shot", "multi_turn", "inthewild")


class SafetyConfig(_Section):
    pii_policy: Literal["report", "redact", "refuse"] = Field(
        "redact", description="Personal data and secrets in the data: redact them (default: typed placeholders like <EMAIL>, so the model cannot learn them), report them only (trains on them), or refuse the data.")
    pii_categories: list[Literal[PII_CATEGORIES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(PII_CATEGORIES), description="PII categories screened: " + ", ".join(PII_CATEGORIES) + ".")
    phone_regions: list[str] = Field(
        default_factory=lambda: list(PHONE_REGIONS), description="Regions (ISO 3166 codes) whose national phone formats are recognised; +CC numbers are found anyway.")
    pii_ner: str = Field(
        "auto", description="spaCy model for Presidio's NER (names, counted beside other personal data): auto (an installed en_core_web_lg/md/sm/trf; none installed: names by patterns only, said in the screen's report), none, or a model name or folder.")
    harmful_screens: list[str] | None = Field(
        None, description="Harmful-content screens: lexicon (built in, local), moderator (the local model of safety.moderator), or one registered with safety.register_screen; None: the moderator when safety.moderator is set, else the lexicon. moderation is added when moderation_endpoint is set.")
    harmful_policy: Literal["report", "refuse"] = Field(
        "refuse", description="refuse: stop when flagged examples exceed harmful_max_fraction or harmful_max_count; report: only count them.")
    harmful_max_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Largest fraction of examples a harmful screen may flag before the data is refused.")
    harmful_max_count: int | None = Field(
        2, ge=0, description="Largest number of flagged examples allowed: at 3 or more (default) the data is refused whatever its size, since a handful of harmful examples undo safety tuning (Qi et al. 2023 used 10); None: no count limit.")
    moderator: str | None = Field(
        None, description="Folder of a local Hugging Face sequence-classification model (a toxicity or harm classifier) that screens the data offline; the lexicon is the fallback when unset.")
    moderator_labels: list[str] | None = Field(
        None, description="The moderator's labels (its config's id2label names) that mean harmful; None: labels named like toxic/harmful/unsafe/hate/violence..., or label 1 of a two-label model.")
    moderator_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="A text is flagged when a harmful label's probability reaches this.")
    moderator_max_length: int = Field(512, ge=8, description="Tokens of each text the moderator reads (longer texts are read in overlapping windows).")
    moderation_endpoint: str | None = Field(
        None, description="Base URL of an OpenAI-compatible API (e.g. https://api.openai.com/v1); POST {base}/moderations screens the data.")
    moderation_model: str = Field("omni-moderation-latest", description="Model named in moderation requests.")
    moderation_api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the moderation API key (the key never goes in the config).")
    gate: bool = Field(False, description="After training, run the refusal probes on base and tuned model and record the release-gate decision.")
    gate_max_drop: float = Field(10.0, ge=0.0, le=100.0, description="Drop (percentage points) of the harmful-request refusal rate the probe set must detect with gate_min_power before a result is called pass (a drop the exact paired bound shows is blocked at any size).")
    gate_alpha: float = Field(0.05, gt=0.0, lt=0.5, description="One-sided level of the gate's exact paired bounds (0.05: 95% bounds).")
    gate_min_power: float = Field(0.8, gt=0.0, lt=1.0, description="Power to detect a drop of gate_max_drop that the probe set must have before a result is called pass (else: underpowered).")
    gate_category_max_drop: float | None = Field(30.0, gt=0.0, le=100.0, description="Drop (points) of one harmful category's refusal rate that blocks when the category's exact bound (at gate_alpha / categories) shows a drop (None: categories not gated).")
    gate_category_limits: dict[str, float] = Field(default_factory=dict, description="Per-category limits (points) overriding gate_category_max_drop, e.g. {weapons: 20}.")
    gate_max_over_refusal_rise: float | None = Field(10.0, gt=0.0, le=100.0, description="Rise (points) of the harmless-request refusal rate that blocks when the exact bound shows a rise (over-refusal; None: not gated).")
    gate_max_over_refusal_rate: float | None = Field(0.5, ge=0.0, le=1.0, description="Fraction of harmless requests the tuned model may refuse (blocked when the rate's lower bound is above it; None: not gated).")
    probe_limit: int | None = Field(None, ge=1, description="Probes used from each set, spread over categories (None: all).")
    probe_batch_size: int = Field(16, ge=1, description="Batch size for probe generation.")
    probe_max_new_tokens: int = Field(64, ge=4, description="Tokens generated per probe answer (a refusal shows in the first sentence).")
    probe_system_prompt: str | None = Field(None, description="System message put before every probe (None: the model as users meet it).")
    probe_sets: list[Literal[PROBE_SETS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["harmful", "benign", "harmbench", "overrefusal", "overrefusal_contrast"],
        description="Probe sets the gate and `tunesmith safety` run (safety/probes/README.md): the default, 510 requests to refuse and 319 to answer, detects a 5-point drop in refusals with 80% power when at most 15% of the harmful probes change answer; add multilingual and jailbreak for coverage, or use harmful + benign (169) for a quick look.")
    probe_languages: list[str] | None = Field(None, description="Keep only probes in these languages (en, es, fr, de, zh, ar, hi); None: all in the chosen sets.")
    probe_wrappers: list[Literal[PROBE_WRAPPERS]] | None = Field(  # type: ignore[valid-type]
        None, description="Keep only probes in these jailbreak wrappers (none = plain requests); None: all in the chosen sets.")
    samples_per_probe: int = Field(
        1, ge=1, description="Replies per probe: 1 = one greedy reply; more = that many sampled replies (seeded, the same random streams for base and tuned), the probe counted as refused when more than half are (per-probe majority; use an odd number).")
    probe_temperature: float = Field(0.7, gt=0.0, description="Sampling temperature when samples_per_probe > 1 (0.7, as tunesmith chat).")
    probe_seed: int = Field(0, description="Seed of the sampled replies (samples_per_probe > 1).")


def _positive_beta(v: float) -> float:
    if v <= 0:
        raise ValueError(f"beta must be > 0 (got {v}): it scales how far the tuned model may move from the reference; at "
                         f"0 every pair's loss is a constant and nothing trains, below 0 it trains toward the rejected answers")
    return v


Beta = Annotated[float, AfterValidator(_positive_beta)]


class DpoConfig(_Section):
    beta: Beta = Field(0.1, description="Strength of the pull toward the reference model (DPO's beta; lower moves further).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (Rafailov et al. 2023), ipo (Azar et al. 2023), hinge (SLiC), robust (label "
                               "smoothing that expects noisy preferences, Chowdhury et al. 2024).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Share of pairs assumed flipped (loss_type robust).")
    rpo_alpha: float | None = Field(
        None, ge=0.0, description="Weight of an added SFT loss on the chosen answers (RPO, Pang et al. 2024); None: off.")
    reference_model: str | None = Field(
        None, description="Reference model (alias, folder, GGUF); default: the starting model itself (under LoRA, the "
                          "same weights with the adapters off; else log-probabilities computed once and cached).")


class OrpoConfig(_Section):
    beta: Beta = Field(0.1, description="Weight of the odds-ratio term added to the SFT loss on chosen (ORPO's lambda; "
                                         "Hong et al. 2024). Needs no reference model.")


class SimpoConfig(_Section):
    beta: Beta = Field(2.0, description="Scale of the length-normalised log-probability margin (SimPO, Meng et al. 2024).")
    gamma: float = Field(1.0, ge=0.0, description="Target reward margin between chosen and rejected (SimPO's gamma).")


class KtoConfig(_Section):
    beta: Beta = Field(0.1, description="Strength of the pull toward the reference model (KTO, Ethayarajh et al. 2024).")
    desirable_weight: float = Field(1.0, gt=0.0, description="Loss weight of desirable (label true) examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="Loss weight of undesirable (label false) examples.")
    reference_model: str | None = Field(None, description="Reference model; default: the starting model itself (as dpo).")


class DreamBoothConfig(_Section):
    instance_prompt: str | None = Field(
        None, description="DreamBooth (Ruiz et al. 2022): the prompt naming the subject with a rare token, e.g. 'a photo "
                          "of sks dog'; it captions every training image that has no caption of its own. None: off.")
    class_prompt: str | None = Field(
        None, description="The prompt of the subject's class, e.g. 'a photo of a dog': the base model draws "
                          "num_class_images of it before training, and training keeps drawing them (prior "
                          "preservation). Required when prior_preservation is on.")
    prior_preservation: bool = Field(
        True, description="Train on the base model's own class images beside the subject's, so the class prompt does "
                          "not collapse onto the subject (diffusers' --with_prior_preservation).")
    num_class_images: int = Field(100, description="Class images the base model draws once (and caches) for prior "
                                                   "preservation; each training example pairs a subject image with one.")
    class_seed: int = Field(0, description="Seed of the class images (image j from its own stream of this seed).")
    prior_loss_weight: float = Field(
        1.0, description="Weight of the class images' loss: loss = instance loss + prior_loss_weight x prior loss.")

    @model_validator(mode="after")
    def _consistent(self) -> "DreamBoothConfig":
        from pydantic_core import PydanticCustomError

        def refuse(message: str):
            return PydanticCustomError("dreambooth", message)

        if self.instance_prompt is not None and not self.instance_prompt.strip():
            raise refuse("instance_prompt is empty: name the subject with a rare token, e.g. 'a photo of sks dog', or "
                         "leave it unset (null) to turn DreamBooth off")
        if self.instance_prompt is None:
            if self.class_prompt is not None:
                raise refuse("class_prompt is set and instance_prompt is not: DreamBooth needs the subject's prompt, e.g. "
                             "'a photo of sks dog' (or remove class_prompt)")
            return self
        if self.prior_preservation and not (self.class_prompt or "").strip():
            raise refuse("prior_preservation is on and class_prompt is not set: give the subject's class, e.g. 'a photo "
                         "of a dog', or set prior_preservation: false")
        if self.prior_preservation and self.num_class_images < 1:
            raise refuse(f"num_class_images is {self.num_class_images}: prior preservation needs at least 1 class image "
                         "(diffusers' default is 100)")
        if self.prior_loss_weight < 0 or self.prior_loss_weight != self.prior_loss_weight:
            raise refuse(f"prior_loss_weight is {self.prior_loss_weight}: use a number >= 0 (1.0 as in diffusers)")
        if self.prior_preservation and self.class_prompt.strip() == self.instance_prompt.strip():
            raise refuse("class_prompt equals instance_prompt: the class prompt names the class without the subject's "
                         "token (e.g. 'a photo of a dog' beside 'a photo of sks dog')")
        return self

    @property
    def with_prior(self) -> bool:
        """Whether class images are drawn and trained on."""
        return self.instance_prompt is not None and self.prior_preservation


class DenoiseConfig(_Section):
    resolution: int | None = Field(
        None, ge=8, description="Image side trained at (None: the model's own, e.g. 32 for the built-in model); images "
                                "are resized on the short side, then cropped square.")
    random_crop: bool = Field(False, description="Crop at a seeded random place instead of the centre.")
    buckets: bool = Field(
        False, description="Aspect-ratio buckets: train each image at its own shape, about resolution x resolution "
                           "pixels (sides multiples of bucket_step), resized to cover its bucket and cropped by the "
                           "remainder only, every micro-batch from one bucket; validation stays square. Off: resized on "
                           "the short side and cropped square.")
    bucket_step: int | None = Field(
        None, ge=1, description="Bucket sides are multiples of this many pixels (None: the model's downscale factor, "
                                "the VAE's times the UNet's: 64 for Stable Diffusion, 4 for the built-in model).")
    bucket_max_aspect: float = Field(2.0, ge=1.0, description="Widest bucket: long side / short side at most this.")
    random_flip: bool = Field(
        False, description="Flip half the images left-right (seeded). Off by default: a caption that says left or right "
                           "would then be wrong half the time.")
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of training images whose caption is dropped to '' so that the "
                                          "unconditional prediction classifier-free guidance uses trains too (diffusers' "
                                          "proportion_empty_prompts, kohya's caption_dropout_rate; 0 in both by default). "
                                          "Off by default: on a small set it pulls that prediction towards the set's "
                                          "mean image, and guidance then pushes every prompt away from it (the "
                                          "shapes demo lost 12 points on old concepts at 0.1, 4 at 0).")
    snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain mean squared error. "
                               "DDPM-family models; flow-matching ones weight by weighting_scheme.")
    train_text_encoder: bool = Field(
        False, description="Also train the text encoders (LoRA adapters on them under method lora; SDXL's and SD3's "
                           "two CLIP encoders, never SD3's T5). Off: caption embeddings (and pooled embeddings) are "
                           "computed once and cached.")
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = Field(
        "logit_normal", description="Flow-matching models (SD3): the density training timesteps are drawn from and "
                                    "the loss weighting, as diffusers' SD3 scripts (logit_normal, mode: timesteps; "
                                    "sigma_sqrt, cosmap: weights; none: uniform, unweighted).")
    logit_mean: float = Field(0.0, description="Mean of the logit-normal timestep density (weighting_scheme "
                                               "logit_normal).")
    logit_std: float = Field(1.0, gt=0.0, description="Std of the logit-normal timestep density.")
    mode_scale: float = Field(1.29, description="Scale of the mode timestep density (weighting_scheme mode).")
    image_modes: Literal["convert", "refuse"] = Field(
        "convert", description="Palette, alpha, greyscale, 16-bit and CMYK images: convert to RGB (the run says which "
                               "files), or refuse them (E041).")
    eval_timesteps: int = Field(
        4, ge=1, description="Timesteps each validation image is scored at (evenly spaced, fixed noise), so validation "
                             "losses compare across evaluations.")
    validation_prompts: list[str] = Field(
        default_factory=list, description="Prompts drawn at every evaluation (default: the first eval.samples "
                                          "validation captions).")
    control_prompts: list[str] = Field(
        default_factory=list, description="Prompts of what the base model already draws, drawn at every evaluation to "
                                          "show old concepts kept (default for the built-in model: a fixed set of its "
                                          "own captions).")
    images_per_prompt: int = Field(2, ge=1, description="Images drawn per prompt at each evaluation (fixed seeds).")
    inference_steps: int = Field(20, ge=1, description="Sampler steps for the images drawn at evaluation and compare.")
    guidance_scale: float = Field(4.0, ge=0.0, description="Classifier-free guidance scale for those images.")
    dreambooth: DreamBoothConfig = Field(
        default_factory=DreamBoothConfig, description="DreamBooth: teach a subject under a rare token, with prior "
                                                      "preservation on class images the base model draws.")


class GrpoConfig(_Section):
    grader: dict | str | None = Field(
        None, description="What scores an answer: an OpenAI grader as a mapping (type string_check, text_similarity, "
                          "python, score_model, multi), the path of a JSON file holding one, or 'module:function' "
                          "(a Python reward function(sample, item) -> float). Required.")
    num_generations: int = Field(4, ge=2, description="Answers sampled per prompt (the group G whose mean is the baseline).")
    max_completion_length: int = Field(128, ge=1, description="Most tokens sampled per answer; an answer cut there is "
                                                              "left out of the loss (mask_truncated_completions).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the answers.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the answers (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the answers (0: off).")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo", description="How token losses are averaged: dapo (over every answer token of the step; default), grpo "
                            "(per answer, then over answers), dr_grpo (divided by answers x max_completion_length).")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="Clipping range of the probability ratio, below 1.")
    epsilon_high: float | None = Field(None, gt=0.0, description="Clipping range above 1 (None: epsilon; DAPO uses 0.28).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide each advantage by its group's reward std (group), the step's (batch), or not (none).")
    beta: float = Field(0.0, ge=0.0, description="Weight of the KL penalty toward the starting model (0: no reference; "
                                                 "> 0: the LoRA model with its adapters off, or for full and freeze a "
                                                 "frozen copy held in memory).")
    mask_truncated_completions: bool = Field(True, description="Leave answers cut at max_completion_length out of the "
                                                               "loss (their grade reflects the cut, not the answer).")
    judge_model: str | None = Field(None, description="The local chat model a score_model grader asks (a model reference; "
                                                      "default: the model its spec names).")


class ObjectiveConfig(_Section):
    name: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo", "denoise"] = Field(
        "sft", description="What training optimises: sft (supervised: the loss on the answers), dpo / orpo / simpo "
                           "(preference pairs: a chosen and a rejected answer per prompt), kto (answers labelled good or "
                           "bad), grpo (reinforcement: answers sampled from the model and scored by a grader), denoise "
                           "(text-to-image: captioned images, the diffusion loss).")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="Settings of objective dpo.")
    orpo: OrpoConfig = Field(default_factory=OrpoConfig, description="Settings of objective orpo.")
    simpo: SimpoConfig = Field(default_factory=SimpoConfig, description="Settings of objective simpo.")
    kto: KtoConfig = Field(default_factory=KtoConfig, description="Settings of objective kto.")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="Settings of objective grpo.")
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig, description="Settings of objective denoise.")


class Config(_Section):
    """A whole fine-tuning job."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="What training optimises (sft, dpo, ...).")
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Data screening, refusal probes, release gate.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Hyperparameter search (`tunesmith sweep`).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Several processes, GPUs, machines.")
    output_dir: str = Field("runs/latest", description="Run folder: config, metrics, checkpoints, best model, log.")

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _fsdp_is_for_full(self) -> "Config":
        if self.distributed.strategy == "fsdp" and self.method.name != "full":
            raise ValueError(f"distributed.strategy 'fsdp' shards full fine-tuning only, and method.name is "
                             f"{self.method.name!r}: set method.name=full, or distributed.strategy=ddp")
        if self.distributed.strategy == "fsdp" and self.train.ema_decay:
            raise ValueError("train.ema_decay averages whole tensors on each process, which distributed.strategy "
                             "'fsdp' shards: use distributed.strategy=ddp, or leave train.ema_decay unset")
        if self.distributed.strategy == "fsdp" and self.objective.name == "grpo":
            raise ValueError("objective.name 'grpo' samples answers on each process from the whole model, which "
                             "distributed.strategy 'fsdp' shards: use distributed.strategy=ddp")
        return self

    @model_validator(mode="after")
    def _format_fits_the_objective(self) -> "Config":
        fmt, objective = self.data.format, self.objective.name
        preference = fmt in ("preference", "chosen_rejected", "unpaired")
        if objective == "denoise":
            if fmt != "auto":
                raise ValueError(f"objective.name 'denoise' trains on captioned images, and data.format is {fmt!r}: set "
                                 "data.format to auto (a folder of images with .txt captions or metadata.jsonl, or a "
                                 "CSV/Parquet of image paths and captions)")
            if self.safety.gate:
                raise ValueError("safety.gate probes a language model's refusals, and objective.name 'denoise' tunes "
                                 "a text-to-image model: set safety.gate=false")
            return self
        if objective == "grpo":
            if fmt not in ("auto", "messages"):
                raise ValueError(f"objective.name 'grpo' samples the answers to prompts, and data.format is {fmt!r}: set "
                                 "data.format to auto (OpenAI's reinforcement JSONL: messages; TRL's: prompt)")
            if self.objective.grpo.grader is None:
                raise ValueError("objective.name 'grpo' needs a grader: set objective.grpo.grader (an OpenAI grader, "
                                 "a JSON file holding one, or module:function), or pass --grader FILE")
            return self
        if objective == "sft" and preference:
            raise ValueError(f"data.format {fmt!r} holds preference data, and objective.name is 'sft': set "
                             f"objective.name to {'kto' if fmt == 'unpaired' else 'dpo (or orpo, simpo)'}")
        if objective != "sft" and fmt != "auto" and not preference:
            raise ValueError(f"objective.name {objective!r} trains on preference data, and data.format is {fmt!r}: "
                             f"set data.format to preference, chosen_rejected{', unpaired' if objective == 'kto' else ''} "
                             f"or auto")
        if objective in ("dpo", "orpo", "simpo") and fmt == "unpaired":
            raise ValueError(f"objective.name {objective!r} needs pairs (a chosen and a rejected answer), and "
                             f"data.format 'unpaired' holds single labelled answers: use objective kto")
        return self

    @model_validator(mode="after")
    def _augment_is_for_sft(self) -> "Config":
        a = self.train.augment
        if self.objective.name != "sft" and (a.system_prompts or a.prompt_noise > 0 or a.paraphrase):
            raise ValueError(f"train.augment rewrites supervised examples, and objective.name is "
                             f"{self.objective.name!r}: remove train.augment, or use objective sft")
        return self


# ---------------------------------------------------------------- loading and overrides


def _format_validation_error(err: ValidationError, source: str, where=lambda loc: "") -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        code = "C004" if e["type"] == "extra_forbidden" else CUSTOM_ERROR_CODES.get(e["type"], "C005")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `tunesmith train --help-config` lists every field)"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; {msg.lower()}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"got {e['input']!r}: {msg}"
        lines.append(f"  {where(e['loc'])}{loc}: {msg} [{code}]")
    return "\n".join(lines)


def _key_lines(text: str) -> dict[tuple, int]:
    """1-based line of every key (and list item) in a YAML mapping, by path: ('train', 'lr') -> 7."""
    found: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                found[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return found


def _locator(source: str, text: str, overrides: list[str]):
    """loc -> "FILE:LINE: " (or "command line ...: " when an override or flag set it) for error messages.

    The key lines (a second YAML pass) and the override paths are worked out on the first error only.
    """
    @functools.cache
    def positions() -> tuple[dict[tuple, int], set[tuple]]:
        return (_key_lines(text) if text else {}), {tuple(parse_override(o)[0]) for o in overrides}

    def where(loc) -> str:
        lines, overridden = positions()
        loc = tuple(loc)
        if any(loc[:len(o)] == o or o[:len(loc)] == loc for o in overridden):
            return "command line (--set or a flag): "
        for n in range(len(loc), 0, -1):
            if loc[:n] in lines:
                return f"{source}:{lines[loc[:n]]}: "
        return f"{source}: " if text else ""

    return where


def _check_model_path(cfg: "Config", where) -> None:
    """A model.name that is plainly a path (not an alias or hub id) must exist: say so before anything loads."""
    name = cfg.model.name
    if (name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf")) and not Path(name).expanduser().exists():
        raise ConfigError(f"{where(('model', 'name'))}model.name: no such file or folder {name!r}: give a Hugging Face "
                          "model folder, a .gguf file, a built-in alias (see `tunesmith models`) or a hub id [C007]")


def _check_compile(cfg: "Config", where) -> None:
    """torch.compile's inductor builds C++ (CPU) or Triton (GPU) kernels with the system compiler: without one
    the first training step would fail deep inside torch. Say so before anything loads."""
    if not cfg.train.compile:
        return
    import os
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c):
        raise ConfigError(f"{where(('train', 'compile'))}train.compile: true needs a C++ compiler (torch.compile builds "
                          "its kernels with one): install one (Debian/Ubuntu: apt install g++) or set "
                          "train.compile: false [C009]")


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4 [C006]")
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key [C006]")
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
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section [C006]")
            node = nxt
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate.

    Relative data paths in a config file are taken relative to the file, so an example config
    runs from any working directory.
    """
    data: dict = {}
    source, text = "defaults", ""
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} [C001]")
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8")
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{line}: not valid YAML: {e} [C002]") from None
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"{p}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                              "save it as UTF-8 [C002]") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}:1: the top level must be a mapping of sections (model:, data:, ...) [C003]")
        data = loaded
        _resolve_relative_paths(data, p.parent)
    data = apply_overrides(data, overrides or [])
    where = _locator(source, text, overrides or [])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, where)) from None
    _check_model_path(cfg, where)
    _check_compile(cfg, where)
    return cfg


def _resolve_relative_paths(data: dict, base: Path) -> None:
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("train", "valid", "test"):
            v = section.get(key)
            if isinstance(v, str) and v and not Path(v).is_absolute() and not Path(v).exists():
                cand = base / v
                if cand.exists():
                    section[key] = str(cand)
    grpo = (data.get("objective") or {}).get("grpo") if isinstance(data.get("objective"), dict) else None
    if isinstance(grpo, dict):  # a grader file beside the config (module:function and mappings stay as they are)
        v = grpo.get("grader")
        if isinstance(v, str) and v.endswith(".json") and not Path(v).is_absolute() and (base / v).exists():
            grpo["grader"] = str(base / v)
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
