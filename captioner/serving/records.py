"""The batch captioner's output files: one caption record a line, as JSONL or CSV.

Files are appended to and flushed record by record, read back to resume a run, and merged
across shards. File names that are not valid UTF-8 (old cameras, other operating systems)
round-trip exactly: Python sees them as strings with surrogate escapes (PEP 383); JSONL stores
those as JSON `\\udcXX` escapes (the file stays valid UTF-8 JSON, `json.loads` gives the same
string back and `os.fsencode` the original bytes), and CSV writes the name's original bytes.
CSV cells that a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage
return) are stored with a leading `'`, as OWASP recommends; reading strips it again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.files import atomic_write

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "caption", "score", "width", "height", "error")
CSV_FIELDS_N_BEST = ("path", "caption", "score", "width", "height", "alternatives", "error")
ENCODING, ERRORS = "utf-8", "surrogateescape"  # file names' undecodable bytes round-trip
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_SURROGATE = re.compile("[\udc80-\udcff]")


class OutputError(RuntimeError):
    """The output file (or attention folder) cannot be read back or written."""


def path_key(path: str | Path) -> str:
    """One name per file, whatever relative spelling found it."""
    return os.path.normpath(os.path.abspath(path))


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """The explicit format, else CSV for a .csv file and JSONL for anything else."""
    if fmt is None:
        return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose from {FORMATS}")
    return fmt


def neutralise_formula(cell: str) -> str:
    """A cell a spreadsheet would evaluate gets a leading quote (and so does one that already
    starts with a quote, so that reading back is unambiguous)."""
    return "'" + cell if cell.startswith((*FORMULA_START, "'")) else cell


def restore_formula(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def format_line(record: dict[str, Any], fmt: str, fields: Sequence[str] = CSV_FIELDS) -> str:
    if fmt == "jsonl":
        line = json.dumps(record, ensure_ascii=False)
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", line) + "\n"
    row = {k: record.get(k) for k in fields}
    if row.get("alternatives") is not None:
        row["alternatives"] = json.dumps(row["alternatives"], ensure_ascii=False)
    cells = ["" if v is None else neutralise_formula(v) if isinstance(v, str) else v for v in row.values()]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def csv_header(fields: Sequence[str]) -> str:
    return ",".join(fields) + "\n"


def parse_line(line: str, fmt: str, fields: Sequence[str] = CSV_FIELDS) -> dict[str, Any]:
    """One stored record -> dict with at least `path` and `error` (None when captioned)."""
    if fmt == "jsonl":
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise ValueError("not a record with a 'path'")
        return record
    values = next(csv.reader([line]))
    if len(values) != len(fields):
        raise ValueError(f"{len(values)} columns, expected {len(fields)}")
    row: dict[str, Any] = {k: restore_formula(v) for k, v in zip(fields, values, strict=True)}
    row["error"] = row["error"] or None
    return row


@dataclass
class ExistingOutput:
    lines: list[str]  # complete record lines (no header)
    records: list[dict[str, Any]]
    fields: tuple[str, ...] = CSV_FIELDS  # the CSV columns of the file

    def done(self) -> set[str]:
        return {path_key(r["path"]) for r in self.records if r["error"] is None}

    def failed(self) -> set[str]:
        return {path_key(r["path"]) for r in self.records if r["error"] is not None} - self.done()


def read_output(path: Path, fmt: str, fields: Sequence[str] = CSV_FIELDS) -> ExistingOutput:
    """Read the records of an earlier run (a CSV keeps the columns it was started with).

    A partial last line (a crash mid-write) is cut off the file, so appending continues on a
    clean line. Anything else that is not our format is an OutputError, and such a file is
    never modified: `-o` pointing at the wrong file must not damage it.
    """
    if not path.exists():
        return ExistingOutput([], [], tuple(fields))
    try:
        data = path.read_bytes()
        complete = data.rfind(b"\n") + 1
        text = data[:complete].decode(ENCODING, ERRORS)
    except OSError as err:
        raise OutputError(f"cannot read {path} as an earlier run's {fmt} output: {err}") from err
    lines = text.splitlines(keepends=True)
    headers = [csv_header(f) for f in (CSV_FIELDS, CSV_FIELDS_N_BEST)]
    first = csv_header(fields) if fmt == "csv" else '{"path": '
    if fmt == "csv" and lines:
        if lines[0] not in headers:
            raise OutputError(f"{path} is not a captions CSV (first line {lines[0].strip()!r}, "
                              f"expected {first.strip()!r}); pick another output file")
        fields = (CSV_FIELDS, CSV_FIELDS_N_BEST)[headers.index(lines[0])]
        lines = lines[1:]
    records = []
    for number, line in enumerate(lines, start=2 if fmt == "csv" else 1):
        try:
            records.append(parse_line(line, fmt, fields))
        except (ValueError, StopIteration) as err:
            raise OutputError(f"{path} line {number} is not a {fmt} caption record ({err}); "
                              "pick another output file or --format") from err
    tail = data[complete:]
    if tail:
        if complete == 0 and not (tail.startswith(first.encode()) or first.encode().startswith(tail)):
            raise OutputError(f"{path} is not a captions {fmt} file; pick another output file")
        try:
            os.truncate(path, complete)
        except OSError as err:
            raise OutputError(f"cannot repair the partial last line of {path}: {err}") from err
    return ExistingOutput(lines, records, tuple(fields))


def rewrite_output(path: Path, fmt: str, fields: Sequence[str], lines: Sequence[str]) -> None:
    """Replace the file's records atomically: a crash leaves the old file or the new one."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding=ENCODING, errors=ERRORS) as f:
            f.write((csv_header(fields) if fmt == "csv" else "") + "".join(lines))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)

    try:
        atomic_write(path, write)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err}") from err


