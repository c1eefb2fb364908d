"""Up-front checks the dataset readers share: files and folders exist, JSON parses, every listed
image is there (or is dropped with a warning when asked), no split is left empty. Errors name
the offending file and list at most MAX_LISTED names."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from captioner.data.image_captions import CaptionDataset, DatasetError, ImageCaptions

MAX_LISTED = 10  # how many offending names an error message lists


def existing_file(path: str | Path) -> Path:
    """The absolute path of a file that exists and is not empty."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty")
    return path


def existing_dir(path: str | Path, what: str) -> Path:
    """The absolute path of a folder that exists (`what` names it in the error)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def read_json(path: Path) -> object:
    """A JSON file's value."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e


def first_names(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many more there are."""
    more = f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def drop_missing(
    items: list[ImageCaptions], image_root: Path, source: str, skip_missing: bool
) -> list[ImageCaptions]:
    """Check every image file exists, listing each folder once (fast at COCO scale)."""
    listings: dict[str, set[str]] = {}
    missing = []
    for item in items:
        folder, name = os.path.split(item.path)
        if folder not in listings:
            try:
                listings[folder] = {e.name for e in os.scandir(folder)}
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(item)
    if not missing:
        return items

    names = [os.path.relpath(m.path, image_root) for m in missing]
    message = f"{len(missing)} of {len(items)} images listed in {source} are missing"
    if not skip_missing:
        raise DatasetError(
            f"{message} from {image_root}: {first_names(names)} (pass skip_missing=True to drop them)"
        )
    warnings.warn(f"{message}; dropping them (first: {first_names(names)})", stacklevel=2)
    dropped = {id(m) for m in missing}
    return [item for item in items if id(item) not in dropped]


def non_empty(items: list[ImageCaptions], split: str, source: str | Path) -> list[ImageCaptions]:
    """The items, refused if the split has none."""
    if not items:
        raise DatasetError(f"split {split!r} from {source} has no images")
    return items


def checked_dataset(
    splits: dict[str, list[ImageCaptions]], image_root: Path, source: str, skip_missing: bool
) -> CaptionDataset:
    """Check images of all splits in one pass, then refuse any split left empty."""
    everything = [item for items in splits.values() for item in items]
    kept = {id(item) for item in drop_missing(everything, image_root, source, skip_missing)}
    return CaptionDataset(
        {
            split: non_empty([item for item in items if id(item) in kept], split, source)
            for split, items in splits.items()
        }
    )
