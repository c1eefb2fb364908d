"""Inference speed: the encoder, the whole Captioner.caption() call and feature extraction.

    captioner benchmark --model weights        # the shipped model: the honest numbers
    captioner benchmark                        # default ModelConfig, random decoder

For each thread count (--threads, default 1 and 2), in one run:
1. the encoder on one photo: timm's unmodified model (`timm.create_model(arch).forward_features`)
   against the project's inference encoder (captioner.model.inference_encoder), one optimisation
   at a time,
   with the GFLOP/s each achieves and, for scale, a large fp32 matrix product's GFLOP/s;
2. the full caption() call (image preprocessing, encoder, beam search, attention maps) for 1
   photo and a batch of 32: today's (the code path before issue 20: the plain Encoder, and
   decoding through nn.LSTMCell) and the project's (inference encoder, word tables);
3. feature extraction for training (the feature cache's loader and fp16 grids, batch 32, photos
   loaded in the main process): photos/s, plain encoder against inference encoder.
--compile and --int8 add the inference encoder's opt-ins to 1 and 2. `--dev-cider N` instead
scores every encoder option on the first N Flickr8k dev photos (what each costs in CIDEr).
Every comparison interleaves its contenders run by run, so that a change in the machine's load
hits them alike, and reports medians over --runs after --warmup untimed runs.

Without --model the decoder has random weights (the encoder has its real ImageNet
weights). That is fine for timing only: a random decoder never says <end>, so every caption
runs to --max-length words, while a trained model stops after ~10.

The flags are defined in captioner.cli (add_benchmark_arguments), so that --help needs no torch.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from skimage import data
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from captioner.data.datasets import load_flickr
from captioner.data.images import ImageFiles, collate_images
from captioner.evaluation.metrics import score_captions
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.decoder import AttentionDecoder
from captioner.model.encoder import Encoder
from captioner.model.inference_encoder import InferenceEncoder, calibration_photos
from captioner.model.options import DecodeOptions
from captioner.model.vocabulary import SPECIAL_TOKENS, Vocabulary
from captioner.serving import captioner as api
from captioner.serving.captioner import Captioner

Calls = dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]  # name -> (function, its arguments)
Forward = Callable[[torch.Tensor], torch.Tensor]


def run(args: argparse.Namespace, options: DecodeOptions) -> None:
    """Print the timing tables (or, with args.dev_cider, the CIDEr table) for the parsed flags."""
    torch.manual_seed(0)
    captioner, what = load_captioner(args)
    if args.dev_cider:
        if args.threads:
            torch.set_num_threads(args.threads[0])
        dev_cider(captioner, args, options)
        return
    time_inference(captioner, what, options, args)


def load_captioner(args: argparse.Namespace) -> tuple[Captioner, str]:
    """The captioner to time, and what it is (for the report)."""
    if args.model:
        captioner = Captioner.from_pretrained(args.model, device="cpu", quantize=args.quantize)
        return captioner, f"model {args.model}" + (" (int8 decoder)" if args.quantize else "")
    words = (f"word{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))
    vocab = Vocabulary([*SPECIAL_TOKENS, *words])
    model = CaptionModel(ModelConfig(), len(vocab))
    captioner = Captioner(model, vocab, device="cpu", quantize=args.quantize)
    return captioner, "default ModelConfig, RANDOM decoder weights: timing only, captions are meaningless"


def with_encoder(captioner: Captioner, encoder: torch.nn.Module) -> Captioner:
    """A Captioner of the same model whose images go through `encoder`."""
    other = Captioner(captioner.model, captioner.vocab, device="cpu")
    other.encoder = encoder
    return other


TODAY = "today (plain Encoder, LSTMCell)"


def todays_captioner(captioner: Captioner) -> Captioner:
    """The code path before issue 20: the plain Encoder, and decoding through nn.LSTMCell (a
    copy of the model, so the project's decoder keeps its word tables)."""
    model = copy.deepcopy(captioner.model)
    for module in model.modules():
        if isinstance(module, AttentionDecoder):
            module.word_tables = False
    other = Captioner(model, captioner.vocab, device="cpu")
    other.encoder = model.encoder
    return other


def clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer --clock names: wall time, or this process's CPU time."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def sample_image(size: int) -> Image.Image:
    """A real photo (skimage's coffee cup) at `size` pixels square, as a user would pass it."""
    image = Image.fromarray(data.coffee())
    return image.resize((size, size), Image.Resampling.BICUBIC)


def interleaved(calls: Calls, args: argparse.Namespace, runs: int | None = None
                ) -> tuple[dict[str, float], dict[str, Any]]:
    """Median milliseconds of each named call (fn, args), runs interleaved; and each one's last result."""
    now = clock(args)
    for fn, fn_args in list(calls.values()) * args.warmup:
        fn(*fn_args)
    times: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, Any] = {}
    for _ in range(runs or args.runs):
        for name, (fn, fn_args) in calls.items():
            t0 = now()
            results[name] = fn(*fn_args)
            times[name].append(now() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}, results


