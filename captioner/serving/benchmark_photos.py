"""The benchmark's runs over many photos: feature extraction for training, captioning a folder
(the batch captioner's photos/s), and --dev-cider (the encoders' captions scored on Flickr8k dev).
Part of `captioner benchmark` (captioner.serving.benchmark)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data
from torch.utils.data import DataLoader

from captioner.data.datasets import load_flickr
from captioner.data.images import ImageFiles, collate_images
from captioner.evaluation.metrics import score_captions
from captioner.model.encoder import Encoder
from captioner.model.onnx_decoder import runtime_decoder
from captioner.model.onnx_encoder import OnnxEncoder
from captioner.model.options import DecodeOptions
from captioner.model.quantize import int8_encoder
from captioner.serving import captioner as api
from captioner.serving.batch import caption_files
from captioner.serving.captioner import Captioner
from captioner.serving.settings import BatchSettings

Forward = Callable[[torch.Tensor], torch.Tensor]


def sample_image(size: int) -> Image.Image:
    """A real photo (skimage's coffee cup) at `size` pixels square, as a user would pass it."""
    image = Image.fromarray(data.coffee())
    return image.resize((size, size), Image.Resampling.BICUBIC)


def extraction_paths(folder: Path, args: argparse.Namespace) -> list[str]:
    """--extract-images Flickr8k photos if --flickr-root is a folder, else as many generated ones."""
    if args.flickr_root and Path(args.flickr_root).is_dir():
        files = sorted((Path(args.flickr_root) / "images").glob("*.jpg"))
        return [str(p) for p in files[: args.extract_images]]
    photo = sample_image(args.image_size)
    for i in range(args.extract_images):
        photo.rotate(i).save(folder / f"photo_{i:04d}.jpg")
    return [str(folder / f"photo_{i:04d}.jpg") for i in range(args.extract_images)]


def extract(encoder: Encoder, forward: Forward, paths: list[str]) -> float:
    """Photos/s of feature extraction as the feature cache runs it (photos decoded in the main
    process, batch 32, grids stored as fp16), with `forward` computing the grids."""
    loader = DataLoader(
        ImageFiles(paths, encoder.transform), batch_size=32, num_workers=0, collate_fn=collate_images
    )
    grids = np.zeros((len(paths), encoder.grid_size**2, encoder.feature_dim), dtype=np.float16)
    start, row = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in loader:
            assert batch.pixels is not None  # the photos are ours: they all load
            grids[row : row + len(batch.pixels)] = forward(batch.pixels).to(torch.float16).numpy()
            row += len(batch.pixels)
    return len(paths) / (time.perf_counter() - start)


def dev_cider(captioner: Captioner, args: argparse.Namespace, options: DecodeOptions) -> None:
    """Caption the first --dev-cider Flickr8k dev photos with each encoder and score them. One
    float32 decoder step for all (the int8 step, a CPU's default, would add its own differences)."""
    encoders: dict[str, Callable[[], torch.nn.Module]] = {
        "torch": lambda: captioner.model.encoder,
        "onnx": lambda: OnnxEncoder(captioner.model.encoder).prepare(),
        "int8": lambda: int8_encoder(captioner.model.encoder, captioner.path),
    }
    images = load_flickr(args.flickr_root)["val"][: args.dev_cider]
    references = {i.image_id: i.captions for i in images}
    pixels = torch.stack([captioner.preprocess(i.path) for i in images])
    captioner.decoder = runtime_decoder(captioner.model.decoder)
    print(
        f"{len(images)} Flickr8k dev photos, beam {options.beam_size}, float32 decoder step, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'encoder':<10} {'CIDEr':>6} {'BLEU-4':>7} {'same captions':>14} {'encoder s':>10}")
    first = None
    for name in args.encoders:
        captioner.encoder = encoders[name]()
        with torch.inference_mode():
            t0 = time.perf_counter()
            for part in pixels.split(api.CPU_ENCODER_BATCH):
                captioner.encoder(part)
            seconds = time.perf_counter() - t0
        texts = [r.text for batch in pixels.split(32) for r in captioner.caption_tensors(batch, options)]
        first = first or texts
        scores = score_captions(dict(zip(references, texts, strict=True)), references, meteor=False)
        same = sum(a == b for a, b in zip(texts, first, strict=True))
        print(
            f"{name:<10} {scores['CIDEr']:>6.2f} {scores['BLEU-4']:>7.2f} {same:>9}/{len(texts)} "
            f"{seconds:>10.1f}"
        )


def time_extraction(encoder: Encoder, onnx: OnnxEncoder, args: argparse.Namespace) -> None:
    """Feature extraction's photos/s with the torch encoder and with onnxruntime."""
    with tempfile.TemporaryDirectory() as folder:
        paths = extraction_paths(Path(folder), args)
        rates: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(args.extract_runs):
            rates["torch"].append(extract(encoder, encoder, paths))
            rates["onnxruntime"].append(extract(encoder, onnx, paths))
    eager, fast = (statistics.median(rates[k]) for k in ("torch", "onnxruntime"))
    source = "Flickr8k" if args.flickr_root and Path(args.flickr_root).is_dir() else "generated"
    print(
        f"feature extraction, {len(paths)} {source} photos, batch 32 (median of "
        f"{args.extract_runs}): torch {eager:.1f} photos/s, onnxruntime {fast:.1f} photos/s "
        f"({fast / eager:.2f}x)"
    )


def time_folder(captioners: dict[str, Captioner], options: DecodeOptions, args: argparse.Namespace) -> None:
    """Captioning a folder as `captioner caption` does (workers decode the photos, batches of 32,
    records written): photos/s of each captioner, runs interleaved."""
    settings = BatchSettings(batch_size=32, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        paths = extraction_paths(Path(folder), args)
        rates: dict[str, list[float]] = {name: [] for name in captioners}
        for run in range(args.extract_runs):
            for name, captioner in captioners.items():
                output = Path(folder) / f"{name}-{run}.jsonl".replace(" ", "_")
                summary = caption_files(captioner, paths, output, options.replace(n_best=1), settings)
                rates[name].append(summary.images_per_second)
    print(f"captioning a folder of {len(paths)} photos (batch 32, median of {args.extract_runs}):")
    first = statistics.median(next(iter(rates.values())))
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:<36} {rate:>6.2f} photos/s {rate / first:>6.2f}x")
