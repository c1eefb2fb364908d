"""The `captioner benchmark` subcommand: its flags, and the run (captioner.serving.benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner.cli.caption import add_decoding_arguments, add_model_arguments
from captioner.cli.flags import Switch, checked_config, positive_int
from captioner.model.options import DecodeOptions
from captioner.serving.settings import ENCODER_OPTIONS


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser, "model folder or Hub repo id to time (default: random decoder weights)")
    parser.add_argument(
        "--quantize",
        action=Switch,
        default=True,
        help="also time quantize=True (int8 encoder and decoder) if the model folder has its "
        "encoder_int8.onnx (default: on)",
    )
    parser.add_argument(
        "--vocab-size",
        type=positive_int,
        default=3000,
        help="words of the random-decoder vocabulary (default: %(default)s)",
    )
    parser.add_argument(
        "--encoder-batches",
        type=positive_int,
        nargs="+",
        default=[1, 8],
        help="photos per encoder call (default: 1 8)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=[1, 32],
        help="photos per caption() call (default: 1 32)",
    )
    add_decoding_arguments(parser, max_length=None)  # none: 16 words with random weights, else 20
    add_timing_arguments(parser)
    return parser


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """What is timed and how: photo size, runs, threads, feature extraction, dev CIDEr."""
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=224,
        help="side of the test photo in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--runs",
        type=positive_int,
        default=7,
        help="timed runs of each contender; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of each contender first (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        nargs="+",
        default=[1, 2],
        help="thread counts to time, torch's and onnxruntime's (default: 1 2)",
    )
    add_extraction_arguments(parser)


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """Feature extraction and dev CIDEr: the runs over real (or generated) photos."""
    parser.add_argument(
        "--extract-images",
        type=int,
        default=64,
        help="photos per feature-extraction run (Flickr8k photos if --flickr-root is "
        "there, else generated ones; 0: skip) (default: %(default)s)",
    )
    parser.add_argument(
        "--extract-runs",
        type=positive_int,
        default=3,
        help="feature-extraction runs; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--flickr-root",
        metavar="DIR",
        help="the Flickr8k folder, for --dev-cider and for feature extraction "
        "(default: none; extraction then uses generated photos)",
    )
    parser.add_argument(
        "--dev-cider",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: CIDEr of each encoder option on the first N Flickr8k dev photos",
    )
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=list(ENCODER_OPTIONS),
        choices=ENCODER_OPTIONS,
        help="with --dev-cider: the encoder options to score (the first is the reference)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process time, steadier on a shared machine (sums over threads) (default: %(default)s)",
    )


def run_benchmark(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.dev_cider and not args.flickr_root:
        parser.error("--dev-cider scores Flickr8k dev photos: give --flickr-root, the Flickr8k folder")
    if args.dev_cider and not Path(args.flickr_root).is_dir():
        parser.error(
            f"--dev-cider scores Flickr8k dev photos, but --flickr-root {args.flickr_root} is not a folder"
        )
    if args.max_length is None:  # a random decoder never says <end>: 16 words, near a real caption's time
        args = argparse.Namespace(**{**vars(args), "max_length": 20 if args.model else 16})
    options: DecodeOptions = checked_config(parser, DecodeOptions, args)
    from captioner.serving import benchmark

    benchmark.run(args, options)
    return 0
