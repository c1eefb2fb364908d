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

The evidence of the box (captioner.model.evidence, issue #37): what the encoder's ImageNet
classifier sees in each object's box, four ways: the whole photo (the baseline), the tail's
output pooled over the box's cells (what Captioner does with focus), the tail rerun on the crop
of its input to the box's cells, and the crop of the photo (the ceiling's). A hit: one of the
top EVIDENCE_TOP labels is of the object's category; counted over the objects whose category
some ImageNet class has. The focused captions carry (and their decoding uses) the pooled evidence.
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
from captioner.model.decoder import Decoder, reads_attributes
from captioner.model.evidence import EVIDENCE_STAGE, evidence_items, imagenet_words
from captioner.model.focus import focus_weights, region_evidence
from captioner.model.options import DecodeOptions
from captioner.model.results import CaptionResult, caption_features

if TYPE_CHECKING:  # a Captioner is passed in; evaluation sits below serving
    from captioner.serving.captioner import Captioner

HOW = ("both", "attention", "start")
COVER = (0.05, 0.60)  # share of the image a category's masks must cover
CROP_MARGIN = 0.25  # the crop for the ceiling: the box grown by this share of its size per side
EVIDENCE = ("photo", "pooled", "feature_crop", "photo_crop")  # where the box's evidence comes from
EVIDENCE_TOP = 5  # labels shown (CaptionResult.evidence's length)


class _Steered(torch.nn.Module):
    """A decoder whose focus acts on the attention scores only, or on the initial state only."""

    def __init__(self, decoder: Decoder, how: str):
        super().__init__()
        self.decoder, self.how = decoder, how

    def prepare(self, features, attributes=None):
        return self.decoder.prepare(features, attributes)

    @property
    def reads_attributes(self) -> bool:
        return reads_attributes(self.decoder)

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
    box_evidence: list[str] = field(default_factory=list)  # the focused caption's top labels
    evidence_hits: dict[str, bool] = field(default_factory=dict)  # EVIDENCE -> a top label is the category


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
        } | self.evidence_summary()

    def evidence_summary(self) -> dict[str, float | int]:
        """% of the objects with an ImageNet category whose category is among the top labels, by
        where the evidence came from (EVIDENCE); nothing for a run without evidence."""
        trials = [t for t in self.trials if t.evidence_hits]
        if not trials:
            return {}
        rates = {
            f"evidence_hit_{k}": 100 * float(np.mean([t.evidence_hits[k] for t in trials])) for k in EVIDENCE
        }
        return {"objects_with_imagenet_category": len(trials)} | rates


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
    limit: int | None = None,
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
    *,
    options: DecodeOptions | None = None,
    evidence: bool = True,
) -> dict[tuple[str, float], FocusReport]:
    """One report per (how, strength) setting; each image is encoded once for all of them.
    `synonyms`: {category: caption words naming it} (default: the grounding evaluation's);
    `options`: decoding (default: DecodeOptions(), the captioner's default); `evidence`: measure the
    evidence of each box too (the model needs an ImageNet classifier: captioner.model.evidence)."""
    from pycocotools.coco import COCO

    if unknown := [how for how, _ in settings if how not in HOW]:
        raise ValueError(f"how {unknown[0]!r}: expected one of {HOW}")
    coco, options = COCO(str(instances)), options or DecodeOptions()
    objects, nameable = ObjectVocabulary(synonyms), nameable_categories(captioner, synonyms)
    reports = {setting: FocusReport() for setting in settings}
    for image_id in sorted(coco.getImgIds())[:limit]:
        entry = coco.loadImgs([image_id])[0]
        cover, boxes = _focus_targets(coco, image_id)
        if not boxes:
            continue
        image = load_image(Path(images_dir) / entry["file_name"])
        photo = _Photo(captioner, image, evidence)
        plain = photo.caption(options)[0]
        regions = [_box(bbox, image.size) for bbox, _ in boxes]
        cropped = captioner.caption([_crop(image, r) for r in regions], options, evidence=evidence)
        weights = torch.stack([focus_weights(r, image.size, captioner.grid_shape) for r in regions])
        hits = [photo.evidence_hits(n, w, c) for (_, n), w, c in zip(boxes, weights, cropped, strict=True)]
        for (how, strength), report in reports.items():
            focused = photo.caption(options, how, strength * weights)
            for (_, name), region, result, crop, hit in zip(
                boxes, regions, focused, cropped, hits, strict=True
            ):
                report.trials.append(
                    FocusTrial(
                        entry["file_name"],
                        name,
                        region,
                        cover[name],
                        name in nameable,
                        plain.text,
                        result.text,
                        name in _named(objects, plain.words),
                        name in _named(objects, result.words),
                        crop.text,
                        name in _named(objects, crop.words),
                        [e.label for e in result.evidence or []],
                        hit,
                    )
                )
    return reports


