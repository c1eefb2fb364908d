"""Does focusing on an object's box make the caption name it? Measured on COCO instances.

For every object (a non-crowd instance) whose category covers 5-60% of its image, the image is
captioned once without focus and once with focus on the object's box; a caption names the
object when it mentions the category (the grounding evaluation's synonym table). The encoder
runs once per image: every box of an image is decoded from the same annotation grid.
Three ways of steering can be compared (`how`): both the attention scores and the initial
state (what Captioner does), the attention scores alone, or the initial state alone.

The ceiling: each object is also captioned from a crop of its box alone (with a margin), the
same pipeline, no steering. A model that does not name the object even when it fills the
photo cannot be steered into naming it, so the rate from crops bounds what focus can do with
this model's features and vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from captioner.data.images import load_image
from captioner.evaluation.coco_objects import COCO_SYNONYMS, ObjectVocabulary
from captioner.evaluation.grounding import category_masks
from captioner.model.focus import focus_weights
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features

if TYPE_CHECKING:  # a Captioner is passed in; evaluation sits below serving
    from captioner.serving.captioner import Captioner

HOW = ("both", "attention", "start")
COVER = (0.05, 0.60)  # share of the image a category's masks must cover
CROP_MARGIN = 0.25  # the crop for the ceiling: the box grown by this share of its size per side


class _Steered(torch.nn.Module):
    """A decoder whose focus acts on the attention scores only, or on the initial state only."""

    def __init__(self, decoder: torch.nn.Module, how: str):
        super().__init__()
        self.decoder, self.how = decoder, how

    def prepare(self, features):
        return self.decoder.prepare(features)

    def init_state(self, features, focus=None):
        return self.decoder.init_state(features, focus if self.how != "attention" else None)

    def step(self, features, keys, words, state, focus=None):
        return self.decoder.step(features, keys, words, state, focus if self.how != "start" else None)


@dataclass
class FocusTrial:
    image: str
    category: str
    box: tuple[float, float, float, float]
    cover: float  # the category's share of the image
    nameable: bool  # the model's vocabulary has a word for the category
    plain: str  # the caption without focus
    focused: str
    named_plain: bool
    named_focused: bool
    cropped: str  # the caption of the box's crop alone
    named_cropped: bool


@dataclass
class FocusReport:
    trials: list[FocusTrial] = field(default_factory=list)

    def rate(self, caption: str, nameable_only: bool = False) -> float:
        """% of objects named by one caption of each: "plain" (no focus), "focused" or "cropped"
        (the ceiling)."""
        trials = [t for t in self.trials if t.nameable or not nameable_only]
        named = [getattr(t, f"named_{caption}") for t in trials]
        return 100 * float(np.mean(named)) if named else float("nan")

    def summary(self) -> dict[str, float | int]:
        nameable = sum(t.nameable for t in self.trials)
        crop_named = [t for t in self.trials if t.named_cropped]  # what steering could still move
        return {
            "objects": len(self.trials),
            "objects_nameable": nameable,
            "named_without_focus": self.rate("plain"),
            "named_with_focus": self.rate("focused"),
            "named_from_crop": self.rate("cropped"),
            "named_without_focus_nameable": self.rate("plain", True),
            "named_with_focus_nameable": self.rate("focused", True),
            "named_from_crop_nameable": self.rate("cropped", True),
            "objects_named_from_crop": len(crop_named),
            "of_those_named_without_focus": sum(t.named_plain for t in crop_named),
            "of_those_named_with_focus": sum(t.named_focused for t in crop_named),
            "mean_words_without_focus": float(np.mean([len(t.plain.split()) for t in self.trials])),
            "mean_words_with_focus": float(np.mean([len(t.focused.split()) for t in self.trials])),
        }


def nameable_categories(captioner: Captioner, synonyms=COCO_SYNONYMS) -> set[str]:
    words = set(captioner.vocab.words)
    objects = ObjectVocabulary(synonyms)
    return {
        category
        for category, names in synonyms.items()
        if any(all(part in words for part in name.split()) for name in names)
        or any(objects.lookup([w])[1] == category for w in words)
    }


def evaluate_focus(
    captioner: Captioner,
    images_dir: str | Path,
    instances: str | Path,
    settings: Sequence[tuple[str, float]] = (("both", 4.0),),
    beam_size: int = 3,
    limit: int | None = None,
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
) -> dict[tuple[str, float], FocusReport]:
    """One report per (how, strength) setting; each image is encoded once for all of them.
    `synonyms`: {category: caption words naming it} (default: the grounding evaluation's)."""
    from pycocotools.coco import COCO

    if unknown := [how for how, _ in settings if how not in HOW]:
        raise ValueError(f"how {unknown[0]!r}: expected one of {HOW}")
    coco, options = COCO(str(instances)), DecodeOptions(beam_size=beam_size)
    objects, nameable = ObjectVocabulary(synonyms), nameable_categories(captioner, synonyms)
    reports = {setting: FocusReport() for setting in settings}
    for image_id in sorted(coco.getImgIds())[:limit]:
        entry = coco.loadImgs([image_id])[0]
        cover, boxes = _focus_targets(coco, image_id)
        if not boxes:
            continue
        image = load_image(Path(images_dir) / entry["file_name"])
        with torch.inference_mode():
            features = captioner.encoder(captioner.preprocess(image)[None].to(captioner.device))
        plain = caption_features(captioner.model.decoder, captioner.vocab, features, options)[0].text
        regions = [_box(bbox, image.size) for bbox, _ in boxes]
        cropped = captioner.caption([_crop(image, region) for region in regions], options)
        named_cropped = [{m.category for m in objects.mentions(crop.words)} for crop in cropped]
        weights = torch.stack([focus_weights(r, image.size, captioner.grid_shape) for r in regions])
        for (how, strength), report in reports.items():
            decoder = captioner.model.decoder if how == "both" else _Steered(captioner.model.decoder, how)
            focused = caption_features(
                decoder,
                captioner.vocab,
                features.expand(len(boxes), -1, -1),
                options,
                focus=(strength * weights).to(captioner.device),
            )
            for (_, name), region, result, crop, named_crop in zip(
                boxes, regions, focused, cropped, named_cropped, strict=True
            ):
                named = {m.category for m in objects.mentions(result.words)}
                report.trials.append(
                    FocusTrial(
                        entry["file_name"],
                        name,
                        region,
                        cover[name],
                        name in nameable,
                        plain,
                        result.text,
                        name in {m.category for m in objects.mentions(plain.split())},
                        name in named,
                        crop.text,
                        name in named_crop,
                    )
                )
    return reports


def _focus_targets(coco, image_id: int) -> tuple[dict[str, float], list[tuple[list[float], str]]]:
    """The share of the image each category covers, and the (box, category) of every object
    whose category covers COVER of the image."""
    cover = {name: float(mask.mean()) for name, mask in category_masks(coco, image_id).items()}
    boxes = [
        (a["bbox"], coco.loadCats([a["category_id"]])[0]["name"])
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
    ]
    return cover, [(bbox, name) for bbox, name in boxes if COVER[0] <= cover[name] <= COVER[1]]


def _crop(image, region: tuple[float, float, float, float]):
    """The region grown by CROP_MARGIN of its size on each side, inside the image."""
    x0, y0, x1, y1 = region
    dx, dy = CROP_MARGIN * (x1 - x0), CROP_MARGIN * (y1 - y0)
    return image.crop(
        (
            max(0.0, x0 - dx),
            max(0.0, y0 - dy),
            min(float(image.width), x1 + dx),
            min(float(image.height), y1 + dy),
        )
    )


def _box(bbox: Sequence[float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """COCO's [x, y, width, height] -> (x0, y0, x1, y1), inside the image."""
    x, y, w, h = bbox
    return max(0.0, x), max(0.0, y), min(float(size[0]), x + w), min(float(size[1]), y + h)
