"""The data stage: files -> read -> validate -> canonical Example -> render (chat template) -> ids + labels.

Entry points the rest of tunesmith calls:

- ``load_splits(data_cfg, seed) -> Splits`` and ``load_examples(path, fmt)``: read and validate (DataError)
- ``render_examples(examples, tokenizer, data_cfg, chat_template) -> RenderResult``: ids and label masks
- ``collate(batch, pad_id)``, ``collate_packed(batch)``, ``collate_prefixed(batch, groups)`` (answers sharing a prompt
  hold it once) and ``count_target_tokens(labels)``: batches for the loop
- ``prompt_and_reference(example)`` and ``render_prompt_ids(messages, tokenizer)``: generation and eval
- ``Augmenter(augment_cfg, seed, paraphraser).apply(examples, epoch)``: per-epoch augmentation
- ``preflight(cfg, tokenizer) -> PreflightReport``: what ``tunesmith check`` prints
- ``load_preference_splits(data_cfg, seed, objective)``, ``render_pairs`` / ``render_unpaired``, ``show_pair``,
  ``pair_stats``: preference data (dpo, orpo, simpo pairs; kto unpaired answers); ``preflight`` reads and
  renders them for a preference objective, ``screened_chats(items)`` gives the chats the data screen checks
- ``load_image_splits(data_cfg, seed, resolution)``, ``read_image_rows(source)``, ``image_tensor(record, resolution)``,
  ``content_hash(path)``, ``summarize_images(splits)``: captioned images for text-to-image fine-tuning
"""

from .augment import Augmenter, CachedParaphraser, GenerateFn, ModelParaphraser, Paraphraser, noise
from .collate import collate, collate_packed, collate_prefixed, count_target_tokens
from .errors import CODES, DataError, Issue
from .example import ROLES, Example, Message, Origin, prompt_and_reference
from .formats import FORMATS, convert, detect
from .loading import Loaded, Splits, collect_splits, holdout_split, load_examples, load_splits, read_examples
from .preflight import LengthStats, PreflightReport, SplitReport, mark_plain, preflight, trained_spans
from .preference import pair_spans
from .preflight_preference import screened_chats
from .preference import (PREFERENCE_FORMATS, Pair, PairRenderResult, Preference, PreferenceLoaded, PreferenceSplits,
                         RenderedPair, RenderedUnpaired, Unpaired, collect_preference_splits, convert_preference,
                         load_preference_splits, pair_stats, read_preference_file, read_preferences,
                         render_pairs, render_preferences_all, render_unpaired, show_pair, unpair)
from .images import (IMAGE_SUFFIXES, ImageRecord, ImageSplits, ImageSummary, ImageWarning, collect_image_splits,
                     content_hash, image_layout, image_tensor, load_image_splits, load_rgb, read_image_rows,
                     summarize_images)
from .readers import EXTENSIONS, read_file
from .render import (BUILTIN_TEMPLATES, IGNORE, Overflow, RenderedExample, RenderResult, count_targets, render_all,
                     render_examples, render_one, render_prompt_ids, resolve_chat_template)

__all__ = [
    "Augmenter", "BUILTIN_TEMPLATES", "CODES", "CachedParaphraser", "DataError", "EXTENSIONS", "Example", "FORMATS",
    "GenerateFn", "IGNORE", "Issue", "LengthStats", "Loaded", "Message", "ModelParaphraser", "Origin", "Overflow",
    "Paraphraser", "PreflightReport", "ROLES", "RenderResult", "RenderedExample", "SplitReport", "Splits",
    "collate", "collate_packed", "collate_prefixed", "collect_splits", "convert", "count_target_tokens", "count_targets", "detect", "holdout_split",
    "load_examples", "load_splits", "mark_plain", "noise", "preflight", "prompt_and_reference", "read_examples",
    "read_file", "render_all", "render_examples", "render_one", "render_prompt_ids", "resolve_chat_template",
    "trained_spans",
    "PREFERENCE_FORMATS", "Pair", "PairRenderResult", "Preference", "PreferenceLoaded", "PreferenceSplits",
    "RenderedPair", "RenderedUnpaired", "Unpaired", "collect_preference_splits", "convert_preference",
    "load_preference_splits", "pair_stats", "read_preference_file", "read_preferences", "render_pairs",
    "render_preferences_all", "render_unpaired", "show_pair", "unpair", "pair_spans", "screened_chats",
    "IMAGE_SUFFIXES", "ImageRecord", "ImageSplits", "ImageSummary", "ImageWarning", "collect_image_splits",
    "content_hash", "image_layout", "image_tensor", "load_image_splits", "load_rgb", "read_image_rows",
    "summarize_images",
]
