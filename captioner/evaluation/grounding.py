"""Is the attention on the thing the word names, and is that thing in the image at all?

Captions are mapped to COCO object categories through a documented synonym table
(`COCO_SYNONYMS` in captioner.evaluation.coco_objects: "man", "girls", "people" -> person,
"puppy" -> dog, "bike" -> bicycle, "table" -> dining table, ...; plurals, and two-word names
such as "hot dog" or "teddy bear", which win over their last word). A category counts once per
caption, at its first mention: that word is the caption's *object mention* of the category.

Against an image's COCO instance masks (pycocotools `annToMask`, crowd regions included):

- pointing game (Zhang et al. 2016): a grounded mention (its category is in the image) is a hit
  when the peak of its attention, bilinearly upsampled to the image (the centre of its
  strongest grid cell), lies on the category's masks dilated by 15 px. Centre baseline: the
  same test for a fixed peak at the image centre.
- attention mass (Liu et al. 2017, "attention correctness"): the share of the mention's
  attention (upsampled, normalised to sum 1) that lies on the category's masks. Uniform
  baseline: the masks' share of the image, which is what uniform attention scores.
- CHAIR (Rohrbach et al. 2018): CHAIR_i, the share of object mentions whose category is not in
  the image; CHAIR_s, the share of captions with at least one such mention.

All figures are percentages. The model sees the whole image squashed to a square (no crop),
so its attention grid spans the whole image and is upsampled to the image's own size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from captioner.evaluation.coco_objects import COCO_SYNONYMS, ObjectVocabulary
from captioner.model.options import DecodeOptions

POINTING_TOLERANCE = 15  # px around the masks that still count as a hit (Zhang et al. 2016)


def upsample_attention(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) attention -> (H, W) map over the image, bilinear, normalised to sum 1.

    `size` is (H, W). Each grid cell is centred on its region (align_corners=False).
    """
    grid = torch.as_tensor(np.asarray(alpha, dtype=np.float32))[None, None]  # (1, 1, h, w)
    heat = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(min=0)
    total = float(heat.sum())
    if total <= 0:
        raise ValueError("attention map is all zeros: nothing to ground")
    return (heat / total).numpy()


