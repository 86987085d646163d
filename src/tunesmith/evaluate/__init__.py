"""Evaluation: batched generation, text metrics, validation loss, base-versus-tuned comparison.

Everything here takes plain inputs: a transformers causal LM (or a PEFT model), its tokenizer, and
conversations as lists of {"role", "content"} dicts with reference strings.
"""

from .base import Base, base_model
from .compare import (Comparison, EvalResult, compare, compare_results, comparison_table, evaluate_model,
                      format_comparison, paired_bootstrap_ci, verdict)
from .generate import eos_token_ids, generate_batch, generate_from_ids, generate_text, render_prompt
from .loss import reference_loss, validation_loss
from .metrics import (DEFAULT_METRICS, Metric, available_metrics, compute_metrics, get_metric, normalize_answer,
                      per_example_scores, register_metric, rouge_l)

__all__ = [
    "Base", "Comparison", "DEFAULT_METRICS", "EvalResult", "Metric", "available_metrics", "base_model", "compare",
    "compare_results", "comparison_table", "compute_metrics", "eos_token_ids", "evaluate_model", "format_comparison",
    "generate_batch", "generate_from_ids", "generate_text", "get_metric", "normalize_answer", "paired_bootstrap_ci",
    "per_example_scores", "reference_loss", "register_metric", "render_prompt", "rouge_l", "validation_loss", "verdict",
]
