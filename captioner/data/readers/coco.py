"""COCO-format caption files (captions_train2014.json and the like), read with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from pycocotools.coco import COCO

from captioner.data.image_captions import DatasetError, ImageCaptions
from captioner.data.readers.checks import drop_missing, existing_dir, existing_file, non_empty


def load_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    split_name: str = "train",
    *,
    skip_missing: bool = False,
) -> list[ImageCaptions]:
    """Read a COCO-format caption file (e.g. captions_train2014.json) with pycocotools."""
    annotation_file = existing_file(annotation_file)
    image_dir = existing_dir(image_dir, f"image folder for {annotation_file.name}")
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
            items.append(
                ImageCaptions(
                    str(image["id"]), image_dir / image["file_name"], captions, coco_id=int(image["id"])
                )
            )
    if not items:
        raise DatasetError(
            f"{annotation_file}: no images with captions "
            "(is this a captions_*.json file rather than instances_*.json?)"
        )
    items = drop_missing(items, image_dir, str(annotation_file), skip_missing)
    return non_empty(items, split_name, annotation_file)
