"""Inference speed: the encoder, the whole Captioner.caption() call and feature extraction.

    captioner benchmark --model weights        # the shipped model: the honest numbers
    captioner benchmark                        # default ModelConfig, random decoder

In one run, for each thread count (--threads, default 1 and 2: torch's threads and onnxruntime's
intra-op threads alike):
1. the encoder on --encoder-batches photos (default 1 and 8): timm's stock model
   (`timm.create_model(arch).forward_features`), the project's Encoder in eager PyTorch (the
   torch path: training, GPUs), onnxruntime fp32 (captioner.model.onnx_encoder: the CPU path) and,
   if the model folder has encoder_int8.onnx, onnxruntime int8 (quantize=True); then the floor
   this CPU puts under them (captioner.serving.roofline);
2. the full caption() call (preprocessing, encoder, beam search, attention maps) for each of
   --batch-sizes photos, with the torch encoder, with onnxruntime and with quantize=True;
3. feature extraction for training (the feature cache's loader and fp16 grids, batch 32, photos
   loaded in the main process): photos/s, torch against onnxruntime; and captioning a folder as
   `captioner caption` does, photos/s of the same captioners (captioner.serving.benchmark_photos).
Then the onnxruntime encoder's start-up (export on first use, load from the cache) and the
process's peak memory. `--dev-cider N` instead scores the encoders on the first N Flickr8k dev
photos (CIDEr, and how many captions equal the first encoder's). Every comparison interleaves its
contenders run by run, so that a change in the machine's load hits them alike, and reports
medians over --runs after --warmup untimed runs.

Without --model the decoder has random weights (the encoder has its real ImageNet
weights). That is fine for timing only: a random decoder never says <end>, so every caption
runs to --max-length words, while a trained model stops after ~10.

The flags are defined in captioner.cli (add_benchmark_arguments), so that --help needs no torch.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.decoder import AttentionDecoder, reads_attributes
from captioner.model.encoder import Encoder
from captioner.model.onnx_decoder import OnnxDecoder, runtime_decoder, supported
from captioner.model.onnx_encoder import OnnxEncoder
from captioner.model.options import DecodeOptions
from captioner.model.quantize import Int8EncoderError, int8_encoder
from captioner.model.vocabulary import SPECIAL_TOKENS, Vocabulary
from captioner.serving import captioner as api
from captioner.serving.benchmark_photos import dev_cider, sample_image, time_extraction, time_folder
from captioner.serving.captioner import Captioner
from captioner.serving.roofline import conv_macs, encoder_floors, gemm_rates

Calls = dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]  # name -> (function, its arguments)
Forward = Callable[[torch.Tensor], torch.Tensor]
STOCK, TORCH, ONNX = "timm stock forward_features", "torch eager (Encoder)", "onnxruntime fp32"
INT8 = "onnxruntime int8 (quantize=True)"
QUANTIZED = "quantize=True (int8 encoder+decoder)"
# Before each timed call, an untimed pause and then an untimed call of the same contender: the
# previous contender's idle torch (OpenMP) workers spin for milliseconds after its last parallel
# operation, on the cores the next one needs; after the pause, a first call finds cold caches
# (a 1.1 ms decoder step then takes 2.5 ms).
SETTLE_SECONDS = 0.05


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
        captioner = Captioner.from_pretrained(args.model, device="cpu")
        return captioner, f"model {args.model}"
    words = (f"word{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))
    vocab = Vocabulary([*SPECIAL_TOKENS, *words])
    model = CaptionModel(ModelConfig(), len(vocab))
    captioner = Captioner(model, vocab, device="cpu")
    return captioner, "default ModelConfig, RANDOM decoder weights: timing only, captions are meaningless"


def with_runtime(captioner: Captioner, encoder: torch.nn.Module, decoder: Any) -> Captioner:
    """A Captioner of the same model whose images go through `encoder` and whose words come from
    `decoder` (the torch modules, or their onnxruntime runners)."""
    other = Captioner(captioner.model, captioner.vocab, device="cpu")
    other.encoder, other.decoder = encoder, decoder
    return other


def int8_runner(captioner: Captioner, threads: int) -> OnnxEncoder | None:
    """The model folder's int8 encoder (quantize=True), or None without one (it is then not timed)."""
    try:
        return int8_encoder(captioner.model.encoder, captioner.path, threads)
    except Int8EncoderError as err:
        print(f"(int8 not timed: {str(err).split(':')[0]})")
        return None


