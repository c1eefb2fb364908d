"""The Flickr8k and Flickr30k release layouts: a token file of captions, an image folder, and
(Flickr8k) the lists of each split's images."""

from __future__ import annotations

import warnings
from pathlib import Path

from captioner.data.image_captions import CaptionDataset, DatasetError, ImageCaptions
from captioner.data.readers.checks import checked_dataset, existing_dir, first_names, non_empty
from captioner.data.readers.karpathy import load_karpathy

FLICKR_TOKEN_FILES = ("Flickr8k.token.txt", "results_20130124.token")
FLICKR_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images")
FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def load_flickr(root: str | Path, *, skip_missing: bool = False) -> CaptionDataset:
    """Read the Flickr8k (or Flickr30k) release layout.

    `root` holds the token file (Flickr8k.token.txt or Flickr30k's results_20130124.token) and
    an image folder (images/, Images/, Flicker8k_Dataset/ or flickr30k-images/). Splits come
    from Flickr_8k.{train,dev,test}Images.txt (dev -> "val"; only train is required); without
    them, a Karpathy dataset_flickr*.json in `root` is used; failing that, a Flickr30k token
    file puts every image in train.
    """
    root = existing_dir(root, "Flickr dataset folder")
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
        names = {
            split: _read_name_list(root / file)
            for split, file in FLICKR_SPLIT_FILES.items()
            if (root / file).is_file()
        }
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
                f"{token_file.name}: {first_names(uncaptioned)} (pass skip_missing=True to drop them)"
            )
        if uncaptioned:
            warnings.warn(f"dropping {len(uncaptioned)} images of {source} without captions", stacklevel=2)
        kept = [
            ImageCaptions(image_id=n, path=image_dir / n, captions=captions[n])
            for n in split_names
            if n in captions
        ]
        splits[split] = non_empty(kept, split, source)
    listed_in = root / "Flickr_8k.*Images.txt" if has_split_lists else token_file
    return checked_dataset(splits, image_dir, str(listed_in), skip_missing)


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
