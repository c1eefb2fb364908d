"""The `captioner caption` subcommand (also `captioner-caption`): caption folders of photos,
in shards, and merge shard outputs. Heavy modules are imported only once it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from captioner.cli.flags import FlagParser, Switch, source_constant

EXIT_NOTHING_CAPTIONED, EXIT_SETUP_FAILED = 1, 2
MODEL_HELP = ("model folder or Hugging Face Hub repo id, e.g. user/captioner-flickr8k "
              "(default: the shipped model, or $CAPTIONER_WEIGHTS)")
OLD_SPELLINGS = "Flags also accept their old spellings: --beam_size for --beam-size, --resume true/false."


def add_caption_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `captioner caption` (and `captioner-caption`); extend them here."""
    no_repeat = source_constant("captioner.model.decoding", "NO_REPEAT_NGRAM_SIZE")
    parser.add_argument("inputs", nargs="+",
                        help="image folders, image files or glob patterns; with --merge: the shard outputs")
    parser.add_argument("-o", "--output", default="captions.jsonl",
                        help="JSONL or CSV file to append to (default: %(default)s)")
    parser.add_argument("--format", choices=source_constant("captioner.serving.records", "FORMATS"),
                        help="output format (default: csv for a .csv output, else jsonl)")
    parser.add_argument("--checkpoint", help=MODEL_HELP)
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a --checkpoint repo id")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--quantize", action=Switch, default=False,
                        help="int8 decoder on CPU: faster, slightly different captions (default: off)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images captioned together (default: %(default)s)")
    parser.add_argument("--beam-size", type=positive_int, default=3,
                        help="1 = greedy decoding (default: %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=20,
                        help="most words per caption (default: %(default)s)")
    parser.add_argument("--length-penalty", type=float, default=0.0,
                        help="rank beams by log-probability / length^P; 1.0 favours longer captions "
                             "(default: %(default)s)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=no_repeat, metavar="N",
                        help="no caption repeats a phrase of N words; 3 stops 'a man in a red shirt "
                             "and a man in a red shirt'; 0 allows repeats (default: %(default)s)")
    parser.add_argument("--n-best", type=positive_int, default=1,
                        help="also store the N best captions with their scores (default: %(default)s)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="processes decoding images while the model runs; 0 = decode in the "
                             "main process (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--max-pixels", type=positive_int,
                        default=source_constant("captioner.data.images", "DEFAULT_MAX_PIXELS"),
                        help="larger images are refused as possible decompression bombs "
                             "(default: %(default)s)")
    parser.add_argument("--retry-failed", action=Switch, default=False,
                        help="retry images that failed in an earlier run (their rows are replaced)")
    parser.add_argument("--save-attention", metavar="DIR",
                        help="write a PNG of each image's per-word attention into DIR (slow)")
    parser.add_argument("--progress", action=Switch, default=True, help="show a progress bar (default: on)")
    parser.add_argument("--shard", metavar="K/N",
                        help="caption only shard K of N (0-based; a stable split by path hash). Under "
                             "torchrun each process takes the shard of its rank and writes OUTPUT.rankK")
    parser.add_argument("--merge", action="store_true",
                        help="join the shard outputs given as inputs into --output, one record per image")
    parser.add_argument("--focus-json", metavar="FILE",
                        help='caption a region of some images: a JSON object {"path": [x0, y0, x1, y1], ...} '
                             "(pixels); other images are captioned whole")
    parser.add_argument("--focus-strength", type=float,
                        default=source_constant("captioner.model.focus", "DEFAULT_STRENGTH"),
                        help="how hard attention is pulled into a --focus-json box (default: %(default)s)")
    return parser


CAPTION_HELP = dict(
    description="Caption every image in folders, files or glob patterns into a JSONL or CSV file. "
                "Folders are searched recursively for image files (by extension or by content); "
                "hidden files are skipped. Rerunning with the same output skips images already in it.",
    epilog="Exit status: 0 when at least one input has a caption, 1 when none could be captioned, "
           "2 when the model cannot be loaded or the output cannot be written. " + OLD_SPELLINGS,
)


