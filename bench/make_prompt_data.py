"""Write bench/data/prompts_{train,valid}.jsonl: prompt-only rows for bench_grpo_vs_trl.py.

    python bench/make_prompt_data.py          # same bytes on every run (no randomness)

Source: the shipped example examples/iso_dates (a date written as people write it, to be answered in ISO 8601 and
nothing else). Each row's conversation keeps its system and user turns and ends at the user turn, as reinforcement
fine-tuning needs (the model samples the answer); the assistant's answer moves to ``reference_answer``, the field
the benchmark's reward function reads (grpo_workers.reward). Train: all 600 rows of train.jsonl in file order (a
run takes them from the top: both tools are given them in this order). Valid: the first VALID_ROWS of valid.jsonl,
the held-out prompts every final adapter is graded on.

Format: OpenAI's reinforcement fine-tuning JSONL (``messages`` plus extra fields), as tunesmith reads it
(src/tunesmith/data/prompts.py); grpo_workers.py gives TRL the same rows as a conversational ``prompt`` column and
a ``reference_answer`` column.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "examples" / "iso_dates"
VALID_ROWS = 32


def prompt_row(record: dict) -> dict:
    """{"messages": [system, user], "reference_answer": the assistant's answer}."""
    *conversation, answer = record["messages"]
    if answer["role"] != "assistant" or conversation[-1]["role"] != "user":
        raise ValueError(f"expected a conversation ending user, assistant: {record}")
    return {"messages": conversation, "reference_answer": answer["content"]}


def main() -> None:
    out = HERE / "data"
    for split, source, limit in (("train", "train.jsonl", None), ("valid", "valid.jsonl", VALID_ROWS)):
        rows = [prompt_row(json.loads(line)) for line in open(SOURCE / source, encoding="utf-8")][:limit]
        path = out / f"prompts_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path} ({len(rows)} prompts)")


if __name__ == "__main__":
    main()