def drop_failures(path: Path, fmt: str, existing: ExistingOutput, retry: set[str]) -> None:
    """Rewrite the output without the failure rows of files about to be retried."""
    kept = [line for line, r in zip(existing.lines, existing.records, strict=True)
            if r["error"] is None or path_key(r["path"]) not in retry]
    rewrite_output(path, fmt, existing.fields, kept)


def merge_outputs(sources: Sequence[Path], target: Path, fmt: str | None = None) -> tuple[int, int]:
    """Join shard outputs into one file, one record per image: a caption wins over an error,
    and the first of equals wins. Returns (records written, duplicates dropped)."""
    fmt = output_format(target, fmt)
    if target.exists():
        raise OutputError(f"{target} exists; merge into a new file")
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    fields: tuple[str, ...] | None = None
    total = 0
    for source in sources:
        existing = read_output(Path(source), fmt)
        if fmt == "csv" and existing.records and fields not in (None, existing.fields):
            raise OutputError(f"{source} has the columns {existing.fields}, the shards before it {fields}")
        fields = existing.fields if existing.records else fields
        for line, record in zip(existing.lines, existing.records, strict=True):
            total += 1
            key = path_key(record["path"])
            if key not in chosen or (chosen[key][1]["error"] is not None and record["error"] is None):
                chosen[key] = (line, record)
    rewrite_output(target, fmt, fields or CSV_FIELDS, [line for line, _ in chosen.values()])
    return len(chosen), total - len(chosen)


class RecordWriter:
    """Appends records, one line each, flushed as written; `sync` makes a batch durable."""

    def __init__(self, path: Path, fmt: str, fields: Sequence[str] = CSV_FIELDS):
        self.path, self.fmt, self.fields = path, fmt, tuple(fields)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", newline="", encoding=ENCODING, errors=ERRORS)
            if fmt == "csv" and self.file.tell() == 0:
                self.file.write(csv_header(self.fields))
                self.file.flush()
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err}") from err

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(format_line(record, self.fmt, self.fields))
            self.file.flush()
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err}") from err

    def sync(self) -> None:
        try:
            os.fsync(self.file.fileno())
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err}") from err

    def close(self) -> None:
        self.file.close()
