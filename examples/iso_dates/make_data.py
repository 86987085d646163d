"""Write the iso_dates example: free-form dates in a user's request, answered as ISO 8601 (YYYY-MM-DD).

    python examples/iso_dates/make_data.py          # writes train.jsonl, valid.jsonl, test.jsonl here

Every example is generated from a calendar date by this script (no copied data), seeded, so the
files are the same on every run. No calendar date appears in two splits, so the test set is held out
in the sense that matters: the tuned model has never seen the answer.

The conventions the model has to learn from the data (they are also what a person would assume):
  - slashes are ambiguous, so a slash date always carries a hint: "(US)" / "month first" is
    month/day, "(UK)" / "day first" is day/month;
  - dots ("03.04.2021") and "03-MAR-21" are day first, "2021/03/04" and "20210304" are year first;
  - a two-digit year is 20yy (two-digit years are only generated for 2000-2039).
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
from pathlib import Path

SEED = 20240303
SPLITS = {"train": 600, "valid": 60, "test": 60}
SYSTEM = "Convert the date to ISO 8601."

MONTHS = list(calendar.month_name)[1:]
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sept", "Oct", "Nov", "Dec"]
WEEKDAYS = list(calendar.day_name)
ORDINAL_WORDS = [
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third",
    "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth",
    "twenty-ninth", "thirtieth", "thirty-first",
]

# How people ask. {d} is the date as they wrote it.
REQUESTS = [
    "Convert {d} to ISO 8601.",
    "What is {d} in YYYY-MM-DD format?",
    "{d} -> ISO date please",
    "Normalise this date: {d}",
    "Can you give me the ISO 8601 form of \"{d}\"?",
    "The invoice is dated {d}. What's that as an ISO date?",
    "Reformat the date {d} as YYYY-MM-DD.",
    "date: {d}",
    "I need {d} written as year-month-day.",
    "Our flight leaves on {d}. ISO format?",
    "Put \"{d}\" into ISO format.",
    "Standardise the following date to ISO 8601: {d}",
    "Contract signed on {d}. ISO date?",
    "When written in ISO 8601, what is {d}?",
    "pls convert {d} to iso",
    "Birthday: {d}. Convert to YYYY-MM-DD.",
    "The deadline is {d}; give the date in ISO 8601.",
    "Turn {d} into an ISO-8601 date.",
    "For the database I need {d} as YYYY-MM-DD.",
    "{d}",
    "Delivery expected {d} - what's the ISO date?",
    "how do I write {d} in ISO 8601",
]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _month(d: dt.date, rng: random.Random) -> str:
    return MONTHS[d.month - 1] if rng.random() < 0.6 else MONTH_ABBR[d.month - 1] + rng.choice(["", "."])


def _pad(n: int, rng: random.Random) -> str:
    return f"{n:02d}" if rng.random() < 0.5 else str(n)


def _year(d: dt.date, rng: random.Random) -> str:
    # Two-digit years only where the rule "yy means 20yy" gives the right century.
    return f"{d.year % 100:02d}" if d.year >= 2000 and rng.random() < 0.4 else str(d.year)


def fmt_ordinal_of(d, rng):          # the 3rd of March, 2021
    return f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}{rng.choice([', ', ' '])}{d.year}"


def fmt_words(d, rng):               # the third of March 2021
    return f"the {ORDINAL_WORDS[d.day - 1]} of {MONTHS[d.month - 1]} {d.year}"


def fmt_month_first(d, rng):         # March 3, 2021 / Mar. 3rd 2021
    day = ordinal(d.day) if rng.random() < 0.3 else str(d.day)
    return f"{_month(d, rng)} {day}{rng.choice([', ', ' '])}{d.year}"


def fmt_day_first(d, rng):           # 3 March 2021 / 3rd Mar 2021
    day = ordinal(d.day) if rng.random() < 0.3 else str(d.day)
    return f"{day} {_month(d, rng)} {d.year}"


def fmt_weekday(d, rng):             # Wednesday, March 3, 2021 / Wed 3 Mar 2021
    wd = WEEKDAYS[d.weekday()]
    wd = wd if rng.random() < 0.6 else wd[:3]
    rest = fmt_month_first(d, rng) if rng.random() < 0.5 else fmt_day_first(d, rng)
    return f"{wd}{rng.choice([', ', ' '])}{rest}"


def fmt_slash_us(d, rng):            # 03/04/21 (US)
    hint = rng.choice(["(US)", "(US format)", "(month first)", "(MM/DD)"])
    return f"{_pad(d.month, rng)}/{_pad(d.day, rng)}/{_year(d, rng)} {hint}"


def fmt_slash_uk(d, rng):            # 04/03/2021 (UK)
    hint = rng.choice(["(UK)", "(UK format)", "(day first)", "(DD/MM)"])
    return f"{_pad(d.day, rng)}/{_pad(d.month, rng)}/{_year(d, rng)} {hint}"


def fmt_dotted(d, rng):              # 03.04.2021, European day first
    return f"{_pad(d.day, rng)}.{_pad(d.month, rng)}.{_year(d, rng)}"


def fmt_dd_mon_yy(d, rng):           # 03-MAR-21
    mon = MONTH_ABBR[d.month - 1][:3]
    mon = mon.upper() if rng.random() < 0.5 else mon
    return f"{d.day:02d}-{mon}-{_year(d, rng)}"


def fmt_year_first(d, rng):          # 2021/03/04 or 20210304
    if rng.random() < 0.3:
        return f"{d.year}{d.month:02d}{d.day:02d}"
    return f"{d.year}/{d.month:02d}/{d.day:02d}"


FORMATS = [fmt_ordinal_of, fmt_words, fmt_month_first, fmt_day_first, fmt_weekday, fmt_slash_us,
           fmt_slash_uk, fmt_dotted, fmt_dd_mon_yy, fmt_year_first]


def surface(d: dt.date, fmt, rng: random.Random) -> str:
    text = fmt(d, rng)
    # People type in lower case too; numeric forms are unaffected.
    return text.lower() if rng.random() < 0.15 else text


def example(d: dt.date, fmt, rng: random.Random) -> dict:
    request = rng.choice(REQUESTS).format(d=surface(d, fmt, rng))
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": request},
        {"role": "assistant", "content": d.isoformat()},
    ]}


def distinct_dates(n: int, rng: random.Random) -> list[dt.date]:
    """n different dates in 1950-2039; days above 12 are common, so most are not ambiguous anyway."""
    start, span = dt.date(1950, 1, 1), (dt.date(2039, 12, 31) - dt.date(1950, 1, 1)).days
    chosen: set[dt.date] = set()
    while len(chosen) < n:
        chosen.add(start + dt.timedelta(days=rng.randrange(span + 1)))
    return sorted(chosen)


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    dates = distinct_dates(sum(SPLITS.values()), rng)
    rng.shuffle(dates)
    splits, at = {}, 0
    for name, n in SPLITS.items():
        # Cycle through the formats so every split covers each of them evenly.
        splits[name] = [example(d, FORMATS[i % len(FORMATS)], rng) for i, d in enumerate(dates[at:at + n])]
        rng.shuffle(splits[name])
        at += n
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder for the .jsonl files")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_splits(args.seed).items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
