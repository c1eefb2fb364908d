"""The batch captioner's output files: one caption record a line, as JSONL or CSV.

Files are appended to and flushed record by record, read back to resume a run, and merged
across shards. File names that are not valid UTF-8 (old cameras, other operating systems)
round-trip exactly: Python sees them as strings with surrogate escapes (PEP 383); JSONL stores
those as JSON `\\udcXX` escapes (the file stays valid UTF-8 JSON, `json.loads` gives the same
string back and `os.fsencode` the original bytes), and CSV writes the name's original bytes.
CSV cells that a spreadsheet would run as a formula (starting with = + - @, a tab or a carriage
return) are stored with a leading `'`, as OWASP recommends; reading strips it again.

Only regular files are read back: a pipe, FIFO or device (`-o /dev/stdout`) is written to as a
stream, without resume. One run at a time writes a file: `locked_output` holds a lock on a
hidden sidecar file (`.NAME.lock`) beside it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.files import LockedError, atomic_write, exclusive_lock

if TYPE_CHECKING:
    from captioner.model.results import CaptionResult

FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "caption", "score", "width", "height", "error")
JSON_CELLS = ("alternatives", "focus", "evidence")  # CSV cells holding JSON (n-best, box, evidence)
ENCODING, ERRORS = "utf-8", "surrogateescape"  # file names' undecodable bytes round-trip
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_SURROGATE = re.compile("[\udc80-\udcff]")


class OutputError(RuntimeError):
    """The output file (or attention folder) cannot be read back or written."""


def csv_fields(alternatives: bool = False, focus: bool = False, evidence: bool = False) -> tuple[str, ...]:
    """The CSV columns: with `alternatives` for n-best runs, `focus` for --focus-json runs,
    `evidence` for --evidence runs."""
    optional = ("alternatives",) * alternatives + ("focus",) * focus + ("evidence",) * evidence
    return (*CSV_FIELDS[:-1], *optional, "error")


def csv_header(fields: Sequence[str]) -> str:
    return ",".join(fields) + "\n"


CSV_HEADERS = {csv_header(f): f for f in itertools.starmap(csv_fields, itertools.product((0, 1), repeat=3))}


def is_stream(path: str | Path) -> bool:
    """A pipe, FIFO, terminal or device (`-o /dev/stdout`): written as it comes, never read back."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


@contextmanager
def locked_output(output: Path) -> Iterator[None]:
    """Run the block as the only writer of `output`; OutputError at once if another run (of
    any process) holds it. Streams are not locked."""
    if is_stream(output):
        yield
        return
    lock = lock_path(output)
    with ExitStack() as stack:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(exclusive_lock(lock, wait=False))
        except LockedError as err:
            raise OutputError(
                f"another captioner run is writing {output} ({err.holder}); "
                "wait for it to end or pick another output file"
            ) from None
        except OSError as err:
            raise OutputError(f"cannot lock {output} (via {lock}): {err}") from err
        yield


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
    for k in JSON_CELLS:
        if row.get(k) is not None:
            row[k] = json.dumps(row[k], ensure_ascii=False)
    cells = ["" if v is None else neutralise_formula(v) if isinstance(v, str) else v for v in row.values()]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


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


def success_record(
    path: str,
    result: CaptionResult,
    size: tuple[int, int],
    alternatives: bool = False,
    evidence: bool = False,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "path": path,
        "caption": result.text,
        "score": round(result.score, 4),
        "width": size[0],
        "height": size[1],
    }
    if alternatives:
        record["alternatives"] = [
            {"caption": a.text, "score": round(a.score, 4)} for a in result.alternatives
        ]
    if evidence:
        record["evidence"] = evidence_field(result)
    record["error"] = None
    return record


