"""Write the iso_dates_rft example's prompts: iso_dates' conversations without their answers, the answer kept as
the field the grader reads.

    python examples/iso_dates_rft/make_data.py      # writes train.jsonl, valid.jsonl, test.jsonl here (instant)

Each line is OpenAI's reinforcement fine-tuning JSONL: ``messages`` (the system and user turns of ../iso_dates, so
the test dates stay unseen) and ``reference_answer`` (the ISO date), which grader.json reads as
{{item.reference_answer}}. No answer is trained toward: the model's own sampled answers are graded.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE.parent / "iso_dates"


def convert(src: Path, dst: Path) -> int:
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        assert messages[-1]["role"] == "assistant", f"{src}: a line does not end with the answer"
        rows.append({"messages": messages[:-1], "reference_answer": messages[-1]["content"]})
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


if __name__ == "__main__":
    for split in ("train", "valid", "test"):
        print(f"{split}: {convert(SOURCE / f'{split}.jsonl', HERE / f'{split}.jsonl')} prompts")
