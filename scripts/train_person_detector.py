"""Train the person detector (captioner/model/person.py) on Flickr8k train photos.

  python scripts/train_person_detector.py --flickr ../shared/data/flickr8k \\
      --evidence-cache eval/person/train_evidence.safetensors

Label of a photo: at least 2 of its 5 captions mention a person (captioner.evaluation's object
synonyms). Input: the ImageNet evidence of the shipped encoder (captioner.model.evidence), computed
for every 4th train photo (1500) and kept in --evidence-cache, so that refitting takes seconds.
Writes captioner/model/person_detector.json (or --output) and prints the train accuracy.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from captioner.data.readers.flickr import load_flickr
from captioner.evaluation.coco_objects import ObjectVocabulary
from captioner.model.person import DETECTOR_FILE, detector_inputs, fit_detector
from captioner.model.vocabulary import tokenize
from captioner.serving.captioner import DEFAULT_WEIGHTS, Captioner


def evidence_of(paths: list[Path], model: str, batch_size: int) -> torch.Tensor:
    """ImageNet class probabilities (N, 1000) of the photos, as the Captioner computes them."""
    captioner = Captioner.from_pretrained(model, device="cpu")
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), batch_size), desc="evidence"):
            pixels = torch.stack([captioner.preprocess(p) for p in paths[start : start + batch_size]])
            out.append(captioner.encode_with_evidence(pixels)[1])
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flickr", required=True, help="Flickr8k folder (token file, split lists, images/)")
    parser.add_argument("--model", default=str(DEFAULT_WEIGHTS), help="model folder (default: weights/)")
    parser.add_argument("--evidence-cache", help="safetensors file of the photos' evidence (made if missing)")
    parser.add_argument("--every", type=int, default=4, help="use every Nth train photo (default 4: 1500)")
    parser.add_argument("--l2", type=float, default=0.1, help="L2 weight on the standardised inputs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", default=str(DETECTOR_FILE))
    args = parser.parse_args()
    torch.manual_seed(0)
    photos = load_flickr(args.flickr)["train"][:: args.every]
    names = [p.image_id for p in photos]
    cache = Path(args.evidence_cache) if args.evidence_cache else None
    if cache is not None and cache.is_file():
        stored = load_file(cache)
        probabilities = stored["probabilities"]
        if json.loads(cache.with_suffix(".json").read_text()) != names:
            raise ValueError(f"{cache} holds the evidence of other photos; delete it to recompute")
    else:
        probabilities = evidence_of([p.path for p in photos], args.model, args.batch_size)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"probabilities": probabilities.contiguous()}, cache)
            cache.with_suffix(".json").write_text(json.dumps(names))
    objects = ObjectVocabulary()
    labels = torch.tensor(
        [
            float(
                sum(any(m.category == "person" for m in objects.mentions(tokenize(c))) for c in p.captions)
                >= 2
            )
            for p in photos
        ]
    )
    inputs = detector_inputs(probabilities)
    weights, bias = fit_detector(inputs, labels, args.l2)
    accuracy = float(((torch.sigmoid(inputs @ weights + bias) > 0.5).float() == labels).float().mean())
    table = {
        "source": f"scripts/train_person_detector.py: {len(photos)} Flickr8k train photos (every "
        f"{args.every}th), label '>= 2 of 5 captions mention a person' ({int(labels.sum())} positive), "
        f"logistic regression on centred ImageNet log-probabilities, classes balanced, L2 {args.l2}",
        "train_accuracy": round(accuracy, 4),
        "bias": bias,
        "weights": [round(w, 6) for w in weights.tolist()],
    }
    Path(args.output).write_text(json.dumps(table) + "\n", encoding="utf-8")
    print(
        f"{len(photos)} photos, {int(labels.sum())} with people: "
        f"train accuracy {100 * accuracy:.1f}% -> {args.output}"
    )


if __name__ == "__main__":
    main()