def evidence_field(result: CaptionResult) -> dict[str, list[dict[str, Any]]] | None:
    """What the encoder's ImageNet classifier saw (captioner.model.evidence): its top labels, best
    first, and the caption's words it has evidence for; None for a result without evidence."""
    if result.evidence is None:
        return None
    found = zip(result.words, result.word_evidence or [], strict=True)
    words = [{"word": word} | _evidence_item(e) for word, e in found if e is not None]
    return {"labels": [_evidence_item(e) for e in result.evidence], "words": words}


def _evidence_item(e: Any) -> dict[str, Any]:
    return {"label": e.label, "category": e.category, "probability": round(e.probability, 4)}


def failure_record(path: str, error: str) -> dict[str, Any]:
    empty = dict.fromkeys(("caption", "score", "width", "height"))
    return {"path": path} | empty | {"error": " ".join(error.split())}  # one line, so every record is one


@dataclass
class ExistingOutput:
    lines: list[str]  # complete record lines (no header)
    records: list[dict[str, Any]]
    fields: tuple[str, ...] = CSV_FIELDS  # the CSV columns of the file

    def done(self) -> set[str]:
        return {path_key(r["path"]) for r in self.records if r["error"] is None}

    def failed(self) -> set[str]:
        return {path_key(r["path"]) for r in self.records if r["error"] is not None} - self.done()


def read_output(
    path: Path, fmt: str, fields: Sequence[str] = CSV_FIELDS, *, repair: bool = True
) -> ExistingOutput:
    """Read the records of an earlier run (a CSV keeps the columns it was started with).

    Only regular files are read: a stream (pipe, FIFO, device) holds no earlier run. A CSV
    re-saved by a spreadsheet (CRLF line ends, a byte-order mark) reads like ours. A last line
    without its newline is kept when it is a complete record (a file edited by hand); otherwise
    it is a partial line (a crash mid-write). With `repair` the file is then made to end on a
    clean line (the newline added, or the partial line cut off) so that appending can go on.
    Anything else that is not our format is an OutputError, and such a file is never modified:
    `-o` pointing at the wrong file must not damage it.
    """
    if not path.exists() or is_stream(path):
        return ExistingOutput([], [], tuple(fields))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise OutputError(f"cannot read {path} as an earlier run's {fmt} output: {err}") from err
    *lines, tail = data.decode(ENCODING, ERRORS).removeprefix("\ufeff").split("\n")
    lines = [line.removesuffix("\r") + "\n" for line in lines]
    fields, lines, records = _parse(path, fmt, tuple(fields), lines)
    if not tail:
        return ExistingOutput(lines, records, fields)
    last = tail.removesuffix("\r") + "\n"
    complete_header = fmt == "csv" and not data.count(b"\n") and last in CSV_HEADERS
    record = None if complete_header else _record_or_none(last, fmt, fields)
    if complete_header or record is not None:
        fields = CSV_HEADERS[last] if complete_header else fields
        lines, records = (lines, records) if record is None else ([*lines, last], [*records, record])
        _repair(path, repair, lambda f: f.write(b"\n"))
    else:
        starts = CSV_HEADERS if fmt == "csv" else ['{"path": ']
        if not data.count(b"\n") and not any(s.startswith(tail) or tail.startswith(s) for s in starts):
            raise OutputError(f"{path} is not a captions {fmt} file; pick another output file")
        _repair(path, repair, lambda f: f.truncate(data.rfind(b"\n") + 1))
    return ExistingOutput(lines, records, fields)


def _parse(
    path: Path, fmt: str, fields: tuple[str, ...], lines: list[str]
) -> tuple[tuple[str, ...], list[str], list[dict[str, Any]]]:
    """(columns, record lines, records) of complete lines, a CSV's header first; an OutputError
    names the first line that is not ours."""
    if fmt == "csv" and lines:
        if lines[0] not in CSV_HEADERS:
            raise OutputError(
                f"{path} is not a captions CSV (first line {lines[0].strip()!r}, "
                f"expected {csv_header(fields).strip()!r}); pick another output file"
            )
        fields, lines = CSV_HEADERS[lines[0]], lines[1:]
    records = []
    for number, line in enumerate(lines, start=2 if fmt == "csv" else 1):
        try:
            records.append(parse_line(line, fmt, fields))
        except (ValueError, StopIteration) as err:
            raise OutputError(
                f"{path} line {number} is not a {fmt} caption record ({err}); "
                "pick another output file or --format"
            ) from err
    return fields, lines, records