def clock(args: argparse.Namespace) -> Callable[[], float]:
    """The timer --clock names: wall time, or this process's CPU time."""
    return time.process_time if args.clock == "cpu" else time.perf_counter


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(
    calls: Calls, args: argparse.Namespace, runs: int | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Median milliseconds of each named call (fn, args), runs interleaved, each after a pause
    and an untimed call (SETTLE_SECONDS); and each one's last result."""
    now = clock(args)
    for fn, fn_args in list(calls.values()) * args.warmup:
        fn(*fn_args)
    times: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, Any] = {}
    for _ in range(runs or args.runs):
        for name, (fn, fn_args) in calls.items():
            time.sleep(SETTLE_SECONDS)
            fn(*fn_args)  # untimed: caches warm again after the pause
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


def time_inference(captioner: Captioner, what: str, options: DecodeOptions, args: argparse.Namespace) -> None:
    """The timings (encoder, caption(), feature extraction) for each of --threads, then start-up
    and peak memory."""
    encoder = captioner.model.encoder
    image = sample_image(args.image_size)
    pixels = captioner.preprocess(image)[None]  # (1, 3, S, S)
    forward = unmodified_backbone(encoder)
    with FlopCounterMode(display=False) as flop_counter:
        forward(pixels)
    encoder_gflop = flop_counter.get_total_flops() / 1e9
    print_setting(captioner, what, options, args, encoder_gflop)
    macs = conv_macs(encoder, pixels)
    torch_threads = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        onnx = OnnxEncoder(encoder, threads=threads).prepare()
        int8 = int8_runner(captioner, threads) if args.quantize else None
        print(f"\n=== {threads} thread(s), load average {os.getloadavg()[0]:.1f} ===")
        decoder = captioner.model.decoder
        steps = {"torch": decoder, "onnxruntime fp32": runtime_decoder(decoder, threads=threads)}
        encoders: dict[str, Forward] = {STOCK: forward, TORCH: encoder, ONNX: onnx}
        captioners = {
            "torch (encoder, decoder)": with_runtime(captioner, encoder, decoder),
            "onnxruntime fp32 (quantize=False)": with_runtime(captioner, onnx, steps["onnxruntime fp32"]),
        }
        if int8 is not None:
            encoders[INT8] = int8
            steps["onnxruntime int8"] = runtime_decoder(decoder, quantize=True, threads=threads)
            captioners[QUANTIZED] = with_runtime(captioner, int8, steps["onnxruntime int8"])
        stock = time_encoders(encoders, pixels, encoder_gflop, args)
        print_floors(macs, threads, stock)
        time_decoder_steps(steps, captioner, options.beam_size, args)
        time_captions(captioners, image, options, args, stock)
        if args.extract_images:
            time_extraction(encoder, onnx, args)
            time_folder(captioners, options, args)
    torch.set_num_threads(torch_threads)
    print()
    time_startup(captioner)
    print(f"peak memory of this process: {peak_memory_mb():.0f} MB")
    if args.model:
        print(f"\ncaption: {captioner.caption(image, options).text!r}")


def print_setting(
    captioner: Captioner, what: str, options: DecodeOptions, args: argparse.Namespace, encoder_gflop: float
) -> None:
    c = captioner.model.config
    print(f"model: {what}")
    print(
        f"  {c.backbone} at {c.image_size}px, {c.grid_size}x{c.grid_size} grid, {c.attention} attention, "
        f"hidden {c.hidden_dim}, vocabulary {len(captioner.vocab)}, encoder batch {api.CPU_ENCODER_BATCH}"
    )
    print(
        f"  beam {options.beam_size}, max_length {options.max_length}, {args.clock} clock, median of "
        f"{args.runs} interleaved runs after {args.warmup} warm-up, each after a {SETTLE_SECONDS * 1000:.0f} "
        f"ms pause and an untimed call; encoder {encoder_gflop:.2f} GFLOP per photo"
    )
    print(
        f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start "
        f"(a busy machine inflates times); peak memory after loading {peak_memory_mb():.0f} MB"
    )


def time_encoders(
    encoders: dict[str, Forward], pixels: torch.Tensor, encoder_gflop: float, args: argparse.Namespace
) -> float:
    """The encoders on each of --encoder-batches photos, against the first (timm's stock model).
    Returns the stock model's ms for one photo (the first batch size's, per photo)."""
    print(
        f"encoder at {pixels.shape[-1]}px {'photos':>26} {'ms':>8} {'ms/photo':>9} {'x stock':>8} "
        f"{'GFLOP/s':>8}"
    )
    stock_one = 0.0
    for batch in args.encoder_batches:
        photos = pixels.expand(batch, -1, -1, -1).contiguous()
        with torch.inference_mode():
            ms, _ = interleaved({name: (forward, (photos,)) for name, forward in encoders.items()}, args)
        base = ms[STOCK]
        stock_one = stock_one or base / batch
        for name, value in ms.items():
            gflops = encoder_gflop * batch / value * 1000
            print(
                f"  {name:<32} {batch:>6} {value:>8.1f} {value / batch:>9.1f} {value / base:>8.2f} "
                f"{gflops:>8.1f}"
            )
    return stock_one


