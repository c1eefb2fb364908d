"""Which dataset a run reads, as a plain dataclass (no torch: the command line builds flags from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    """Which dataset to read: `kind` picks the reader, the paths it needs are set, the rest None."""

    kind: Literal["flickr", "coco", "karpathy", "pairs"] = "flickr"
    """The dataset's layout, which decides the paths it needs."""
    root: str | None = None
    """flickr: the folder with the token file, split lists and images."""
    train: str | None = None
    """coco / pairs: annotation file of the training split."""
    train_images: str | None = None
    """coco: image folder of the training split."""
    val: str | None = None
    """coco / pairs: annotation file of the validation split."""
    val_images: str | None = None
    """coco: image folder of the validation split."""
    split_json: str | None = None
    """karpathy: dataset_{coco,flickr8k,flickr30k}.json."""
    image_root: str | None = None
    """karpathy / pairs: where relative image paths start."""
    skip_missing: bool = False
    """Drop (and warn about) captions whose image file is missing."""
    max_val_images: int | None = None
    """Validate on the first N images only (faster epochs)."""
