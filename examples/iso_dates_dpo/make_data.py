"""Write the iso_dates_dpo example: preference pairs where the chosen answer is the ISO date alone and
the rejected answer is what the base model itself says.

    python examples/iso_dates_dpo/make_data.py      # writes train.jsonl, valid.jsonl, test.jsonl here (~10 min on 2 CPU cores)

The prompts (system + user message) and ISO answers are those of ../iso_dates (read from its
train/valid/test.jsonl, so the test dates stay unseen). For each prompt the built-in
smollm2-135m-instruct answers once, greedy, fp32, 48 new tokens at most, with tunesmith's own
`generate_batch`; that answer is the rejected one, the bare ISO date the chosen one. A prompt the base
model already answers with exactly the ISO date is skipped, so in every pair the base model prefers
the rejected behaviour: this is on-policy DPO data, the preference "say the date, nothing else".

Which prompts are used is seeded; greedy decoding in fp32 gives the same answers on the same CPU
build of torch (a different kernel may change the odd token of a long ramble).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240304
HERE = Path(__file__).parent
SOURCE = HERE.parent / "iso_dates"
# split here: (split of iso_dates it comes from, pairs wanted, prompts to try: a few spare for skips)
SPLITS = {"train": ("train", 300, 330), "valid": ("valid", 40, 60), "test": ("test", 60, 60)}
MAX_NEW_TOKENS = 48


def read_prompts(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages: system and user, ISO answer) for each line of an iso_dates file."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        assert messages[-1]["role"] == "assistant", f"{path}: a line does not end with the answer"
        rows.append((messages[:-1], messages[-1]["content"]))
    return rows


def pair(prompt: list[dict], chosen: str, rejected: str) -> dict:
    """One pair in OpenAI's preference fine-tuning format."""
    return {"input": {"messages": prompt},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the .jsonl files")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the model whose answers are rejected")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from tunesmith.evaluate import generate_batch
    from tunesmith.models import load_for_inference

    rng = random.Random(args.seed)
    todo = {}
    for name, (source, _, tries) in SPLITS.items():
        rows = read_prompts(SOURCE / f"{source}.jsonl")
        todo[name] = rng.sample(rows, min(tries, len(rows)))

    model, tok = load_for_inference(args.model, dtype=torch.float32, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in todo.items():
        answers = generate_batch(model, tok, [p for p, _ in rows], max_new_tokens=MAX_NEW_TOKENS,
                                 batch_size=args.batch_size)
        pairs = [pair(p, iso, said) for (p, iso), said in zip(rows, answers) if said.strip() != iso]
        skipped = len(rows) - len(pairs)
        pairs = pairs[:SPLITS[name][1]]
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")
        print(f"{path}: {len(pairs)} pairs ({skipped} of {len(rows)} prompts skipped: the base model "
              f"already answered the ISO date alone)", flush=True)


if __name__ == "__main__":
    main()
