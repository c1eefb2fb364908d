"""Your own data: (image, caption) rows in a .csv or .jsonl file."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from captioner.data.image_captions import DatasetError, ImageCaptions
from captioner.data.readers.checks import drop_missing, existing_dir, existing_file, non_empty


def load_pairs(
    file: str | Path, image_root: str | Path | None = None, *, skip_missing: bool = False
) -> list[ImageCaptions]:
    """Read (image, caption) rows from a .csv (header with `image`, `caption`) or .jsonl file.

    Rows of the same image are grouped. Relative image paths resolve against `image_root`,
    or the file's own folder when no root is given.
    """
    file = existing_file(file)
    root = existing_dir(image_root if image_root is not None else file.parent, "image root")
    if file.suffix.lower() == ".csv":
        rows = _read_csv_rows(file)
    elif file.suffix.lower() in (".jsonl", ".ndjson"):
        rows = read_jsonl_rows(file)
    else:
        raise DatasetError(f"{file}: unsupported pairs format (expected .csv or .jsonl)")

    grouped: dict[str, list[str]] = {}
    for line_no, image, caption in rows:
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{file}:{line_no}: missing image path")
        if not isinstance(caption, str):
            raise DatasetError(f"{file}:{line_no}: caption must be a string, got {caption!r}")
        captions = grouped.setdefault(image.strip(), [])
        if caption.strip():
            captions.append(caption.strip())
    items = [
        ImageCaptions(image_id=image, path=root / image, captions=captions)
        for image, captions in grouped.items()
        if captions
    ]
    if not items:
        raise DatasetError(f"{file}: no captions")
    items = drop_missing(items, root, str(file), skip_missing)
    return non_empty(items, "pairs", file)


def _read_csv_rows(file: Path) -> Iterable[tuple[int, object, object]]:
    with file.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(
                f"{file}: header must have 'image' and 'caption' columns, got {reader.fieldnames}"
            )
        return [(reader.line_num, row["image"], row["caption"]) for row in reader]


def read_jsonl_rows(file: Path) -> Iterable[tuple[int, object, object]]:
    rows = []
    with file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{file}:{line_no}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise DatasetError(f'{file}:{line_no}: expected {{"image": ..., "caption": ...}}')
            rows.append((line_no, row["image"], row["caption"]))
    return rows