def unmodified_backbone(encoder: Encoder) -> Forward:
    """The backbone as its library builds it, with the encoder's weights: the reference. Returns
    its pass from pixels (B, 3, S, S) to the last feature map."""
    if encoder.spec.source == "timm":
        net = timm.create_model(encoder.spec.arch, pretrained=False, num_classes=0)
        net.load_state_dict(encoder.body.state_dict())
        return cast(Forward, net.eval().forward_features)  # timm types its models as nn.Module
    net = getattr(torchvision.models, encoder.spec.arch)(weights=None)
    net.load_state_dict(encoder.body.state_dict(), strict=False)
    return torch.nn.Sequential(*list(net.children())[:-2]).eval()


def matmul_gflops(now: Callable[[], float], n: int = 2048, runs: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matrix product, about the best the CPU does at this precision."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds = []
    for _ in range(runs):
        t0 = now()
        a @ b
        seconds.append(now() - t0)
    return 2 * n**3 / statistics.median(seconds) / 1e9


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
    loader = DataLoader(ImageFiles(paths, encoder.transform), batch_size=32, num_workers=0,
                        collate_fn=collate_images)
    grids = np.zeros((len(paths), encoder.grid_size**2, encoder.feature_dim), dtype=np.float16)
    start, row = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in loader:
            assert batch.pixels is not None  # the photos are ours: they all load
            grids[row : row + len(batch.pixels)] = forward(batch.pixels).to(torch.float16).numpy()
            row += len(batch.pixels)
    return len(paths) / (time.perf_counter() - start)


def dev_cider(captioner: Captioner, args: argparse.Namespace, options: DecodeOptions) -> None:
    """Caption the first --dev-cider Flickr8k dev photos with each encoder option and score them."""
    encoder, project = captioner.model.encoder, captioner.encoder
    dataset = load_flickr(args.flickr_root)
    images = dataset["val"][: args.dev_cider]
    references = {i.image_id: i.captions for i in images}
    pixels = torch.stack([captioner.preprocess(i.path) for i in images])
    train_photos = dataset["train"][:32]
    encoders: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
        "today": ("today (plain Encoder)", lambda: encoder),
        "project": ("project (fp32)", lambda: project),
        "compile": ("project + torch.compile", lambda: InferenceEncoder(encoder, compile=True)),
        "int8-skimage": ("int8, calibrated on 10 scikit-image photos", lambda: InferenceEncoder(
            encoder, int8_calibration=calibration_photos(encoder.transform))),
        "int8-flickr": ("int8, calibrated on 32 Flickr8k train photos", lambda: InferenceEncoder(
            encoder, int8_calibration=torch.stack([captioner.preprocess(i.path) for i in train_photos]))),
    }
    print(f"{len(images)} Flickr8k dev photos, beam {options.beam_size}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"{'encoder':<46} {'CIDEr':>6} {'BLEU-4':>7} {'same captions':>14} {'encoder s':>10}")
    plain = None
    for name, build in (encoders[key] for key in args.encoders):
        captioner.encoder = build()
        with torch.inference_mode():
            captioner.encoder(pixels[:1])  # compiles, if it does, for each batch size to come
            captioner.encoder(pixels[: api.CPU_ENCODER_BATCH])
            t0 = time.perf_counter()
            for part in pixels.split(api.CPU_ENCODER_BATCH):
                captioner.encoder(part)
            seconds = time.perf_counter() - t0
        texts = [r.text for batch in pixels.split(32)
                 for r in captioner.caption_tensors(batch, options)]
        plain = plain or texts
        scores = score_captions(dict(zip(references, texts, strict=True)), references, meteor=False)
        same = sum(a == b for a, b in zip(texts, plain, strict=True))
        print(f"{name:<46} {scores['CIDEr']:>6.2f} {scores['BLEU-4']:>7.2f} {same:>9}/{len(texts)} "
              f"{seconds:>10.1f}")


def time_inference(captioner: Captioner, what: str, options: DecodeOptions, args: argparse.Namespace) -> None:
    """The three timings (encoder, caption(), feature extraction) for each of --threads."""
    encoder = captioner.model.encoder
    image = sample_image(args.image_size)
    pixels = captioner.preprocess(image)[None]  # (1, 3, S, S)
    forward = unmodified_backbone(encoder)
    with FlopCounterMode(display=False) as flop_counter:
        forward(pixels)
    encoder_gflop = flop_counter.get_total_flops() / 1e9
    opt_ins = opt_in_encoders(encoder, args)
    captioners = {TODAY: todays_captioner(captioner), "project": captioner}
    for name, fast_encoder in opt_ins.items():
        captioners[f"project, {name[8:]}"] = with_encoder(captioner, fast_encoder)
    encoders: dict[str, Forward] = {f"{encoder.spec.arch} unmodified": forward,
                                    "project Encoder (today)": encoder, **encoder_steps(captioner), **opt_ins}
    print_setting(captioner, what, options, args, encoder_gflop)
    torch_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n=== {threads} thread(s), load average {os.getloadavg()[0]:.1f} ===")
        time_encoders(encoders, pixels, encoder_gflop, args)
        time_captions(captioners, image, options, args)
        if args.extract_images:
            time_extraction(captioner, args)
    torch.set_num_threads(torch_threads)
    if args.model:
        print(f"\ncaption: {captioner.caption(image, options).text!r}")


def encoder_steps(captioner: Captioner) -> dict[str, torch.nn.Module]:
    """The inference encoder's optimisations added one at a time, ending with the project's."""
    encoder = captioner.model.encoder
    return {
        "+ batch norm folded": InferenceEncoder(encoder, static_padding=False, channels_last=False,
                                                matmul_pointwise=False, fuse=False),
        "+ static padding": InferenceEncoder(encoder, channels_last=False, matmul_pointwise=False,
                                             fuse=False),
        "+ channels_last": InferenceEncoder(encoder, matmul_pointwise=False, fuse=False),
        "+ 1x1 convs as matmuls": InferenceEncoder(encoder, fuse=False),
        "+ oneDNN conv+ReLU6 fused (project)": captioner.encoder,
    }


def opt_in_encoders(encoder: Encoder, args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """--compile and --int8: encoders timed alone and inside caption()."""
    opt_ins: dict[str, torch.nn.Module] = {}
    if args.compile:
        opt_ins["opt-in: torch.compile (inductor)"] = InferenceEncoder(encoder, compile=True)
    if args.int8:
        opt_ins["opt-in: int8 (torchao, skimage calib.)"] = InferenceEncoder(
            encoder, int8_calibration=calibration_photos(encoder.transform))
    return opt_ins


def print_setting(captioner: Captioner, what: str, options: DecodeOptions, args: argparse.Namespace,
                  encoder_gflop: float) -> None:
    c = captioner.model.config
    print(f"model: {what}")
    print(f"  {c.backbone} at {c.image_size}px, {c.grid_size}x{c.grid_size} grid, {c.attention} attention, "
          f"hidden {c.hidden_dim}, vocabulary {len(captioner.vocab)}, encoder batch {api.CPU_ENCODER_BATCH}")
    print(f"  beam {options.beam_size}, max_length {options.max_length}, {args.clock} clock, median of "
          f"{args.runs} interleaved runs after {args.warmup} warm-up; encoder {encoder_gflop:.2f} GFLOP "
          "per photo")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start "
          "(a busy machine inflates times)")


def time_encoders(encoders: dict[str, Forward], pixels: torch.Tensor, encoder_gflop: float,
                  args: argparse.Namespace) -> None:
    """The encoders on one photo, against the first (the unmodified backbone), and the CPU's
    matrix-product speed for scale."""
    with torch.inference_mode():
        ms, _ = interleaved({name: (forward, (pixels,)) for name, forward in encoders.items()}, args)
    base = next(iter(ms.values()))
    matmul = matmul_gflops(clock(args))  # timed with the encoder's clock
    print(f"encoder, 1 photo at {pixels.shape[-1]}px {'ms':>20}  x unmodified  GFLOP/s  % of matmul")
    for name, value in ms.items():
        gflops = encoder_gflop / value * 1000
        share = 100 * gflops / matmul
        print(f"  {name:<38} {value:>6.1f} {value / base:>8.2f} {gflops:>11.1f} {share:>8.0f}%")
    print(f"  fp32 2048x2048 matmul: {matmul:.1f} GFLOP/s")


def time_captions(captioners: dict[str, Captioner], image: Image.Image, options: DecodeOptions,
                  args: argparse.Namespace) -> None:
    """The whole caption() call of each captioner, for each of --batch-sizes, against today's."""
    print(f"caption(), beam {options.beam_size}, attention maps {'photos':>12} {'ms':>8} {'x today':>8} "
          f"{'ms/photo':>9} {'words':>6}")
    for batch in args.batch_sizes:
        photos = image if batch == 1 else [image] * batch
        ms, results = interleaved(
            {name: (partial(each.caption, options=options, batch_size=batch), (photos,))
             for name, each in captioners.items()},
            args, runs=args.runs if batch == 1 else max(3, args.runs // 2))
        for name, value in ms.items():
            result = results[name] if batch == 1 else results[name][0]
            print(f"  {name:<44} {batch:>6} {value:>8.1f} {value / ms[TODAY]:>8.2f} "
                  f"{value / batch:>9.1f} {len(result.words):>6}")


def time_extraction(captioner: Captioner, args: argparse.Namespace) -> None:
    """Feature extraction's photos/s with the plain encoder (today) and the inference encoder."""
    encoder = captioner.model.encoder
    project = InferenceEncoder(encoder)
    with tempfile.TemporaryDirectory() as folder:
        paths = extraction_paths(Path(folder), args)
        rates: dict[str, list[float]] = {"today": [], "project": []}
        for _ in range(args.extract_runs):
            rates["today"].append(extract(encoder, encoder, paths))
            rates["project"].append(extract(encoder, project, paths))
    today, fast = (statistics.median(rates[k]) for k in ("today", "project"))
    source = "Flickr8k" if args.flickr_root and Path(args.flickr_root).is_dir() else "generated"
    print(f"feature extraction, {len(paths)} {source} photos, batch 32 (median of "
          f"{args.extract_runs}): today {today:.1f} photos/s, project {fast:.1f} photos/s "
          f"({fast / today:.2f}x)")