def caption_folder_parser() -> argparse.ArgumentParser:
    return add_caption_arguments(FlagParser(prog="captioner-caption", description=CAPTION_HELP["description"],
                                            epilog=CAPTION_HELP["epilog"]))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_caption(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.n_best > args.beam_size:
        parser.error(f"--n-best {args.n_best} needs --beam-size of at least {args.n_best}")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    from captioner.model.decoding import check_decoding_options
    from captioner.serving.batch import parse_shard, rank_output, select_shard, torchrun_rank

    try:
        check_decoding_options(args.beam_size, args.max_length, args.length_penalty, args.n_best,
                               args.no_repeat_ngram_size)
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as err:  # "no_repeat_ngram_size must be ..." -> "--no-repeat-ngram-size must be ..."
        name, _, rest = str(err).partition(" ")
        parser.error(f"--{name.replace('_', '-')} {rest}")
    if args.merge:
        return _merge(args.inputs, args.output, args.format)
    focus = _read_focus(parser, args.focus_json) if args.focus_json else None
    device, output = args.device, args.output
    ranks = torchrun_rank()
    if ranks is not None:  # one process per GPU (or CPU share), one output file per process
        rank, world, local_rank = ranks
        shard, output = (rank, world), str(rank_output(args.output, rank))
        import torch

        if device is None and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
    from captioner.serving.batch import DEFAULT_NUM_WORKERS, caption_files, find_images
    from captioner.serving.captioner import Captioner
    from captioner.serving.records import OutputError

    try:
        captioner = Captioner.from_pretrained(args.checkpoint, device=device, quantize=args.quantize,
                                              revision=args.revision)
    except Exception as err:  # missing/corrupt model, bad --device: all end the run the same way
        print(f"error: cannot load the model ({type(err).__name__}): {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED

    paths = find_images(args.inputs, exclude=[output, *filter(None, [args.save_attention])])
    if shard is not None:
        paths = select_shard(paths, *shard)
    try:
        summary = caption_files(
            captioner, paths, output, fmt=args.format, batch_size=args.batch_size,
            beam_size=args.beam_size, max_length=args.max_length,
            length_penalty=args.length_penalty, n_best=args.n_best,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
            num_workers=DEFAULT_NUM_WORKERS if args.num_workers is None else args.num_workers,
            max_pixels=args.max_pixels, retry_failed=args.retry_failed,
            attention_dir=args.save_attention, progress=args.progress, focus=focus,
            focus_strength=args.focus_strength,
        )
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue where {output} stops",
              file=sys.stderr)
        return 130

    for error in summary.first_errors:
        print(f"failed: {error}", file=sys.stderr)
    if summary.failed > len(summary.first_errors):
        print(f"... and {summary.failed - len(summary.first_errors)} more; see the rows with an "
              f"error in {output}", file=sys.stderr)
    print(f"{summary} -> {output}")
    if not summary.any_captioned:
        print("error: no image could be captioned" + ("" if paths else " (no image files found)"),
              file=sys.stderr)
        return EXIT_NOTHING_CAPTIONED
    return 0


def _read_focus(parser: argparse.ArgumentParser, path: str) -> dict[str, list[float]]:
    try:
        focus = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        parser.error(f"--focus-json {path}: {err}")
    if not isinstance(focus, dict):
        parser.error(f'--focus-json {path}: expected an object {{"path": [x0, y0, x1, y1], ...}}')
    return focus


def _merge(sources: Sequence[str], target: str, fmt: str | None) -> int:
    from captioner.serving.records import OutputError, merge_outputs

    missing = [s for s in sources if not Path(s).is_file()]
    if missing:
        print(f"error: --merge: no shard output {missing[0]}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    try:
        written, dropped = merge_outputs([Path(s) for s in sources], Path(target), fmt)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    print(f"merged {len(sources)} files: {written} records, {dropped} duplicates dropped -> {target}")
    return 0


def caption_folder_main(argv: Sequence[str] | None = None) -> int:
    """`captioner-caption photos/ -o captions.jsonl`; returns the exit status."""
    parser = caption_folder_parser()
    return run_caption(parser.parse_args(argv), parser)
