"""The `captioner` command: caption | train | evaluate | app | export | benchmark.

Each subcommand's flags are defined by an `add_*_arguments(parser)` function and run by a
`run_*(args, parser)` function that imports torch, timm or gradio only once it runs, so that
`captioner --help` and `captioner SUB --help` answer at once. `captioner-caption`, `python
app.py` and `scripts/*.py` are aliases of the subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from captioner.cli.app import add_app_arguments, run_app
from captioner.cli.benchmark import add_benchmark_arguments, run_benchmark
from captioner.cli.caption import (  # noqa: F401 (caption_folder_main: the captioner-caption script)
    CAPTION_HELP,
    EXIT_NOTHING_CAPTIONED,
    EXIT_SETUP_FAILED,
    MODEL_HELP,
    OLD_SPELLINGS,
    add_caption_arguments,
    add_decoding_arguments,
    add_model_arguments,
    caption_folder_main,
    caption_folder_parser,
    run_caption,
)
from captioner.cli.errors import EXIT_STATUS, require_dataset, run_reporting
from captioner.cli.flags import (
    FlagParser,
    Switch,
    add_config_arguments,
    add_quantize_flag,
    checked_config,
    config_from_args,
    field_docs,
    load_config_file,
    positive_int,
)
from captioner.data.config import DataConfig
from captioner.model.options import DecodeOptions
from captioner.training.config import TrainConfig

Runner = Callable[[argparse.Namespace, argparse.ArgumentParser], int]


# ----------------------------------------------------------------------------- train


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config",
        metavar="JSON",
        help="a saved train_config.json to start from; the flags given override it",
    )
    add_config_arguments(parser, TrainConfig)
    return parser


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        cfg = config_from_args(TrainConfig, args, load_config_file(args.config))
    except ValueError as err:  # a setting out of range, in a flag or in the --config file
        parser.error(str(err))
    check_dataset(cfg.data)
    from captioner.training.loop import train

    summary = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary, from rank 0
        print(json.dumps(summary, indent=2))
    return 0


# ----------------------------------------------------------------------------- evaluate


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_model_arguments(parser)
    parser.add_argument(
        "--split",
        default="val",
        choices=["train", "val", "test"],
        help="the dataset split to score (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images captioned together (default: %(default)s)"
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="processes loading images (default: %(default)s)"
    )
    parser.add_argument("--cache-dir", help="reuse/extract the frozen encoder's feature cache here")
    parser.add_argument("--max-images", type=positive_int, help="score only the first N images of the split")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_quantize_flag(parser)
    parser.add_argument(
        "--meteor", action=Switch, default=True, help="also score METEOR (needs Java) (default: on)"
    )
    parser.add_argument(
        "--spice",
        action=Switch,
        default=False,
        help="also score SPICE (needs Java and a one-off download) (default: off)",
    )
    parser.add_argument(
        "--hard-decoding",
        choices=["argmax", "expectation"],
        help="hard-attention models: each word's context from the argmax cell (their "
        "default) or the expectation over cells",
    )
    parser.add_argument("--output-dir", help="where results.json and metrics.json go")
    add_decoding_arguments(parser)
    add_config_arguments(parser, DataConfig, prefix="data.")
    return parser


def run_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options: DecodeOptions = checked_config(parser, DecodeOptions, args)
    data_cfg = config_from_args(DataConfig, args, prefix="data.")
    check_dataset(data_cfg)
    from captioner.data.datasets import load_dataset
    from captioner.evaluation.metrics import evaluate_model
    from captioner.serving.captioner import Captioner

    images = load_dataset(data_cfg)[args.split][: args.max_images]
    captioner = Captioner.from_pretrained(
        args.model, device=args.device, quantize=args.quantize, revision=args.revision
    )
    if args.hard_decoding:
        from captioner.model.attention import set_hard_decoding

        try:
            set_hard_decoding(captioner.model, args.hard_decoding)
        except ValueError as err:
            parser.error(f"--hard-decoding: {err}")
    metrics, _ = evaluate_model(
        captioner.model,
        captioner.vocab,
        images,
        args.output_dir,
        options,
        meteor=args.meteor,
        spice=args.spice,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache_dir=args.cache_dir,
        encoder=captioner.encoder,  # --quantize: the int8 one
        decoder=captioner.decoder,
    )
    summary = {
        "model": str(captioner.path),
        "split": args.split,
        "images": len(images),
        "beam_size": options.beam_size,
        "length_penalty": options.length_penalty,
        "no_repeat_ngram_size": options.no_repeat_ngram_size,
        "hard_decoding": args.hard_decoding,
        **{k: round(v, 2) for k, v in metrics.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def check_dataset(config: DataConfig) -> None:
    """CommandError naming the --data.* flags to pass if `config` lacks its dataset's paths."""
    from captioner.data.datasets import DATASET_PATHS

    if config.kind in DATASET_PATHS:  # an unknown kind: load_dataset says which exist
        given = {name: getattr(config, name) for name in set().union(*(t for t, _ in DATASET_PATHS.values()))}
        require_dataset(config.kind, given, field_docs(DataConfig), DATASET_PATHS)


