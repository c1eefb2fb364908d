"""Write a synthetic dataset in the exact MS-COCO captions format, at COCO's size by default.

    python scripts/make_synthetic_coco.py /tmp/coco-synthetic                 # 123,287 images
    python scripts/make_synthetic_coco.py /tmp/coco-small --images 200        # a small instance

Nobody here can download COCO, but its size is what breaks a data pipeline: this writes
`annotations/captions_train2017.json` (5 captions per image, 616,767 for the full size; a
few images get 6 or 7, as in COCO) and tiny JPEGs in `train2017/`. Captions are drawn from a
caption-like vocabulary with a Zipf-shaped long tail, so the vocabulary after `min_word_count`
and the caption lengths (about 10.5 words) resemble COCO's. The images carry no meaning:
this is for measuring time and memory, not for learning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

COCO_IMAGES, COCO_CAPTIONS = 123_287, 616_767
# Frequent caption words (COCO's most common ones) first; a long tail of rarer made-up words
# follows, with Zipf frequencies over the whole list.
COMMON = (
    "a on of the in with and is man to sitting two an at standing people are next white "
    "woman street table holding that it person large down top group field up small tennis "
    "near front his plate train dog while red room riding cat water young baby bus kitchen "
    "playing sign there black her pizza their grass building blue by some one food through "
    "park snow bathroom laying green three sits other toilet frisbee over parked ball bed "
    "player for from picture looking city beach giraffe several stop has out wooden road "
    "walking around motorcycle couple boy skateboard ocean grassy board living side truck "
    "girl bear tree men sink horse elephant"
)


def caption_words(rng: np.random.Generator, vocabulary: list[str], count: int) -> list[str]:
    ranks = np.arange(1, len(vocabulary) + 1)
    weights = 1.0 / ranks**1.1
    lengths = np.clip(rng.normal(10.5, 2.4, count).round().astype(int), 5, 30)
    words = rng.choice(len(vocabulary), size=int(lengths.sum()), p=weights / weights.sum())
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        " ".join(vocabulary[w] for w in words[a:b]).capitalize() + "."
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def write_dataset(
    root: Path, images: int = COCO_IMAGES, captions: int | None = None, size: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    """Returns (captions JSON, image folder)."""
    captions = captions if captions is not None else round(images * COCO_CAPTIONS / COCO_IMAGES)
    if captions < images:
        raise ValueError(f"need at least one caption per image ({captions} captions, {images} images)")
    rng = np.random.default_rng(seed)
    image_dir, annotation_dir = root / "train2017", root / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = COMMON.split() + [f"thing{i}" for i in range(20_000)]
    owners = np.concatenate([np.arange(images), rng.integers(0, images, captions - images)])
    rng.shuffle(owners)
    records = []
    for i in range(images):
        image_id = i + 1
        name = f"{image_id:012d}.jpg"
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        Image.new("RGB", (size, size), colour).save(image_dir / name, quality=75)
        records.append(
            {
                "id": image_id,
                "file_name": name,
                "width": size,
                "height": size,
                "license": 0,
                "coco_url": "",
                "date_captured": "",
                "flickr_url": "",
            }
        )
    texts = caption_words(rng, vocabulary, captions)
    annotations = [
        {"id": k + 1, "image_id": int(owner) + 1, "caption": text}
        for k, (owner, text) in enumerate(zip(owners, texts, strict=True))
    ]
    path = annotation_dir / "captions_train2017.json"
    path.write_text(
        json.dumps(
            {
                "info": {"description": "synthetic COCO-format captions"},
                "licenses": [{"id": 0, "name": "synthetic", "url": ""}],
                "images": records,
                "annotations": annotations,
            }
        )
    )
    return path, image_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder to write (annotations/, train2017/)")
    parser.add_argument("--images", type=int, default=COCO_IMAGES)
    parser.add_argument("--captions", type=int, help="default: COCO's 5.003 per image")
    parser.add_argument("--size", type=int, default=32, help="side of the JPEGs in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path, image_dir = write_dataset(args.root, args.images, args.captions, args.size, args.seed)
    print(f"wrote {path} and {args.images:,} images in {image_dir}")


if __name__ == "__main__":
    main()
