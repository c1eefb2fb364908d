"""How many confident ImageNet labels (captioner.model.evidence) each model's vocabulary can name
(issue #37 (d), captioner.evaluation.nameable). The evidence is computed once, with the first
model (it depends on the backbone alone).

  python scripts/count_nameable.py --models weights runs/extended \\
      --images ../shared/data/coco-mini/train2017
  python scripts/count_nameable.py --models weights runs/extended \\
      --images ../shared/data/flickr8k/images --names ../shared/data/flickr8k/Flickr_8k.devImages.txt
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.evaluation.nameable import count_nameable
from captioner.model.folder import read_config
from captioner.serving.captioner import Captioner
from captioner.serving.inputs import find_images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", required=True, help="model folders whose vocabularies are compared"
    )
    parser.add_argument("--images", required=True, help="folder of photos")
    parser.add_argument(
        "--names", help="text file of the photos to use (one file name per line; default: all)"
    )
    parser.add_argument(
        "--threshold", type=float, default=0.3, help="confident: evidence >= this (default 0.3)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.names:
        paths = [
            str(Path(args.images) / n.strip()) for n in Path(args.names).read_text().splitlines() if n.strip()
        ]
    else:
        paths = find_images([args.images])
    captioner = Captioner.from_pretrained(args.models[0], device="cpu")
    head, trunk = captioner.evidence_head(), captioner.evidence_trunk()
    parts = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), args.batch_size), desc="evidence"):
            pixels = torch.stack([captioner.preprocess(p) for p in paths[start : start + args.batch_size]])
            parts.append(head(trunk(pixels).contiguous(memory_format=torch.channels_last)))
    probabilities = torch.cat(parts)
    report = {
        model: count_nameable(probabilities, read_config(model)["vocabulary"], args.threshold)
        for model in args.models
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