def attention_peak(alpha: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """(row, col) in an image of `size` (H, W) where the upsampled attention peaks.

    Bilinear upsampling takes its maximum at the centre of the grid cell with the most
    attention (and, for a cell on the border, also out to the image edge, where the map is
    flat): the cell centre is the peak, without the arbitrary tie-break an argmax over pixels
    would make.
    """
    alpha = np.asarray(alpha)
    row, col = np.unravel_index(int(np.argmax(alpha)), alpha.shape)
    height, width = size
    y = (row + 0.5) * height / alpha.shape[0] - 0.5  # align_corners=False
    x = (col + 0.5) * width / alpha.shape[1] - 0.5
    return min(max(round(y), 0), height - 1), min(max(round(x), 0), width - 1)


def dilate(mask: np.ndarray, radius: int = POINTING_TOLERANCE) -> np.ndarray:
    """The mask grown by `radius` px (Euclidean): every pixel within that distance of it."""
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


@dataclass
class ObjectWord:
    """One object mention of a caption, checked against the image's instances."""

    word: str
    category: str
    index: int
    in_image: bool  # False: a hallucinated object (CHAIR)
    gate: float | None = None  # the word's gating scalar beta, if the result carries it
    hit: bool | None = None  # pointing game (grounded mentions only)
    centre_hit: bool | None = None
    mass: float | None = None  # % of the attention on the category's masks
    mask_share: float | None = None  # % of the image the category's masks cover


@dataclass
class ImageGrounding:
    image_id: int
    file_name: str
    caption: str
    objects: list[ObjectWord] = field(default_factory=list)
    gates: list[float] = field(default_factory=list)  # every word's beta, if the result has it

    @property
    def hallucinated(self) -> bool:
        return any(not o.in_image for o in self.objects)


def ground_caption(
    words: Sequence[str],
    attention: np.ndarray,
    masks: Mapping[str, np.ndarray],
    objects: ObjectVocabulary,
    gate: Sequence[float] | None = None,
    image_id: int = 0,
    file_name: str = "",
) -> ImageGrounding:
    """Check one caption: words, its attention (len(words), h, w) and the image's category
    masks {category: (H, W) bool}, all of one image size."""
    if len(attention) != len(words):
        raise ValueError(f"{file_name or 'caption'}: {len(words)} words but {len(attention)} attention maps")
    gates = [] if gate is None else [float(g) for g in gate]
    result = ImageGrounding(image_id, file_name, " ".join(words), gates=gates)
    for mention in objects.mentions(words):
        word = ObjectWord(
            mention.phrase,
            mention.category,
            mention.index,
            in_image=mention.category in masks,
            gate=gates[mention.index] if gates else None,
        )
        if word.in_image:
            mask = masks[mention.category]
            height, width = mask.shape
            heat = upsample_attention(attention[mention.index], (height, width))
            near = dilate(mask)
            word.hit = bool(near[attention_peak(attention[mention.index], (height, width))])
            word.centre_hit = bool(near[height // 2, width // 2])
            word.mass = float(heat[mask].sum()) * 100
            word.mask_share = float(mask.mean()) * 100
        result.objects.append(word)
    return result


def summarise(results: Sequence[ImageGrounding]) -> dict[str, float | int]:
    """The figures of a set of captioned images (percentages; NaN where nothing to count)."""
    mentions = [o for r in results for o in r.objects]
    grounded = [o for o in mentions if o.in_image]

    def percent(values: Iterable[float | bool | None]) -> float:
        kept = [float(v) for v in values if v is not None]
        return float(np.mean(kept)) * 100 if kept else float("nan")

    return {
        "pointing_game": percent(o.hit for o in grounded),
        "centre_baseline": percent(o.centre_hit for o in grounded),
        "attention_mass": percent(o.mass / 100 for o in grounded if o.mass is not None),
        "uniform_baseline": percent(o.mask_share / 100 for o in grounded if o.mask_share is not None),
        "chair_i": percent(not o.in_image for o in mentions),
        "chair_s": percent(r.hallucinated for r in results),
        "images": len(results),
        "grounded_words": len(grounded),
        "object_mentions": len(mentions),
    }


def plain_metrics(metrics: Mapping[str, float | int], digits: int | None = None) -> dict:
    """The metrics as strict JSON values: NaN (nothing to count) becomes null; rounded if asked."""

    def plain(value):
        if isinstance(value, float):
            return None if np.isnan(value) else round(value, digits) if digits is not None else value
        return value

    return {key: plain(value) for key, value in metrics.items()}


def category_masks(coco, image_id: int) -> dict[str, np.ndarray]:
    """{category name: union of its instance masks (H, W) bool}, crowd regions included."""
    masks: dict[str, np.ndarray] = {}
    for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
        name = coco.loadCats([annotation["category_id"]])[0]["name"]
        mask = coco.annToMask(annotation).astype(bool)
        masks[name] = masks[name] | mask if name in masks else mask
    return masks


@dataclass
class GroundingReport:
    metrics: dict[str, float | int]
    images: list[ImageGrounding]
    skipped: list[str]  # image files without instance annotations


def evaluate_grounding(
    captioner,
    images_dir: str | Path,
    instances: str | Path,
    beam_size: int = DecodeOptions.beam_size,
    batch_size: int = 8,
    synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS,
    progress: bool = False,
    **decoding: Any,
) -> GroundingReport:
    """Caption every annotated image of a COCO instances file with `captioner` (a Captioner)
    and measure grounding and hallucination. Images without annotations are skipped. Other
    decoding options (DecodeOptions fields, e.g. evidence_penalty=4.0) go to the captioner."""
    from tqdm import tqdm

    images_dir, instances = Path(images_dir), Path(instances)
    coco = _read_instances(images_dir, instances)
    objects = ObjectVocabulary(synonyms)
    if not {c["name"] for c in coco.dataset["categories"]} & set(synonyms):
        raise ValueError(f"none of the categories of {instances} is in the synonym table")
    entries: list[dict] = []
    skipped: list[dict] = []
    for image_id in sorted(coco.getImgIds()):
        entry = coco.loadImgs([image_id])[0]
        (entries if coco.getAnnIds(imgIds=[image_id], iscrowd=None) else skipped).append(entry)
    missing = [e["file_name"] for e in entries if not (images_dir / e["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of {instances} are not in {images_dir}, e.g. {missing[0]}"
        )
    results = []
    batches = range(0, len(entries), batch_size)
    for start in tqdm(batches, desc="captioning", disable=not progress):
        batch = entries[start : start + batch_size]
        captions = captioner.caption(
            [images_dir / e["file_name"] for e in batch],
            beam_size=beam_size,
            batch_size=batch_size,
            **decoding,
        )
        for entry, caption in zip(batch, captions, strict=True):
            masks = category_masks(coco, entry["id"])  # at the size the JSON gives the image
            results.append(
                ground_caption(
                    caption.words,
                    caption.attention,
                    masks,
                    objects,
                    caption.gate,
                    entry["id"],
                    entry["file_name"],
                )
            )
    return GroundingReport(summarise(results), results, [e["file_name"] for e in skipped])


def _read_instances(images_dir: Path, instances: Path):
    """The COCO instances file, read with pycocotools, or an error naming what is wrong."""
    from pycocotools.coco import COCO

    if not instances.is_file():
        raise FileNotFoundError(f"instances file {instances} does not exist")
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    try:
        coco = _quiet_coco(COCO, instances)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{instances} is not a COCO instances file (not JSON: {err})") from err
    if "annotations" not in coco.dataset or "categories" not in coco.dataset:
        raise ValueError(f"{instances} is not a COCO instances file (needs 'annotations' and 'categories')")
    return coco


def _quiet_coco(coco_class, path: Path):
    """pycocotools prints while loading; keep the script's output to the results."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return coco_class(str(path))


def write_report(report: GroundingReport, output_dir: str | Path) -> Path:
    """metrics.json and details.jsonl (one line per image; skipped images say so)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(plain_metrics(report.metrics), indent=2) + "\n")
    with open(output_dir / "details.jsonl", "w", encoding="utf-8") as out:
        for image in report.images:
            out.write(json.dumps(asdict(image)) + "\n")
        for name in report.skipped:
            out.write(json.dumps({"file_name": name, "skipped": "no instance annotations"}) + "\n")
    return output_dir
