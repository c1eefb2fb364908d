"""Cache each photo's annotation grid and ImageNet evidence for training semantic attributes
(issue #37 2c, captioner.training.attributes): one pass of Captioner.encode_with_evidence per photo,
resumable (a rerun computes only the rows still missing).

  python scripts/cache_attributes.py --model weights --flickr ../shared/data/flickr8k \\
      --split train --output runs/attr-cache/train
"""

import argparse
import time

import torch

from captioner.data.readers.flickr import load_flickr
from captioner.serving.captioner import Captioner
from captioner.training.attributes import write_attribute_cache


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder whose encoder computes the cache")
    parser.add_argument("--flickr", required=True, help="the Flickr8k folder")
    parser.add_argument("--split", choices=["train", "val"], required=True, help="val: the dev split")
    parser.add_argument("--output", required=True, help="the cache folder (made if missing)")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    paths = [item.path for item in load_flickr(args.flickr)[args.split]]
    cells = captioner.grid_shape[0] * captioner.grid_shape[1]
    started = time.perf_counter()

    @torch.inference_mode()
    def encode(batch):
        return captioner.encode_with_evidence(torch.stack([captioner.preprocess(p) for p in batch]))

    def progress(done: int, total: int) -> None:
        if done % 100 < 4 or done == total:
            rate = (time.perf_counter() - started) / done
            print(f"{done}/{total} photos, {rate * 1000:.0f} ms each", flush=True)

    feature_dim = captioner.model.encoder.feature_dim
    write_attribute_cache(args.output, paths, encode, (cells, feature_dim), progress=progress)


if __name__ == "__main__":
    main()
