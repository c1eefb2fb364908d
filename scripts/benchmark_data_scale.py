"""Time and memory of each step of training's data preparation on a COCO-sized dataset.

    python scripts/make_synthetic_coco.py /tmp/coco-synthetic
    python scripts/benchmark_data_scale.py /tmp/coco-synthetic --cache-dir /tmp/coco-cache

Runs the library's own steps in the order `train()` runs them: reading the COCO captions file,
building the vocabulary, encoding every caption, creating the feature cache (allocating all rows,
extracting the first --extract rows) and a few cross-entropy steps on those rows. Prints, per
step, the wall time, the process's resident memory after it and its peak so far (Linux).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from captioner.data.config import DataConfig
from captioner.data.datasets import load_dataset
from captioner.data.feature_cache import FeatureCache
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.vocabulary import Vocabulary
from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist
from captioner.training.inputs import PreparedData, encode_captions, step_batch
from captioner.training.optimizer import make_optimizer
from captioner.training.stages import CrossEntropy


def memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MB, from /proc/self/status."""
    status = Path("/proc/self/status").read_text()
    rss, peak = (int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM"))
    return rss, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a folder written by make_synthetic_coco.py (or COCO)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/captioner-scale-cache"))
    parser.add_argument("--extract", type=int, default=2000, help="rows of the feature cache to compute")
    parser.add_argument("--steps", type=int, default=5, help="cross-entropy steps of 32 images")
    parser.add_argument("--min-word-count", type=int, default=5)
    args = parser.parse_args()
    rows: list[dict] = []

    def step(name: str, start: float, **extra) -> None:
        rss, peak = memory_mb()
        rows.append(
            {
                "step": name,
                "seconds": round(time.perf_counter() - start, 1),
                "rss_mb": round(rss),
                "peak_rss_mb": round(peak),
                **extra,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    start = time.perf_counter()
    config = DataConfig(
        kind="coco",
        train=str(args.root / "annotations" / "captions_train2017.json"),
        train_images=str(args.root / "train2017"),
    )
    images = load_dataset(config)["train"]
    step(
        "read the dataset (pycocotools, file checks)",
        start,
        images=len(images),
        captions=sum(len(i.captions) for i in images),
    )

    start = time.perf_counter()
    vocab = Vocabulary.build((c for item in images for c in item.captions), args.min_word_count)
    step("build the vocabulary", start, words=len(vocab))

    start = time.perf_counter()
    data = PreparedData(vocab, images, len(images), encode_captions(images, vocab, 30))
    step("encode every caption", start)

    start = time.perf_counter()
    model = CaptionModel(ModelConfig(), len(vocab))  # Lite0 at 224 px: 7x7 grids
    cache = FeatureCache(args.cache_dir, model.encoder, [i.path for i in images])
    stats = cache.extract(num_workers=2, progress=False, rows=range(args.extract))
    step(
        f"feature cache: allocate {len(images):,} rows, extract {args.extract:,}",
        start,
        images_per_second=round(stats["images_per_second"], 1),
        cache_gb=round(cache.features_file.stat().st_size / 1e9, 1),
    )

    start = time.perf_counter()
    cfg = TrainConfig(model=model.config)
    stage = CrossEntropy(cfg, model, data, Dist(), torch.device("cpu"), steps_per_epoch=len(images) // 32)
    optimizer = make_optimizer(cfg, model, cfg.lr)
    model.train()
    for k in range(args.steps):
        batch_rows = list(range(32 * k, 32 * (k + 1)))
        batch = step_batch(
            batch_rows,
            cache.batch(batch_rows),
            [data.encoded[r] for r in batch_rows],
            False,
            torch.device("cpu"),
        )
        loss, _ = stage.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    step(f"{args.steps} cross-entropy steps of 32 images", start, loss=round(loss.item(), 3))

    start = time.perf_counter()
    references = data.references
    step("tokenised references (SCST only)", start, lists=len(references))


if __name__ == "__main__":
    main()
