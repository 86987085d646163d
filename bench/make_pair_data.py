"""Write bench/data/pairs_{train,valid}.jsonl: preference pairs made from the shipped chats, for bench_dpo_vs_trl.py.

    python bench/make_pair_data.py          # same files on every run (seeded)

Source: bench/data/chat_{train,valid}.jsonl (make_chat_data.py), keeping the chats of realistic length for
preference tuning: an answer of 100+ characters and 400+ characters of prompt and answer together (e-mail
rewrites, explanations, summaries of a passage, small functions; ~100 to ~580 tokens), so the unit conversions
and dates, whose answers are a dozen tokens, are left out. The chosen answer is the chat's reply; the
rejected one is a deterministic corruption of it, alternating (seeded):

- another chat's reply (of the same split, the next one in a seeded order whose prompt differs): fluent, on
  the wrong question;
- the reply's sentences shuffled and the last quarter or so dropped (answers of three sentences or more;
  otherwise the first kind): the right words, incoherent and incomplete.

Format: OpenAI's preference JSONL (input.messages, preferred_output, non_preferred_output), as
tunesmith reads it (src/tunesmith/data/preference.py); bench_dpo_vs_trl.py gives TRL the same pairs as
conversational prompt / chosen / rejected.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 7
HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MIN_ANSWER_CHARS, MIN_TOTAL_CHARS = 100, 400


def eligible(messages: list[dict]) -> bool:
    answer = messages[-1]["content"]
    return len(answer) >= MIN_ANSWER_CHARS and sum(len(m["content"]) for m in messages) >= MIN_TOTAL_CHARS


def sentences(text: str) -> list[str]:
    """Split after '.', '!' or '?' followed by white space (code and paragraph breaks stay inside a piece)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def shuffled_and_cut(answer: str, rng: random.Random) -> str | None:
    parts = sentences(answer)
    if len(parts) < 3:
        return None
    keep = max(2, round(len(parts) * rng.uniform(0.65, 0.85)))
    for _ in range(10):  # a shuffle that leaves the kept sentences in order would be a plain cut
        order = rng.sample(parts, len(parts))[:keep]
        if order != parts[:keep]:
            return " ".join(order)
    return None


def make_pairs(chats: list[list[dict]], rng: random.Random) -> list[dict]:
    chats = [m for m in chats if eligible(m)]
    others = rng.sample(range(len(chats)), len(chats))  # where each example looks for another chat's reply
    out = []
    for i, messages in enumerate(chats):
        chosen = messages[-1]["content"]
        rejected = shuffled_and_cut(chosen, rng) if i % 2 else None
        if rejected is None:
            start = others.index(i)
            for k in range(1, len(chats)):
                j = others[(start + k) % len(chats)]
                if chats[j][:-1] != messages[:-1] and chats[j][-1]["content"] != chosen:
                    rejected = chats[j][-1]["content"]
                    break
        out.append({"input": {"messages": messages[:-1]},
                    "preferred_output": [{"role": "assistant", "content": chosen}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return out


def main() -> None:
    rng = random.Random(SEED)
    for split in ("train", "valid"):
        chats = [json.loads(line)["messages"] for line in open(DATA / f"chat_{split}.jsonl", encoding="utf-8")]
        pairs = make_pairs(chats, rng)
        path = DATA / f"pairs_{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        print(f"wrote {len(pairs)} pairs (of {len(chats)} chats) to {path}")


if __name__ == "__main__":
    main()