def _record_or_none(line: str, fmt: str, fields: Sequence[str]) -> dict[str, Any] | None:
    try:
        return parse_line(line, fmt, fields)
    except (ValueError, StopIteration):
        return None


def _repair(path: Path, repair: bool, change: Any) -> None:
    """Apply `change` to the file opened for binary update, when repairing."""
    if not repair:
        return
    try:
        with open(path, "r+b") as f:
            f.seek(0, os.SEEK_END)
            change(f)
    except OSError as err:
        raise OutputError(f"cannot repair the last line of {path}: {err}") from err


def rewrite_output(path: Path, fmt: str, fields: Sequence[str], lines: Sequence[str]) -> None:
    """Replace the file's records atomically: a crash leaves the old file or the new one. A
    stream is written to directly."""
    text = (csv_header(fields) if fmt == "csv" else "") + "".join(lines)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding=ENCODING, errors=ERRORS) as f:
            f.write(text)
            f.flush()
            if not is_stream(tmp):
                os.fsync(f.fileno())
        if path.exists() and not is_stream(path):
            shutil.copymode(path, tmp)

    try:
        if is_stream(path):
            write(str(path))
        else:
            atomic_write(path, write)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err}") from err


def drop_failures(path: Path, fmt: str, existing: ExistingOutput, retry: set[str]) -> None:
    """Rewrite the output without the failure rows of files about to be retried."""
    kept = [
        line
        for line, r in zip(existing.lines, existing.records, strict=True)
        if r["error"] is None or path_key(r["path"]) not in retry
    ]
    rewrite_output(path, fmt, existing.fields, kept)


def merge_outputs(sources: Sequence[Path], target: Path, fmt: str | None = None) -> tuple[int, int]:
    """Join shard outputs into one file, one record per image: a caption wins over an error,
    and the first of equals wins. Only reads its sources (a partial last line is left out, not
    cut off). Returns (records written, duplicates dropped)."""
    fmt = output_format(target, fmt)
    if target.exists() and not is_stream(target):
        raise OutputError(f"{target} exists; merge into a new file")
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    fields: tuple[str, ...] | None = None
    total = 0
    for source in sources:
        existing = read_output(Path(source), fmt, repair=False)
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
    """Appends records, one line each, flushed as written; `sync` makes a batch durable. As a
    context manager it closes the file, and an error on the way out is not hidden by one from
    closing (a full disk fails both)."""

    def __init__(self, path: Path, fmt: str, fields: Sequence[str] = CSV_FIELDS):
        self.path, self.fmt, self.fields = path, fmt, tuple(fields)
        self.stream = is_stream(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", newline="", encoding=ENCODING, errors=ERRORS)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {err}") from err
        if fmt == "csv" and (self.stream or self.file.tell() == 0):
            try:
                self.file.write(csv_header(self.fields))
                self.file.flush()
            except OSError as err:
                with suppress(OSError):
                    self.file.close()
                raise OutputError(f"cannot write {path}: {err}") from err

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(format_line(record, self.fmt, self.fields))
            self.file.flush()
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err}") from err

    def sync(self) -> None:
        """Make the records written so far durable (streams: nothing to do)."""
        if self.stream:
            return
        try:
            os.fsync(self.file.fileno())
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err}") from err

    def close(self) -> None:
        try:
            self.file.close()  # closes the file even when its last bytes cannot be written
        except OSError as err:
            raise OutputError(f"cannot write {self.path}: {err}") from err

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with suppress(OSError):
                self.file.close()