# ----------------------------------------------------------------------------- export


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="source",
        help="a model folder written by training (model.safetensors + config.json); "
        "several: one model whose decoders vote (same encoder and vocabulary)",
    )
    parser.add_argument("target", help="the folder to write, e.g. weights")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float16",
        help="how the weights are stored; they load back as fp32 (default: %(default)s)",
    )
    parser.add_argument(
        "--last-step",
        action=Switch,
        default=False,
        help="source is a run folder: export its last saved step's raw weights",
    )
    parser.add_argument(
        "--quantize",
        action=Switch,
        default=False,
        help="also write the int8 encoder (encoder_int8.onnx) that --quantize runs; needs "
        "--calibration-images (default: off)",
    )
    parser.add_argument(
        "--calibration-images",
        metavar="DIR",
        help="--quantize: a folder of photos like the ones to caption (a few hundred)",
    )
    return parser


def run_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.last_step and len(args.sources) > 1:
        parser.error("--last-step exports one run")
    if args.quantize != bool(args.calibration_images):
        parser.error("--quantize and --calibration-images go together")
    import torch

    from captioner.model.folder import load_ensemble, load_model, save_model
    from captioner.training.run_state import last_step_model

    if args.last_step:
        model, vocab, train_config = last_step_model(args.sources[0])
        metadata = {"weights": "last step, raw (not averaged)", "train_config": train_config}
    elif len(args.sources) > 1:
        model, vocab, metadata = load_ensemble(args.sources)
    else:
        model, vocab, config = load_model(args.sources[0])
        metadata = config["metadata"]
    path = save_model(args.target, model, vocab, metadata=metadata, dtype=getattr(torch, args.dtype))
    print(f"wrote {path} ({args.dtype})")
    if args.quantize:
        write_int8_encoder(path, args.calibration_images)
    return 0


def write_int8_encoder(folder: Path, calibration_images: str) -> None:
    """The int8 encoder of the model just written (weights as stored), calibrated on the photos."""
    from captioner.data.images import load_image
    from captioner.model.folder import load_model
    from captioner.model.quantize import INT8_FILE, calibration_photos, quantize_encoder

    encoder = load_model(folder)[0].encoder
    photos = calibration_photos(calibration_images)
    print(f"calibrating the int8 encoder on {len(photos)} photos from {calibration_images} ...")
    transform = encoder.transform
    quantize_encoder(encoder, photos, lambda photo: transform(load_image(photo)), folder / INT8_FILE)
    print(f"wrote {folder / INT8_FILE}")


# ----------------------------------------------------------------------------- the command

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], argparse.ArgumentParser], Runner, str]] = {
    "caption": (add_caption_arguments, run_caption, "caption folders of images into JSONL or CSV"),
    "train": (add_train_arguments, run_train, "train a model (every TrainConfig field is a flag)"),
    "evaluate": (
        add_evaluate_arguments,
        run_evaluate,
        "score a model on a dataset split: BLEU-1..4, METEOR, ROUGE-L, CIDEr",
    ),
    "app": (add_app_arguments, run_app, "the web UI: caption images and see where the model looked"),
    "export": (
        add_export_arguments,
        run_export,
        "copy a trained model (or several, as an ensemble) to a release folder",
    ),
    "benchmark": (add_benchmark_arguments, run_benchmark, "time captioning on this machine"),
}
DESCRIPTIONS = {
    "caption": CAPTION_HELP["description"],
    "train": "Train a captioner: cross-entropy with teacher forcing, then optionally self-critical "
    "fine-tuning. Several GPUs or CPU processes: torchrun --nproc_per_node N "
    "$(which captioner) train ...; continue a run: --config RUN/train_config.json --resume.",
    "evaluate": "Score a model on a dataset split with beam search and the standard COCO metrics; "
    "writes results.json (COCO results format) and metrics.json into --output-dir.",
    "app": "Start the web UI on http://127.0.0.1:7860 (same as python app.py).",
    "export": "Copy a trained model folder (e.g. runs/x/best) to a release folder, by default as fp16; "
    "several sources make one model whose decoders vote.",
    "benchmark": "Time on this machine, for each --threads count, the encoder (timm's stock "
    "backbone, the torch Encoder, onnxruntime), the whole caption() call and feature "
    "extraction, then start-up and peak memory; --dev-cider N scores the encoders on "
    "Flickr8k dev photos instead. Without --model the decoder has random weights "
    "(fine for timing only) and --max-length is 16 unless given (20 with --model).",
}


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="captioner",
        description="Show, Attend and Tell image captioning.",
        epilog=f"{EXIT_STATUS} {OLD_SPELLINGS}",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, summary) in COMMANDS.items():
        epilog = CAPTION_HELP["epilog"] if name == "caption" else f"{EXIT_STATUS} {OLD_SPELLINGS}"
        sub = commands.add_parser(name, help=summary, description=DESCRIPTIONS[name], epilog=epilog)
        add_arguments(sub)
        sub.add_argument(
            "--debug",
            action=Switch,
            default=False,
            help="on an error, also print the traceback (or set CAPTIONER_DEBUG=1) (default: off)",
        )
        sub.set_defaults(run=run, command_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`captioner COMMAND ...`; returns the exit status (see EXIT_STATUS)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    parser = args.command_parser
    return run_reporting(
        lambda: args.run(args, parser),
        args,
        parser.prog,
        EXIT_SETUP_FAILED if args.command == "caption" else 1,
    )


def alias(command: str) -> Callable[[], None]:
    """main() of a script or app.py that stands for `captioner COMMAND`."""

    def run() -> None:
        sys.exit(main([command, *sys.argv[1:]]))

    return run
