"""Is batch captioning model-bound? Pipeline images/s vs the bare model on preloaded tensors.

    python scripts/benchmark_batch.py                      # default ModelConfig, random decoder
    python scripts/benchmark_batch.py --model weights/ --images 300

(a) the pipeline: `caption_files`, the code path of `captioner-caption` (workers decode and
    preprocess JPEGs, the model captions, records are written and flushed);
(b) the bare model: `Captioner.caption_tensors` on tensors preprocessed beforehand.
The two runs alternate, so load from other jobs on a shared machine hits both alike.
Target: (a) >= 0.8 x (b).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from captioner import CaptionModel, ModelConfig, Vocabulary
from captioner.model.options import DecodeOptions
from captioner.model.vocabulary import SPECIAL_TOKENS
from captioner.serving.batch import caption_files, find_images
from captioner.serving.captioner import Captioner
from captioner.serving.settings import DEFAULT_NUM_WORKERS, BatchSettings

SAMPLES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "colorwheel",
    "retina",
)


def make_photos(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` JPEGs, 224-500 px a side: random crops of scikit-image's sample photos."""
    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in SAMPLES]
    for i in range(count):
        source = sources[i % len(sources)]
        crop_w, crop_h = (int(rng.uniform(0.5, 1.0) * s) for s in source.size)
        left = int(rng.integers(0, source.width - crop_w + 1))
        top = int(rng.integers(0, source.height - crop_h + 1))
        size = tuple(int(s) for s in rng.integers(224, 501, size=2))
        image = source.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.BICUBIC)
        image.save(folder / f"photo_{i:04d}.jpg", quality=int(rng.integers(80, 96)))
    return find_images([folder])


def random_captioner() -> Captioner:
    """Default ModelConfig: ImageNet encoder, random decoder, a COCO-sized 10k vocabulary."""
    torch.manual_seed(0)
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(10_000 - len(SPECIAL_TOKENS)))])
    return Captioner(CaptionModel(ModelConfig(), len(vocab)), vocab, device="cpu")


def bare_model(captioner: Captioner, pixels: torch.Tensor, batch_size: int, options: DecodeOptions) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        captioner.caption_tensors(pixels[i : i + batch_size], options)
    return len(pixels) / (time.perf_counter() - start)


def pipeline(
    captioner: Captioner, paths: list[str], output: Path, options: DecodeOptions, settings: BatchSettings
) -> float:
    output.unlink(missing_ok=True)
    summary = caption_files(captioner, paths, output, options, settings)
    if summary.captioned != len(paths):
        raise RuntimeError(f"only {summary.captioned} of {len(paths)} images were captioned")
    return summary.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", "--checkpoint", help="model folder (default: random decoder, timing only)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, help="default: 20 with --model, else 16")
    parser.add_argument("--num-workers", type=int, default=DEFAULT_NUM_WORKERS)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of (a) and (b)")
    args = parser.parse_args()

    max_length = args.max_length or (20 if args.model else 16)
    if args.model:
        captioner = Captioner.from_pretrained(args.model, device="cpu")
        print(f"model: {args.model}")
    else:
        captioner = random_captioner()
        print(
            "model: default ModelConfig with a RANDOM decoder (timing only: captions are "
            f"nonsense and always run to max_length {max_length})"
        )
    print(
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, batch {args.batch_size}, "
        f"beam {args.beam_size}, max_length {max_length}, num_workers {args.num_workers}"
    )
    # (b) as Captioner.caption_tensors decodes by default, (a) as `captioner caption` does (one
    # caption per image)
    options = DecodeOptions(beam_size=args.beam_size, max_length=max_length)
    settings = BatchSettings(batch_size=args.batch_size, num_workers=args.num_workers, progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        paths = make_photos(folder, args.images)
        pixels = torch.stack([captioner.preprocess(p) for p in paths])
        print(f"{len(paths)} JPEGs, 224-500 px, in {folder}")
        bare_model(captioner, pixels[: args.batch_size], args.batch_size, options)

        piped, bare = [], []
        for run in range(args.repeats):
            piped.append(
                pipeline(captioner, paths, Path(tmp) / "captions.jsonl", options.replace(n_best=1), settings)
            )
            bare.append(bare_model(captioner, pixels, args.batch_size, options))
            print(
                f"run {run + 1}: (a) pipeline {piped[-1]:.2f} images/s, (b) bare model "
                f"{bare[-1]:.2f} images/s, ratio {piped[-1] / bare[-1]:.2f}"
            )
    a, b = statistics.median(piped), statistics.median(bare)
    print(
        f"median: (a) pipeline {a:.2f} images/s | (b) bare model {b:.2f} images/s | "
        f"ratio {a / b:.2f} (target >= 0.80)"
    )


if __name__ == "__main__":
    main()