def print_floors(macs: dict[str, float], threads: int, stock_ms: float) -> None:
    """What this CPU allows (captioner.serving.roofline): its large-matrix-product rate, and the
    time the encoder's 1x1 convolutions need at that rate, against the stock encoder on one photo."""
    rates = gemm_rates(threads)
    floors = encoder_floors(macs, rates)
    needs = (f"{precision} {ms:.1f} ms ({ms / stock_ms:.2f}x stock)" for precision, ms in floors.items())
    print(
        f"this CPU's large matrix product on onnxruntime: fp32 {rates['fp32']:.1f}, int8 "
        f"{rates['int8']:.1f} GMAC/s; the encoder's 1x1 convolutions ({macs['1x1'] / 1e9:.2f} of "
        f"{sum(macs.values()) / 1e9:.2f} GMAC) need at that rate, per photo: " + ", ".join(needs)
    )


def time_decoder_steps(
    steps: dict[str, Any], captioner: Captioner, rows: int, args: argparse.Namespace
) -> None:
    """One decoder step (one word) for `rows` beams of one photo, each runner against torch's."""
    for runner in steps.values():  # the graphs' export is start-up, timed below
        if isinstance(runner, OnnxDecoder):
            runner.prepare_graph()
    config = captioner.model.config
    features = torch.randn(
        1, captioner.grid_shape[0] * captioner.grid_shape[1], captioner.model.encoder.feature_dim
    )
    decoder = captioner.model.decoder
    attributes = torch.full((1, 1000), 1e-3) if reads_attributes(decoder) else None  # semantic attributes
    with torch.inference_mode():
        annotations, keys = decoder.prepare(features, attributes)  # the photo's grid, read by all its beams
        h, c = decoder.init_state(annotations)
        state = (h.expand(rows, -1).contiguous(), c.expand(rows, -1).contiguous())
        words = torch.full((rows,), 4, dtype=torch.long)
        ms, _ = interleaved(
            {name: (d.step, (annotations, keys, words, state)) for name, d in steps.items()}, args
        )
    print(f"decoder step, {rows} beams, hidden {config.hidden_dim} {'ms':>26} {'x torch':>8}")
    for name, value in ms.items():
        print(f"  {name:<52} {value:>8.2f} {value / ms['torch']:>8.2f}")


def time_captions(
    captioners: dict[str, Captioner],
    image: Image.Image,
    options: DecodeOptions,
    args: argparse.Namespace,
    stock_ms: float,
) -> None:
    """The whole caption() call of each captioner for each of --batch-sizes photos; per photo
    against the stock encoder alone on one photo (x stock enc.)."""
    print(
        f"caption(), beam {options.beam_size}, attention maps {'photos':>5} {'ms':>8} {'ms/photo':>9} "
        f"{'x stock enc.':>13} {'words':>6}"
    )
    for batch in args.batch_sizes:
        photos = image if batch == 1 else [image] * batch
        ms, results = interleaved(
            {
                name: (partial(each.caption, options=options, batch_size=batch), (photos,))
                for name, each in captioners.items()
            },
            args,
            runs=args.runs if batch == 1 else max(3, args.runs // 2),
        )
        for name, value in ms.items():
            result = results[name] if batch == 1 else results[name][0]
            print(
                f"  {name:<36} {batch:>6} {value:>8.1f} {value / batch:>9.1f} "
                f"{value / batch / stock_ms:>13.2f} {len(result.words):>6}"
            )


def time_startup(captioner: Captioner) -> None:
    """The onnxruntime graphs' start-up: exported on first use (written to an empty cache), then
    loaded from the cache, each up to a session ready to run."""
    runners: dict[str, Callable[[str], Any]] = {
        "encoder": lambda folder: OnnxEncoder(captioner.model.encoder, cache=folder).prepare()
    }
    decoder = captioner.model.decoder
    if isinstance(decoder, AttentionDecoder) and supported(decoder):
        runners["decoder step"] = lambda folder: OnnxDecoder(decoder, cache=folder).prepare_graph()
    for name, make in runners.items():
        with tempfile.TemporaryDirectory() as folder:
            seconds = []
            for _ in range(2):
                t0 = time.perf_counter()
                ready = make(folder)
                seconds.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in Path(folder, "onnx").glob("*.onnx")) / 1e6
        print(
            f"onnxruntime {name} start-up: first use {seconds[0]:.2f} s (export, {size:.1f} MB .onnx written "
            f"to the cache), cached {seconds[1]:.2f} s (digest, read, session); {ready.origin}"
        )
