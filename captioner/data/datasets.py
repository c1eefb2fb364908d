"""Caption datasets: COCO, Karpathy splits, Flickr8k/30k and CSV/JSONL pairs.

`load_dataset(DataConfig)` is the one entry point for command lines and training; the readers
of each format live in captioner.data.readers and are importable from here too. Every reader
returns the same plain structure (image path + raw captions), validates its inputs up front and
names the offending file in its errors, so a bad path fails in seconds rather than hours into
training.
"""

from __future__ import annotations

from captioner.data.config import DataConfig
from captioner.data.image_captions import CaptionDataset, DatasetError, ImageCaptions
from captioner.data.readers.coco import load_coco
from captioner.data.readers.flickr import load_flickr
from captioner.data.readers.karpathy import load_karpathy
from captioner.data.readers.pairs import load_pairs

__all__ = [
    "DATASET_PATHS",
    "CaptionDataset",
    "DatasetError",
    "ImageCaptions",
    "load_coco",
    "load_dataset",
    "load_flickr",
    "load_karpathy",
    "load_pairs",
]

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
