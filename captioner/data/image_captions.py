"""What every dataset reader returns: images with their raw captions, by split, and the error
that names a bad dataset file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
            raise DatasetError(f"no {split!r} split in this dataset (it has: {sorted(self.splits)})")
        return self.splits[split]
