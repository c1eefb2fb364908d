"""Decoding methods side by side (issue #37): grounding on COCO photos and scores on Flickr8k dev.

  python scripts/evaluate_steering.py --coco-images ../shared/data/coco-mini/train2017 \\
      --instances ../shared/data/coco-mini/annotations/instances_train2017.json \\
      --flickr ../shared/data/flickr8k --cache-dir eval/steering-cache --output eval/steering.json

Every photo is encoded once (annotation grid and ImageNet evidence, kept in --cache-dir as
safetensors), then every method decodes the cached grids with caption_features, the path the
Captioner takes. Per method: CHAIR-i, CHAIR-s, object mentions per caption, recall (the share of
(photo, present category) pairs whose caption names the category), wrong mentions (of them
person), and Flickr8k dev BLEU-4 / METEOR / CIDEr. --methods picks rows of METHODS; --models
LABEL=FOLDER ... runs them for each model folder whose encoder is --model's (e.g. decoders
fine-tuned with semantic attributes, scripts/train_attributes.py), on the same cached photos.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from captioner.data.readers.flickr import load_flickr
from captioner.evaluation.coco_objects import ObjectVocabulary
from captioner.evaluation.grounding import _read_instances, category_masks, ground_caption, summarise
from captioner.evaluation.metrics import score_captions
from captioner.model.options import DecodeOptions
from captioner.model.results import CaptionResult, caption_features
from captioner.serving.captioner import DEFAULT_WEIGHTS, Captioner

BEAM5 = {"beam_size": 5, "length_penalty": 1.0}
METHODS = {
    "beam 3 (old default)": {"beam_size": 3, "length_penalty": 0.0},
    "beam 5, lp 1.0": BEAM5,
    "(b) evidence_penalty 4": {**BEAM5, "evidence_penalty": 4.0},
    "(a) constrain_evidence 0.3": {**BEAM5, "constrain_evidence": 0.3},
    "(f) person_penalty 4": {**BEAM5, "person_penalty": 4.0},
    "(a)+(f)": {**BEAM5, "constrain_evidence": 0.3, "person_penalty": 4.0},
    "(a)+(b)": {**BEAM5, "constrain_evidence": 0.3, "evidence_penalty": 4.0},
    "(a)+(b)+(f)": {**BEAM5, "constrain_evidence": 0.3, "evidence_penalty": 4.0, "person_penalty": 4.0},
    "(a)+(b)+(f), beam 3": {
        "beam_size": 3,
        "length_penalty": 0.0,
        "constrain_evidence": 0.3,
        "evidence_penalty": 4.0,
        "person_penalty": 4.0,
    },
}


def encoded(captioner: Captioner, paths: list[Path], cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids (N, L, D) and evidence (N, 1000) of the photos, from `cache` if it holds them."""
    names = [p.name for p in paths]
    if cache.is_file():
        stored, order = load_file(cache), json.loads(cache.with_suffix(".json").read_text())
        if sorted(order) != sorted(names):
            raise ValueError(f"{cache} holds other photos; delete it to recompute")
        index = torch.tensor([order.index(n) for n in names])
        return stored["grids"][index].float(), stored["probabilities"][index]
    grids, probabilities = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), 8), desc=f"encoding {cache.stem}"):
            pixels = torch.stack([captioner.preprocess(p) for p in paths[start : start + 8]])
            grid, evidence = captioner.encode_with_evidence(pixels)
            grids.append(grid.half())
            probabilities.append(evidence)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"grids": torch.cat(grids), "probabilities": torch.cat(probabilities)}, cache)
    cache.with_suffix(".json").write_text(json.dumps(names))
    return torch.cat(grids).float(), torch.cat(probabilities)


def decode(
    captioner: Captioner, grids: torch.Tensor, evidence: torch.Tensor, options: DecodeOptions
) -> list[CaptionResult]:
    results: list[CaptionResult] = []
    for start in range(0, len(grids), 50):
        part = slice(start, start + 50)
        results += caption_features(
            captioner.decoder, captioner.vocab, grids[part], options, None, evidence[part]
        )
    return results


def same_encoder(captioner: Captioner, folder: str) -> Captioner:
    """The model folder `folder`, refused unless its encoder is `captioner`'s (the cache's)."""
    other = Captioner.from_pretrained(folder, device="cpu")
    ours, theirs = captioner.model.encoder.state_dict(), other.model.encoder.state_dict()
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"--models {folder}: its encoder is not --model's, the cached grids do not fit")
    return other


def grounding(results: list[CaptionResult], coco, entries: list[dict]) -> dict[str, float]:
    objects, grounded, named, present = ObjectVocabulary(), [], 0, 0
    for result, entry in zip(results, entries, strict=True):
        masks = category_masks(coco, entry["id"])
        image = ground_caption(
            result.words, result.attention, masks, objects, None, entry["id"], entry["file_name"]
        )
        grounded.append(image)
        present += len(masks)
        named += len({o.category for o in image.objects if o.in_image})
    summary = summarise(grounded)
    wrong = [o for g in grounded for o in g.objects if not o.in_image]
    return {
        "CHAIR-i": summary["chair_i"],
        "CHAIR-s": summary["chair_s"],
        "mentions per caption": summary["object_mentions"] / len(results),
        "recall": 100 * named / present,
        "wrong": len(wrong),
        "wrong person": sum(o.category == "person" for o in wrong),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--coco-images", required=True)
    parser.add_argument("--instances", required=True)
    parser.add_argument("--flickr", required=True, help="Flickr8k folder (its dev split is scored)")
    parser.add_argument("--model", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--cache-dir", required=True, help="where the encoded photos are kept")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="rows of METHODS (default: all)")
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        metavar="LABEL=FOLDER",
        help="model folders to compare (default: --model)",
    )
    parser.add_argument("--output", help="JSON file for every method's figures and captions")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    coco = _read_instances(Path(args.coco_images), Path(args.instances))
    entries = [coco.loadImgs([i])[0] for i in sorted(coco.getImgIds()) if coco.getAnnIds(imgIds=[i])]
    coco_set = encoded(
        captioner,
        [Path(args.coco_images) / e["file_name"] for e in entries],
        Path(args.cache_dir) / "coco_mini.safetensors",
    )
    dev = load_flickr(args.flickr)["val"]
    dev_set = encoded(captioner, [d.path for d in dev], Path(args.cache_dir) / "f8k_dev.safetensors")
    models = {"": captioner}
    if args.models:
        models = {m.split("=", 1)[0] + ": ": same_encoder(captioner, m.split("=", 1)[1]) for m in args.models}
    report = {}
    for label, model in models.items():
        for name in args.methods:
            options = DecodeOptions(**METHODS[name])
            row = grounding(decode(model, *coco_set, options), coco, entries)
            captions = [r.text for r in decode(model, *dev_set, options)]
            scores = score_captions(
                {d.image_id: c for d, c in zip(dev, captions, strict=True)},
                {d.image_id: d.captions for d in dev},
            )
            row |= {f"dev {m}": scores[m] for m in ("BLEU-4", "METEOR", "CIDEr")}
            report[label + name] = {"options": METHODS[name], **row, "dev captions": captions}
            print(f"| {label}{name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
