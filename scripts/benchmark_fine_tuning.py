"""Training throughput when the encoder's last stages are fine-tuned: from cached activations
(stage cache) against photo by photo, in one run, repetitions interleaved.

    python scripts/benchmark_fine_tuning.py --images ../shared/data/flickr8k/images

Each measured step is what a training step does (the model's forward from its inputs, the
cross-entropy loss, backward, an Adam step) on a batch of photos with 5 captions each, with the
shipped model's settings (EfficientNet-Lite2 at 448 px, 512-wide decoder). Also prints the
one-time cost: how fast the stage cache is filled (photos/s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from captioner.data.images import load_image
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.onnx_encoder import runtime_encoder
from captioner.training.config import TrainConfig
from captioner.training.losses import caption_loss
from captioner.training.optimizer import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="a folder of photos (default: generated ones)")
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[7, 6],
        help="stage caches to time (Lite2: 7 = last block group + head, 6 = last two)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=2540)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = ModelConfig(backbone=args.backbone, image_size=args.image_size, input_dropout=0.3)
    model = CaptionModel(config, args.vocab_size)
    pixels = photos(args.images, model, args.batch_size)
    captions = torch.randint(4, args.vocab_size, (5 * args.batch_size, 13))
    captions[:, 0], captions[:, -1] = 1, 2  # <start> ... <end>
    lengths, owner = torch.full((len(captions),), 13), torch.arange(args.batch_size).repeat_interleave(5)

    inputs = {}  # setting -> (from_stage, input batch)
    for stage in args.stages:
        encoder = runtime_encoder(model.encoder, until_stage=stage)
        with torch.inference_mode():
            encoder(pixels[:2])  # warm-up
            start = time.perf_counter()
            activations = encoder(pixels)
            rate = len(pixels) / (time.perf_counter() - start)
        size = activations[0].numel() * 2 / 1024
        print(
            json.dumps(
                {
                    "stage cache": stage,
                    "activations": list(activations.shape[1:]),
                    "kb_per_photo_fp16": round(size),
                    "fill_photos_per_s": round(rate, 1),
                }
            )
        )
        inputs[f"stage cache, tune from stage {stage}"] = (stage, activations.clone())
    inputs[f"photos, tune from stage {args.stages[0]}"] = (0, pixels)

    def step(from_stage: int, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        logits, alphas = model(x, captions, lengths, owner, from_stage=from_stage)
        loss, _ = caption_loss(logits, captions, alphas)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in inputs}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, (from_stage, x) in inputs.items():
            model.encoder.set_trainable(from_stage if from_stage else args.stages[0])
            model.train()
            optimizer = make_optimizer(TrainConfig(), model, 4e-4)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(from_stage, x, optimizer)
            if repeat:
                times[name].append((time.perf_counter() - start) / args.steps)
    for name, seconds in times.items():
        best = min(seconds)
        print(
            json.dumps(
                {
                    "setting": name,
                    "seconds_per_step": round(best, 3),
                    "photos_per_s": round(args.batch_size / best, 1),
                    "threads": torch.get_num_threads(),
                }
            )
        )


def photos(folder: Path | None, model: CaptionModel, count: int) -> torch.Tensor:
    """(count, 3, S, S) preprocessed photos: the first of `folder`, or generated noise images."""
    transform = model.encoder.transform
    if folder is None:
        from PIL import Image

        generator = torch.Generator().manual_seed(0)
        return torch.stack(
            [
                transform(
                    Image.fromarray(
                        torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8).numpy()
                    )
                )
                for _ in range(count)
            ]
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
    return torch.stack([transform(load_image(p)) for p in files])


if __name__ == "__main__":
    main()
