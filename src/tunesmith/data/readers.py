"""File readers: JSONL, JSON, CSV and Parquet in, raw records with their origin out.

Readers only parse; turning a record into an :class:`Example` is ``formats``' job. Each reader
returns every issue it finds instead of stopping at the first. A UTF-8 byte-order mark and CRLF
line endings are accepted everywhere (spreadsheet exports on Windows write both).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Issue
from .example import Origin

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_BOM = b"\xef\xbb\xbf"
# Chat columns are nested lists; in a CSV they can only be JSON text, so we parse them.
_JSON_COLUMNS = ("messages", "conversations")


@dataclass
class RawFile:
    """What a reader found: records (any JSON value) with origins, column names for tabular files, issues."""

    path: str
    records: list[tuple[Any, Origin]] = field(default_factory=list)
    columns: list[str] | None = None
    issues: list[Issue] = field(default_factory=list)


def read_file(path: str | Path) -> RawFile:
    p = Path(path)
    raw = RawFile(str(path))
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raw.issues.append(Issue("E017", f"unsupported extension {ext or '(none)'!r}: use one of "
                                        f"{', '.join(EXTENSIONS)}", raw.path))
        return raw
    if not p.is_file():
        raw.issues.append(Issue("E016", "file not found (paths in a config file are relative to the config file)",
                                raw.path))
        return raw
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[ext]
    reader(p, raw)
    if not raw.records and not raw.issues:
        raw.issues.append(Issue("E001", "empty file: it holds no records", raw.path))
    return raw


def _decode(data: bytes, raw: RawFile) -> str | None:
    """Whole-file UTF-8 decoding; on failure report the line of the first bad byte."""
    try:
        return data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raw.issues.append(Issue("E002", f"not UTF-8 (byte {data[e.start]:#04x}); re-save the file as UTF-8",
                                raw.path, line))
        return None


_TOO_DEEP = "malformed JSON: nested too deeply (arrays or objects inside each other beyond Python's recursion limit)"


def _read_jsonl(p: Path, raw: RawFile) -> None:
    data = p.read_bytes().removeprefix(_BOM)
    for n, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()  # strip() also removes the \r of CRLF
        except UnicodeDecodeError as e:
            raw.issues.append(Issue("E002", f"not UTF-8 (byte {line[e.start]:#04x}); re-save the file as UTF-8",
                                    raw.path, n))
            continue
        if not text:
            continue
        try:
            raw.records.append((json.loads(text), Origin(raw.path, n)))
        except json.JSONDecodeError as e:
            raw.issues.append(Issue("E003", f"malformed JSON at column {e.colno}: {e.msg}", raw.path, n))
        except RecursionError:  # e.g. "[" x 100,000: Python's decoder recurses once per level
            raw.issues.append(Issue("E003", _TOO_DEEP, raw.path, n))


def _read_json(p: Path, raw: RawFile) -> None:
    text = _decode(p.read_bytes(), raw)
    if text is None:
        return
    if not text.strip():
        return  # read_file reports E001
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one JSON object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raw.issues.append(Issue("E003", f"malformed JSON at column {e.colno}: {e.msg}{hint}", raw.path, e.lineno))
        return
    except RecursionError:
        raw.issues.append(Issue("E003", _TOO_DEEP, raw.path))
        return
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        top = top["data"]
    if not isinstance(top, list):
        raw.issues.append(Issue("E004", 'the top level must be a list of records or {"data": [...]}', raw.path))
        return
    raw.records = [(rec, Origin(raw.path, i, "record")) for i, rec in enumerate(top)]


def _read_csv(p: Path, raw: RawFile) -> None:
    text = _decode(p.read_bytes(), raw)
    if text is None:
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    raw.columns = [h.strip() for h in header]
    start = reader.line_num + 1  # a quoted cell may span lines: a record starts after the previous one ends
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(raw.columns):
            raw.issues.append(Issue("E024", f"row has {len(row)} values but the header has {len(raw.columns)} "
                                            "columns (quote cells that contain commas)", raw.path, line))
            continue
        rec = dict(zip(raw.columns, row))
        if _parse_json_cells(rec, raw, line):
            raw.records.append((rec, Origin(raw.path, line)))


def _parse_json_cells(rec: dict, raw: RawFile, line: int) -> bool:
    ok = True
    for col in _JSON_COLUMNS:
        if isinstance(rec.get(col), str) and rec[col].strip():
            try:
                rec[col] = json.loads(rec[col])
            except json.JSONDecodeError as e:
                raw.issues.append(Issue("E003", f"cell is not valid JSON ({e.msg}); a {col} column holds a JSON list",
                                        raw.path, line, col))
                ok = False
    return ok


def _read_parquet(p: Path, raw: RawFile) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for corrupt/non-parquet files
        raw.issues.append(Issue("E019", f"cannot read as Parquet: {e}", raw.path))
        return
    raw.columns = list(table.column_names)
    raw.records = [(rec, Origin(raw.path, i, "record")) for i, rec in enumerate(table.to_pylist())]