class _Photo:
    """One photo encoded once: its grid, and with evidence the activations entering the
    evidence stage, from which every box's evidence is taken."""

    def __init__(self, captioner: Captioner, image, evidence: bool):
        self.captioner = captioner
        pixels = captioner.preprocess(image)[None].to(captioner.device)
        with torch.inference_mode():
            if evidence:
                self.stage_input = captioner.evidence_trunk()(pixels).contiguous(
                    memory_format=torch.channels_last
                )
                self.features = captioner.model.encoder(self.stage_input, from_stage=EVIDENCE_STAGE)
            else:
                self.stage_input, self.features = None, captioner.encoder(pixels)

    def probabilities(self, focus: torch.Tensor | None) -> torch.Tensor | None:
        """ImageNet probabilities (B, 1000) of the photo (focus None) or of each box (B, L)."""
        if self.stage_input is None:
            return None
        with torch.inference_mode():
            return region_evidence(self.captioner.evidence_head(), self.stage_input, focus)

    def caption(
        self, options: DecodeOptions, how: str = "both", focus: torch.Tensor | None = None
    ) -> list[CaptionResult]:
        """The photo's caption (focus None), or one per box (focus (B, L)) steered `how`, each with
        its box's evidence."""
        decoder = self.captioner.decoder
        count = 1 if focus is None else len(focus)
        return caption_features(
            decoder if how == "both" else _Steered(decoder, how),
            self.captioner.vocab,
            self.features.expand(count, -1, -1),
            options,
            focus=None if focus is None else focus.to(self.captioner.device),
            evidence=self.probabilities(focus),
        )

    def evidence_hits(self, category: str, weights: torch.Tensor, crop: CaptionResult) -> dict[str, bool]:
        """EVIDENCE -> whether a top label is of `category`, for a box of grid weights (L,); {}
        without evidence or for a category no ImageNet class has."""
        if self.stage_input is None or category not in imagenet_words().categories:
            return {}
        head = self.captioner.evidence_head()
        with torch.inference_mode():
            found = {
                "photo": head(self.stage_input)[0],
                "pooled": region_evidence(head, self.stage_input, weights[None])[0],
                "feature_crop": head(_feature_crop(self.stage_input, weights))[0],
            }
        tops = {k: [e.category for e in evidence_items(p, EVIDENCE_TOP)] for k, p in found.items()}
        tops["photo_crop"] = [e.category for e in crop.evidence or []]
        return {k: category in tops[k] for k in EVIDENCE}


def _feature_crop(stage_input: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The activations (1, C, h, w) cut to the rows and columns of the grid cells (L,) that the
    box touches (the grid and the activations may differ in size)."""
    side = int(weights.numel() ** 0.5)
    cells = weights.view(side, side) > 0
    rows, cols = cells.any(dim=1).nonzero()[:, 0], cells.any(dim=0).nonzero()[:, 0]
    h, w = stage_input.shape[-2:]
    r0, r1 = int(rows[0]) * h // side, max(int(rows[-1] + 1) * h // side, int(rows[0]) * h // side + 1)
    c0, c1 = int(cols[0]) * w // side, max(int(cols[-1] + 1) * w // side, int(cols[0]) * w // side + 1)
    return stage_input[..., r0:r1, c0:c1]


def _named(objects: ObjectVocabulary, words: Sequence[str]) -> set[str]:
    """The COCO categories a caption's words mention."""
    return {m.category for m in objects.mentions(words)}


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
