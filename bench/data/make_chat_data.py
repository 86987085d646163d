"""Write bench/data/chat_{train,valid}.jsonl: single-turn assistant chats of realistic, varied length.

    python bench/data/make_chat_data.py          # same files on every run (seeded)

The training benchmark needs data shaped like a person's fine-tuning set: a system prompt now and
then, a user turn, one assistant reply, and lengths from a few dozen tokens (a unit conversion) to
several hundred (a passage to summarise, an explanation in paragraphs). Six kinds of task are mixed:
short facts, date normalisation, rewriting a draft e-mail, explaining a topic, summarising a
passage, and writing a small Python function. Everything is generated from the word lists below
(no copied text). Single-turn only, so "assistant-only loss" trains the same tokens in every tool.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 5
COUNTS = {"train": 320, "valid": 48}
HERE = Path(__file__).resolve().parent

SYSTEMS = [None, None, "You are a helpful assistant.", "You are a concise assistant. Answer clearly.",
           "You are a friendly tutor who explains things step by step."]

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
            "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago", "India": "New Delhi", "Spain": "Madrid",
            "Vietnam": "Hanoi", "Poland": "Warsaw", "Ghana": "Accra", "Australia": "Canberra"}
UNITS = [("kilometres", "miles", 0.621371), ("kilograms", "pounds", 2.20462), ("litres", "US gallons", 0.264172),
         ("metres", "feet", 3.28084), ("hectares", "acres", 2.47105)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

TOPICS = {
    "photosynthesis": ("plants", "sunlight", "carbon dioxide", "glucose", "chlorophyll", "oxygen"),
    "compound interest": ("savings", "interest rate", "principal", "growth", "time", "balance"),
    "binary search": ("sorted list", "middle element", "half", "comparison", "target", "steps"),
    "the water cycle": ("evaporation", "clouds", "rain", "rivers", "the sun", "oceans"),
    "vaccines": ("immune system", "antibodies", "weakened virus", "protection", "doses", "memory cells"),
    "inflation": ("prices", "money supply", "central bank", "wages", "purchasing power", "interest rates"),
    "plate tectonics": ("crust", "mantle", "earthquakes", "mountains", "continents", "faults"),
    "recursion": ("function", "base case", "smaller problem", "call stack", "termination", "result"),
    "supply and demand": ("buyers", "sellers", "price", "quantity", "market", "shortage"),
    "neural networks": ("layers", "weights", "training data", "gradients", "predictions", "loss"),
}
OPENERS = ["At its core, {t} is about how {a} and {b} relate to each other.",
           "A simple way to think about {t} is to start with {a}.",
           "{T} sounds complicated, but the main idea fits in a few sentences.",
           "People often meet {t} first through {a}, so that is a good place to begin."]
MIDDLES = ["When {a} changes, {b} usually changes as well, and that link is what matters most.",
           "The role of {c} is easy to overlook, yet without it the whole process would stall.",
           "You can picture {d} as the step where everything comes together.",
           "In practice, {e} is what you would actually measure or observe.",
           "A common mistake is to assume that {a} alone decides the outcome; {f} matters just as much.",
           "Over a longer period, small differences in {c} add up to large differences in {e}.",
           "Scientists and engineers describe this with simple models that capture {b} and {d}.",
           "If you remove {f} from the picture, the result looks very different.",
           "This is why textbooks often draw a diagram with {a} on one side and {e} on the other."]
CLOSERS = ["In short, {t} connects {a} to {e} in a way you can reason about.",
           "If you remember one thing, remember how {b} drives {e}.",
           "Once this clicks, many related ideas become much easier to follow."]
ASK_EXPLAIN = ["Can you explain {t} to a beginner?", "What is {t}? Please keep it simple.",
               "I keep hearing about {t}. How does it work?",
               "Explain {t} in a few paragraphs, as if I were a high-school student."]

PEOPLE = ["Maria", "Tom", "Aisha", "Kenji", "Olga", "Daniel", "Priya", "Lucas"]
EMAIL_FACTS = ["the report is two days late", "the meeting moved to Thursday at 10",
               "the budget needs approval by Friday", "the client asked for a second draft",
               "the server migration is finished", "the new laptop order has shipped",
               "we still need the signed contract", "the training session is full"]
DRAFT_BITS = ["hey so basically {f}.", "just wanted to say that {f}, sorry about that.", "fyi {f} btw.",
              "also {f} so pls check.", "not sure if u saw but {f}."]

SUBJECTS = ["The town council", "A local bakery", "The research team", "A small software company",
            "The school board", "The hiking club", "A regional hospital", "The city library"]
VERBS = ["announced", "reviewed", "postponed", "launched", "expanded", "discussed", "approved", "tested"]
OBJECTS = ["a new recycling programme", "longer opening hours", "a pilot project for electric buses",
           "a plan to renovate the old station", "a weekend volunteer scheme", "an online booking system",
           "a survey of residents", "a training course for new staff"]
DETAILS = ["after months of debate", "following complaints from visitors", "with support from local donors",
           "despite a tight budget", "as part of a five-year plan", "after a successful trial in the spring"]
EFFECTS = ["Officials expect the change to save money over time.",
           "Some residents welcomed the news, while others asked for more details.",
           "The first results will be published at the end of the year.",
           "Critics argued that the timeline was too ambitious.",
           "Staff will receive additional training before the start.",
           "A public meeting is planned to answer questions."]

FUNCS = [("sum of the even numbers in a list", "sum_even", "numbers",
          "return sum(n for n in numbers if n % 2 == 0)", "sum_even([1, 2, 3, 4]) == 6"),
         ("number of vowels in a string", "count_vowels", "text",
          "return sum(1 for ch in text.lower() if ch in \"aeiou\")", "count_vowels(\"Banana\") == 3"),
         ("reverse the words of a sentence", "reverse_words", "sentence",
          "return \" \".join(reversed(sentence.split()))", "reverse_words(\"a b c\") == \"c b a\""),
         ("largest value in a dictionary", "max_value", "mapping",
          "return max(mapping.values()) if mapping else None", "max_value({\"a\": 1, \"b\": 5}) == 5"),
         ("check whether a string is a palindrome", "is_palindrome", "text",
          "cleaned = \"\".join(ch.lower() for ch in text if ch.isalnum())\n    return cleaned == cleaned[::-1]",
          "is_palindrome(\"Never odd or even\")"),
         ("remove duplicates from a list while keeping the order", "unique", "items",
          "seen = set()\n    return [x for x in items if not (x in seen or seen.add(x))]",
          "unique([3, 1, 3, 2, 1]) == [3, 1, 2]")]


def short_fact(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        q = rng.choice(["What is the capital of {c}?", "capital of {c}?", "Which city is the capital of {c}?"])
        return q.format(c=country), f"The capital of {country} is {CAPITALS[country]}."
    src, dst, k = rng.choice(UNITS)
    x = rng.randint(2, 500)
    return f"How many {dst} is {x} {src}?", f"{x} {src} is about {x * k:.1f} {dst}."


def date_fix(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    written = rng.choice([f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", f"{d}.{m:02d}.{y}"])
    return f"Convert {written} to ISO 8601.", f"{y}-{m:02d}-{d:02d}"


def email(rng: random.Random) -> tuple[str, str]:
    to, sender = rng.sample(PEOPLE, 2)
    facts = rng.sample(EMAIL_FACTS, rng.randint(2, 4))
    draft = " ".join(rng.choice(DRAFT_BITS).format(f=f) for f in facts)
    q = f"Rewrite this e-mail to {to} so it sounds professional and clear:\n\n{draft}\n\n- {sender}"
    body = " ".join(f"I wanted to let you know that {f}." if i == 0 else f"In addition, {f}."
                    for i, f in enumerate(facts))
    a = (f"Subject: Update\n\nDear {to},\n\n{body} Please let me know if you have any questions or if "
         f"anything needs my attention.\n\nBest regards,\n{sender}")
    return q, a


def explain(rng: random.Random) -> tuple[str, str]:
    t = rng.choice(sorted(TOPICS))
    a, b, c, d, e, f = TOPICS[t]
    fill = dict(t=t, T=t[0].upper() + t[1:], a=a, b=b, c=c, d=d, e=e, f=f)
    paras = []
    for _ in range(rng.randint(1, 6)):
        sents = [rng.choice(OPENERS)] + rng.sample(MIDDLES, rng.randint(2, 5))
        paras.append(" ".join(s.format(**fill) for s in sents))
    paras.append(rng.choice(CLOSERS).format(**fill))
    return rng.choice(ASK_EXPLAIN).format(t=t), "\n\n".join(paras)


def summarise(rng: random.Random) -> tuple[str, str]:
    subj, verb, obj, det = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(DETAILS)
    sents = [f"{subj} {verb} {obj} {det}."]
    for _ in range(rng.randint(3, 16)):
        sents.append(rng.choice(EFFECTS + [f"{rng.choice(SUBJECTS)} also {rng.choice(VERBS)} "
                                           f"{rng.choice(OBJECTS)} {rng.choice(DETAILS)}."]))
    passage = " ".join(sents)
    q = rng.choice(["Summarise this in one or two sentences:\n\n{p}", "TL;DR please:\n\n{p}",
                    "Give me a short summary of the following news item.\n\n{p}"]).format(p=passage)
    return q, f"{subj} {verb} {obj} {det}. The article also covers reactions and next steps."


def code(rng: random.Random) -> tuple[str, str]:
    what, name, arg, body, check = rng.choice(FUNCS)
    q = rng.choice(["Write a Python function that returns the {w}.", "python: {w}?",
                    "I need a small Python helper for the {w}, with a docstring and an example."]).format(w=what)
    a = (f"Here is a small function:\n\n```python\ndef {name}({arg}):\n    \"\"\"Return the {what}.\"\"\"\n"
         f"    {body}\n```\n\nFor example, `{check}` holds.")
    if rng.random() < 0.5:
        a += (" It runs in linear time, because it looks at each element once, and it does not modify "
              "its input, so it is safe to call on data you want to keep.")
    return q, a


KINDS = [(short_fact, 3), (date_fix, 2), (email, 2), (explain, 3), (summarise, 2), (code, 2)]


def example(rng: random.Random) -> dict:
    make = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    user, reply = make(rng)
    system = rng.choice(SYSTEMS)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs}


def main() -> None:
    rng = random.Random(SEED)
    for split, n in COUNTS.items():
        path = HERE / f"chat_{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(example(rng), ensure_ascii=False) + "\n")
        print(f"wrote {n} examples to {path}")


if __name__ == "__main__":
    main()
