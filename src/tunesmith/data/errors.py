"""Data issues with codes: every problem names the file, the line (or record), the field and a code.

Readers and validators collect *all* issues of a file rather than stopping at the first, so a user
fixes a dataset in one pass; :class:`DataError` carries them and prints a bounded summary.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# One line per code: what it means. `tunesmith check` and the docs print this table.
CODES: dict[str, str] = {
    "E001": "empty file: no records (blank lines and a header alone do not count)",
    "E002": "file is not UTF-8 text",
    "E003": "malformed JSON",
    "E004": "record is not a JSON object (or the JSON top level is not a list / {\"data\": [...]})",
    "E005": "unknown format: the record's fields match no supported format",
    "E006": "missing field",
    "E007": "field has the wrong type",
    "E008": "unknown role",
    "E009": "empty content",
    "E010": "conversation has no assistant turn",
    "E011": "last turn is not an assistant turn (nothing to train on at the end)",
    "E012": "bad weight: must be 0 or 1, and only on assistant messages",
    "E013": "example longer than data.max_length (data.overflow: error)",
    "E014": "no trained tokens left after truncation to data.max_length",
    "E015": "too few examples (data.min_examples)",
    "E016": "file not found (or not set)",
    "E017": "unsupported file extension",
    "E018": "CSV header lacks the columns of the stated format, or of any supported format",
    "E019": "Parquet file unreadable, or its columns lack those of the stated (or any supported) format",
    "E020": "no trained tokens: every assistant message has weight 0",
    "E021": "record's format differs from the rest of the file",
    "E022": "chat template breaks the prefix property (cannot find assistant spans)",
    "E023": "chat template failed to render, or there is no chat template",
    "E024": "CSV row has a different number of values than the header",
    "E025": "conversation starts with an assistant turn (no prompt before it)",
    # Preference data (objectives dpo, orpo, simpo, kto; data/preference.py)
    "E026": "records for another objective: preference data read for sft, or sft (or KTO) data for a pair objective",
    "E027": "an answer must be exactly one assistant message (a string, or a list of one)",
    "E028": "the prompt must end with the user turn the answers reply to (a system turn only first)",
    "E029": "implicit prompt: chosen and rejected must share the prompt, then hold one assistant message each",
    "E030": "chosen and rejected are the same answer: the pair teaches nothing",
    "E031": "the chat template renders the prompt differently when an answer follows it (no shared prompt tokens)",
    "E032": "the prompt starts with two BOS tokens",
    "E033": "label must be true (desirable) or false",
    "E034": "tools are not supported in preference data yet",
    "E035": "a reinforcement fine-tuning row needs messages (ending with a user turn) or prompt",
    "E036": "a reinforcement fine-tuning prompt must end with a user turn (the model samples the answer)",
    # Captioned images (text-to-image; data/images.py)
    "E037": "image unreadable or truncated: Pillow cannot open, verify or decode every pixel of it",
    "E038": "missing caption: no same-named .txt next to the image, or an empty caption",
    "E039": "image not found: a row names a file that does not exist (paths are relative to the rows file)",
    "E040": "image smaller than the model's resolution (its short side, after EXIF orientation)",
    "E041": "image mode refused (palette, alpha, greyscale, 16-bit, CMYK or other non-RGB) with image modes set to refuse",
    "E042": "no images: the folder holds no image files (png, jpg, jpeg, webp, bmp, gif)",
    # Image uploads to the job server (archives and base64 rows; server/image_files.py)
    "E050": "unsafe archive member name: an absolute path or '..' (or a name twice)",
    "E051": "archive member is a link, device, FIFO or sparse file: only files and folders are accepted",
    "E052": "decompression bomb: the archive unpacks past its limit, or an image has more pixels than Pillow allows",
    "E053": "too many archive members",
    "E054": "archive unreadable: not a zip, tar or tar.gz Python can read",
    "E055": "image format not accepted (PNG, JPEG, WebP, BMP, GIF only), whatever its name says",
    "E056": "image not valid base64, or a data URL that is not data:image/...;base64,",
}

MAX_LISTED = 20


@dataclass(frozen=True)
class Issue:
    """One problem in the data.

    ``line`` is a 1-based line number for JSONL/CSV (``unit="line"``) or a 0-based record index for
    JSON/Parquet (``unit="record"``); ``None`` when the issue concerns a whole file or split.
    """

    code: str
    message: str
    path: str | None = None
    line: int | None = None
    field: str | None = None
    unit: str = "line"

    def where(self) -> str:
        if self.path is None:
            return ""
        if self.line is None:
            return self.path
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}[{self.line}]"

    def format(self) -> str:
        parts = [p for p in (self.where(), self.field) if p]
        loc = ": ".join(parts)
        return f"{loc}: {self.code} {self.message}" if loc else f"{self.code} {self.message}"

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "path": self.path, "line": self.line,
                "unit": self.unit, "field": self.field}


class DataError(Exception):
    """Bad input data; carries every issue found. ``str()`` is the user-facing summary."""

    def __init__(self, issues: list[Issue]):
        self.issues = list(issues)
        super().__init__(self.format())

    def codes(self) -> set[str]:
        return {i.code for i in self.issues}

    def format(self, limit: int = MAX_LISTED) -> str:
        n = len(self.issues)
        lines = [f"{n} data issue{'s' if n != 1 else ''} found:"]
        lines += ["  " + i.format() for i in self.issues[:limit]]
        if n > limit:
            lines.append(f"  ... and {n - limit} more. Issues by code:")
            for code, count in sorted(Counter(i.code for i in self.issues).items()):
                lines.append(f"    {code} x{count}: {CODES.get(code, '')}")
        return "\n".join(lines)
