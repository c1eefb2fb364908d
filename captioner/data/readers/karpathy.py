"""Karpathy's split files (dataset_coco.json, dataset_flickr8k.json, dataset_flickr30k.json)."""

from __future__ import annotations

from pathlib import Path

from captioner.data.image_captions import CaptionDataset, DatasetError, ImageCaptions
from captioner.data.readers.checks import checked_dataset, existing_dir, existing_file, read_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def load_karpathy(
    split_json: str | Path, image_root: str | Path, *, skip_missing: bool = False
) -> CaptionDataset:
    """Read Karpathy's dataset_{coco,flickr8k,flickr30k}.json; `restval` joins train.

    For COCO, `image_root` holds train2014/ and val2014/ (the json's `filepath`); for Flickr it
    is the folder with the images themselves.
    """
    split_json = existing_file(split_json)
    image_root = existing_dir(image_root, f"image folder for {split_json.name}")
    data = read_json(split_json)
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
        splits.setdefault(split, []).append(
            ImageCaptions(
                image_id=str(coco_id) if coco_id is not None else image["filename"],
                path=path,
                captions=captions,
                coco_id=int(coco_id) if coco_id is not None else None,
            )
        )
    if not splits:
        raise DatasetError(f"{split_json}: no images with captions")
    return checked_dataset(splits, image_root, str(split_json), skip_missing)
