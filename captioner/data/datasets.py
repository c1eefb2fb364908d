"""Caption dataset readers: COCO, Karpathy splits, Flickr8k/30k and CSV/JSONL pairs.

Every reader returns the same plain structure (image path + raw captions), validates its inputs
up front and names the offending file in its errors, so a bad path fails in seconds rather than
hours into training.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pycocotools.coco import COCO

from captioner.data.config import DataConfig

FLICKR_TOKEN_FILES = ("Flickr8k.token.txt", "results_20130124.token")
FLICKR_IMAGE_DIRS = (
    "images",
    "Images",
    "Flicker8k_Dataset",
    "Flickr8k_Dataset",
    "flickr30k-images",
)
FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_LISTED = 10  # how many offending names an error message lists


class DatasetError(ValueError):
    """A dataset file or folder is missing, empty or malformed."""


@dataclass
class ImageCaptions:
    image_id: str  # stable id (COCO: str(image id); Flickr: file name)
    path: Path  # absolute path to the image file
    captions: list[str]  # raw caption strings, as written by annotators
    coco_id: int | None = None  # numeric COCO id when there is one (for the results JSON)


@dataclass
class CaptionDataset:
    splits: dict[str, list[ImageCaptions]]

    def __getitem__(self, split: str) -> list[ImageCaptions]:
        if split not in self.splits:
            raise DatasetError(
                f"no {split!r} split in this dataset (it has: {sorted(self.splits)})"
            )
        return self.splits[split]


# ----------------------------------------------------------------------------- COCO


def load_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    split_name: str = "train",
    *,
    skip_missing: bool = False,
) -> list[ImageCaptions]:
    """Read a COCO-format caption file (e.g. captions_train2014.json) with pycocotools."""
    annotation_file = _existing_file(annotation_file)
    image_dir = _existing_dir(image_dir, f"image folder for {annotation_file.name}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(annotation_file))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{annotation_file}: not valid JSON ({e})") from e
    except (AssertionError, KeyError, TypeError) as e:
        raise DatasetError(f"{annotation_file}: not a COCO annotation file ({e!r})") from e

    items = []
    for k, image in enumerate(coco.dataset.get("images", [])):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DatasetError(f"{annotation_file}: images[{k}] needs an 'id' and a 'file_name'")
        captions = [
            a["caption"].strip()
            for a in coco.imgToAnns.get(image["id"], [])
            if isinstance(a.get("caption"), str) and a["caption"].strip()
        ]
        if captions:
            items.append(ImageCaptions(str(image["id"]), image_dir / image["file_name"], captions,
                                       coco_id=int(image["id"])))
    if not items:
        raise DatasetError(
            f"{annotation_file}: no images with captions "
            "(is this a captions_*.json file rather than instances_*.json?)"
        )
    items = _drop_missing(items, image_dir, str(annotation_file), skip_missing)
    return _non_empty(items, split_name, annotation_file)


# ----------------------------------------------------------------------------- Karpathy splits


def load_karpathy(
    split_json: str | Path, image_root: str | Path, *, skip_missing: bool = False
) -> CaptionDataset:
    """Read Karpathy's dataset_{coco,flickr8k,flickr30k}.json; `restval` joins train.

    For COCO, `image_root` holds train2014/ and val2014/ (the json's `filepath`); for Flickr it
    is the folder with the images themselves.
    """
    split_json = _existing_file(split_json)
    image_root = _existing_dir(image_root, f"image folder for {split_json.name}")
    data = _read_json(split_json)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{split_json}: expected a JSON object with an 'images' list")

    splits: dict[str, list[ImageCaptions]] = {}
    for i, image in enumerate(images):
        try:
            split = KARPATHY_SPLITS[image["split"]]
            path = image_root / image.get("filepath", "") / image["filename"]
            captions = [s["raw"].strip() for s in image["sentences"] if s["raw"].strip()]
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(
                f"{split_json}: images[{i}] is malformed ({e!r}); expected 'filename', "
                f"'split' in {sorted(KARPATHY_SPLITS)} and 'sentences' with 'raw' captions"
            ) from e
        if not captions:
            continue
        coco_id = image.get("cocoid")
        splits.setdefault(split, []).append(ImageCaptions(
            image_id=str(coco_id) if coco_id is not None else image["filename"], path=path,
            captions=captions, coco_id=int(coco_id) if coco_id is not None else None))
    if not splits:
        raise DatasetError(f"{split_json}: no images with captions")
    return _checked_dataset(splits, image_root, str(split_json), skip_missing)


# ----------------------------------------------------------------------------- Flickr8k / 30k


def load_flickr(root: str | Path, *, skip_missing: bool = False) -> CaptionDataset:
    """Read the Flickr8k (or Flickr30k) release layout.

    `root` holds the token file (Flickr8k.token.txt or Flickr30k's results_20130124.token) and
    an image folder (images/, Images/, Flicker8k_Dataset/ or flickr30k-images/). Splits come
    from Flickr_8k.{train,dev,test}Images.txt (dev -> "val"; only train is required); without
    them, a Karpathy dataset_flickr*.json in `root` is used; failing that, a Flickr30k token
    file puts every image in train.
    """
    root = _existing_dir(root, "Flickr dataset folder")
    image_dir = _flickr_image_dir(root)
    has_split_lists = (root / FLICKR_SPLIT_FILES["train"]).is_file()
    karpathy = sorted(root.glob("dataset_flickr*.json"))
    if not has_split_lists and karpathy:
        return load_karpathy(karpathy[0], image_dir, skip_missing=skip_missing)

    token_file = next((root / n for n in FLICKR_TOKEN_FILES if (root / n).is_file()), None)
    if token_file is None:
        raise DatasetError(f"{root}: no caption file (expected one of {FLICKR_TOKEN_FILES})")
    captions = _read_flickr_tokens(token_file)

    if has_split_lists:
        names = {split: _read_name_list(root / file) for split, file in FLICKR_SPLIT_FILES.items()
                 if (root / file).is_file()}
    elif token_file.name == FLICKR_TOKEN_FILES[0]:
        raise DatasetError(
            f"{root}: missing {FLICKR_SPLIT_FILES['train']} (needed to split Flickr8k; "
            "or put Karpathy's dataset_flickr8k.json there)"
        )
    else:
        names = {"train": list(captions)}

    splits = {}
    for split, split_names in names.items():
        source = root / FLICKR_SPLIT_FILES.get(split, token_file.name)
        uncaptioned = [n for n in split_names if n not in captions]
        if uncaptioned and not skip_missing:
            raise DatasetError(
                f"{len(uncaptioned)} images listed in {source} have no captions in "
                f"{token_file.name}: {_first(uncaptioned)} (pass skip_missing=True to drop them)"
            )
        if uncaptioned:
            warnings.warn(f"dropping {len(uncaptioned)} images of {source} without captions", stacklevel=2)
        kept = [ImageCaptions(image_id=n, path=image_dir / n, captions=captions[n])
                for n in split_names if n in captions]
        splits[split] = _non_empty(kept, split, source)
    listed_in = root / "Flickr_8k.*Images.txt" if has_split_lists else token_file
    return _checked_dataset(splits, image_dir, str(listed_in), skip_missing)


def _flickr_image_dir(root: Path) -> Path:
    for name in FLICKR_IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"{root}: no image folder (expected one of {FLICKR_IMAGE_DIRS})")


def _read_flickr_tokens(token_file: Path) -> dict[str, list[str]]:
    """`<file>#<n>\\t<caption>` lines -> {file: [captions in file order]}."""
    captions: dict[str, list[str]] = {}
    with token_file.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\r\n").partition("\t")
            name, hash_, _ = key.rpartition("#")
            if not tab or not hash_ or not name:
                raise DatasetError(
                    f"{token_file}:{line_no}: malformed line {line.strip()[:80]!r} "
                    "(expected '<image file>#<n><TAB><caption>')"
                )
            if caption.strip():
                captions.setdefault(name, []).append(caption.strip())
    if not captions:
        raise DatasetError(f"{token_file}: no captions")
    return captions


def _read_name_list(path: Path) -> list[str]:
    """One image file name per line; blank lines and repeats ignored."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(n for n in names if n))


# ----------------------------------------------------------------------------- CSV / JSONL pairs


def load_pairs(
    file: str | Path, image_root: str | Path | None = None, *, skip_missing: bool = False
) -> list[ImageCaptions]:
    """Read (image, caption) rows from a .csv (header with `image`, `caption`) or .jsonl file.

    Rows of the same image are grouped. Relative image paths resolve against `image_root`,
    or the file's own folder when no root is given.
    """
    file = _existing_file(file)
    root = _existing_dir(image_root if image_root is not None else file.parent, "image root")
    if file.suffix.lower() == ".csv":
        rows = _read_csv_rows(file)
    elif file.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _read_jsonl_rows(file)
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
    items = _drop_missing(items, root, str(file), skip_missing)
    return _non_empty(items, "pairs", file)


def _read_csv_rows(file: Path) -> Iterable[tuple[int, object, object]]:
    with file.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(
                f"{file}: header must have 'image' and 'caption' columns, got {reader.fieldnames}"
            )
        return [(reader.line_num, row["image"], row["caption"]) for row in reader]


def _read_jsonl_rows(file: Path) -> Iterable[tuple[int, object, object]]:
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


# ----------------------------------------------------------------------------- dispatcher


DATASET_PATHS = {
    "flickr": ({"root"}, {"root"}),  # (paths it takes, paths it requires)
    "karpathy": ({"split_json", "image_root"}, {"split_json", "image_root"}),
    "coco": ({"train", "train_images", "val", "val_images"}, {"train", "train_images"}),
    "pairs": ({"train", "val", "image_root"}, {"train"}),
}
ALL_PATHS = set().union(*(takes for takes, _ in DATASET_PATHS.values()))


def load_dataset(config: DataConfig) -> CaptionDataset:
    """One entry point for command lines and training: reads the dataset `config` names."""
    if config.kind not in DATASET_PATHS:
        raise DatasetError(f"unknown dataset kind {config.kind!r} (expected {', '.join(DATASET_PATHS)})")
    allowed, required = DATASET_PATHS[config.kind]
    paths = {name: getattr(config, name) for name in allowed}
    given = {name for name in ALL_PATHS if getattr(config, name) is not None}
    if given - allowed or required - given:
        raise DatasetError(
            f"dataset kind {config.kind!r} takes paths {sorted(allowed)} (required: {sorted(required)}); "
            f"got {sorted(given)}"
        )
    skip = config.skip_missing
    if config.kind == "karpathy":
        return load_karpathy(paths["split_json"], paths["image_root"], skip_missing=skip)
    if config.kind == "flickr":
        return load_flickr(paths["root"], skip_missing=skip)
    splits = {}
    for split in ("train", "val"):
        if paths[split] is None:
            continue
        if config.kind == "pairs":
            splits[split] = load_pairs(paths[split], paths["image_root"], skip_missing=skip)
        elif paths[f"{split}_images"] is None:
            raise DatasetError(f"coco: {split} given without {split}_images")
        else:
            splits[split] = load_coco(paths[split], paths[f"{split}_images"], split, skip_missing=skip)
    return CaptionDataset(splits)


# ----------------------------------------------------------------------------- checks


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty")
    return path


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e


def _first(names: list[str]) -> str:
    more = f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _drop_missing(
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
            f"{message} from {image_root}: {_first(names)} (pass skip_missing=True to drop them)"
        )
    warnings.warn(f"{message}; dropping them (first: {_first(names)})", stacklevel=2)
    dropped = {id(m) for m in missing}
    return [item for item in items if id(item) not in dropped]


def _non_empty(items: list[ImageCaptions], split: str, source: str | Path) -> list[ImageCaptions]:
    if not items:
        raise DatasetError(f"split {split!r} from {source} has no images")
    return items


def _checked_dataset(
    splits: dict[str, list[ImageCaptions]], image_root: Path, source: str, skip_missing: bool
) -> CaptionDataset:
    """Check images of all splits in one pass, then refuse any split left empty."""
    everything = [item for items in splits.values() for item in items]
    kept = {id(item) for item in _drop_missing(everything, image_root, source, skip_missing)}
    return CaptionDataset(
        {
            split: _non_empty([item for item in items if id(item) in kept], split, source)
            for split, items in splits.items()
        }
    )
