"""The `captioner caption` subcommand (also `captioner-caption`): caption folders of photos,
in shards, and merge shard outputs. Heavy modules are imported only once it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.cli.flags import (
    FlagParser,
    Switch,
    add_config_arguments,
    add_quantize_flag,
    checked_config,
    positive_int,
)
from captioner.model.options import DecodeOptions
from captioner.serving.records import FORMATS
from captioner.serving.settings import BatchSettings

if TYPE_CHECKING:
    from captioner.serving.batch import Summary

EXIT_NOTHING_CAPTIONED, EXIT_SETUP_FAILED = 1, 2
MODEL_HELP = (
    "model folder or Hugging Face Hub repo id, e.g. user/captioner-flickr8k "
    "(default: the shipped model, or $CAPTIONER_WEIGHTS)"
)
OLD_SPELLINGS = (
    "Flags also accept their old spellings: --checkpoint for --model, --beam_size for "
    "--beam-size, --resume true/false."
)


def add_model_arguments(
    parser: argparse.ArgumentParser, help_text: str = MODEL_HELP, default: str | None = None
) -> None:
    """--model (alias --checkpoint): which model folder or Hub repo; --revision: its Hub revision."""
    parser.add_argument(
        "--model", "--checkpoint", dest="model", default=default, metavar="MODEL", help=help_text
    )
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a --model repo id")


def add_decoding_arguments(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """The DecodeOptions flags (--beam-size, --max-length, ...), with this command's `defaults`."""
    add_config_arguments(parser, DecodeOptions, defaults=defaults)


def add_caption_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of `captioner caption` (and `captioner-caption`); extend them here."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image folders, image files or glob patterns; with --merge: the shard outputs",
    )
    parser.add_argument(
        "-o",
        "--output",
        help="JSONL or CSV file to append to (default: captions.jsonl); --engine ray: a folder of "
        "part files (default: captions)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, help="output format (default: csv for a .csv output, else jsonl)"
    )
    add_model_arguments(parser)
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    add_quantize_flag(parser)
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="caption only shard K of N (0-based; a stable split by a hash of each file's "
        "path relative to the input that found it, the same on every machine). Under "
        "torchrun each process takes the shard of its rank and writes OUTPUT.rankK",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="join the shard outputs given as inputs into --output, one record per image",
    )
    parser.add_argument(
        "--focus-json",
        metavar="FILE",
        help='caption a region of some images: a JSON object {"path": [x0, y0, x1, y1], ...} '
        "(pixels); other images are captioned whole",
    )
    parser.add_argument(
        "--evidence",
        action=Switch,
        default=False,
        help="add an `evidence` field: the ImageNet labels the encoder saw and the caption's words "
        "they support (about 8%% slower; default: off)",
    )
    add_decoding_arguments(parser, n_best=1)  # one caption per row unless asked
    add_config_arguments(parser, BatchSettings)
    add_ray_arguments(parser)
    return parser


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine ray and its flags (Ray itself is an optional extra, imported only when it runs)."""
    ray = parser.add_argument_group('Ray engine (pip install "captioner[ray]"; see docs/guide/ray.md)')
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (or torchrun ranks); ray: Ray Data actors on a local Ray or a "
        "cluster, writing OUTPUT/part-N.jsonl (default: %(default)s)",
    )
    ray.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to join, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else start a local Ray)",
    )
    ray.add_argument(
        "--concurrency",
        type=positive_int,
        default=1,
        metavar="N",
        help="Ray actors, each with a model (default: 1)",
    )
    ray.add_argument(
        "--num-gpus",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per Ray actor, e.g. 1 or 0.5 (default: 0)",
    )


CAPTION_HELP = dict(
    description="Caption every image in folders, files or glob patterns into a JSONL or CSV file. "
    "Folders are searched recursively for image files (by extension or by content); "
    "hidden files are skipped. Rerunning with the same output skips images already in it.",
    epilog="Exit status: 0 when at least one input has a caption (or a --shard has no files), 1 when "
    "none could be captioned, 2 when an input does not exist, the model cannot be loaded or the "
    "output cannot be written (or another run is writing it). " + OLD_SPELLINGS,
)


def caption_folder_parser() -> argparse.ArgumentParser:
    return add_caption_arguments(
        FlagParser(
            prog="captioner-caption", description=CAPTION_HELP["description"], epilog=CAPTION_HELP["epilog"]
        )
    )


def run_caption(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    options: DecodeOptions = checked_config(parser, DecodeOptions, args)
    settings: BatchSettings = checked_config(parser, BatchSettings, args)
    from captioner.serving.inputs import missing_inputs, parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard else None
    except ValueError as err:  # "shard '2/2': need 0 <= K < N"
        parser.error(f"--{err}")
    args.output = args.output or ("captions" if args.engine == "ray" and not args.merge else "captions.jsonl")
    if args.merge:
        return _merge(args.inputs, args.output, args.format)
    if args.engine == "ray":
        return _caption_with_ray(args, parser, options, settings, shard)
    missing = missing_inputs(args.inputs)  # before anything slow: a typo fails at once
    if missing:
        more = f" (and {len(missing) - 1} more inputs)" if len(missing) > 1 else ""
        print(f"error: {missing[0]}: no such file or folder{more}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    focus = _read_focus(parser, args.focus_json) if args.focus_json else None
    device, output, shard = _this_process(args.device, args.output, shard)
    paths = _select(args, output, settings, shard, options, focus)
    if isinstance(paths, int):  # nothing to caption: the exit status
        return paths
    from captioner.serving.batch import caption_files
    from captioner.serving.captioner import Captioner
    from captioner.serving.records import OutputError

    try:
        captioner = Captioner.from_pretrained(
            args.model, device=device, quantize=args.quantize, revision=args.revision
        )
        if args.evidence:
            captioner.evidence_head()  # a model without ImageNet evidence fails now, not mid-run
    except Exception as err:  # missing/corrupt model, bad --device: all end the run the same way
        print(f"error: cannot load the model ({type(err).__name__}): {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    try:
        summary = caption_files(
            captioner, paths, output, options, settings, fmt=args.format, focus=focus, evidence=args.evidence
        )
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue where {output} stops", file=sys.stderr)
        return 130
    return _report(summary, output)


def _select(
    args: argparse.Namespace,
    output: str,
    settings: BatchSettings,
    shard: tuple[int, int] | None,
    options: DecodeOptions,
    focus: dict[str, list[float]] | None,
) -> list[str] | int:
    """The files this process captions, or the exit status when there are none (then without
    loading the model): 1 if no image file was found, 0 for an empty shard (its output is made,
    for --merge)."""
    from captioner.serving.inputs import find_inputs, select_shard
    from captioner.serving.records import OutputError

    found = find_inputs(args.inputs, exclude=[output, *filter(None, [settings.save_attention])])
    if focus is not None:
        _warn_unmatched(args.focus_json, focus, found)
    paths = select_shard(found, *shard) if shard is not None else list(found)
    if paths:
        return paths
    if not found:
        print("error: no image could be captioned (no image files found)", file=sys.stderr)
        return EXIT_NOTHING_CAPTIONED
    assert shard is not None
    from captioner.serving.batch import prepare_output

    try:
        prepare_output(output, options, fmt=args.format, focus=focus is not None, evidence=args.evidence)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    print(
        f"note: shard {shard[0]}/{shard[1]} holds none of the {len(found)} files found; nothing to "
        f"caption -> {output}",
        file=sys.stderr,
    )
    return 0


def _warn_unmatched(file: str, focus: dict[str, list[float]], found: dict[str, str]) -> None:
    """Name the --focus-json paths that are none of the inputs (a typo captions the whole image)."""
    from captioner.serving.records import path_key

    known = {path_key(p) for p in found}
    unmatched = [name for name in focus if path_key(name) not in known]
    if unmatched:
        listed = ", ".join(map(repr, unmatched[:10])) + (" ..." if len(unmatched) > 10 else "")
        print(
            f"warning: --focus-json {file}: {len(unmatched)} of {len(focus)} paths match no input "
            f"image: {listed}",
            file=sys.stderr,
        )


def _this_process(
    device: str | None, output: str, shard: tuple[int, int] | None
) -> tuple[str | None, str, tuple[int, int] | None]:
    """(device, output, shard) of this process: under torchrun, one process per GPU (or CPU
    share), each with its rank's shard and its own output file."""
    from captioner.serving.batch import rank_output, torchrun_rank

    ranks = torchrun_rank()
    if ranks is None:
        return device, output, shard
    rank, world, local_rank = ranks
    import torch

    if device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    return device, str(rank_output(output, rank)), (rank, world)


def _report(summary: Summary, output: str) -> int:
    """Print the run's summary (on stderr when the records stream to stdout or a pipe) and its
    first errors; the exit status."""
    from captioner.serving.records import is_stream

    for error in summary.first_errors:
        print(f"failed: {error}", file=sys.stderr)
    if summary.failed > len(summary.first_errors):
        print(
            f"... and {summary.failed - len(summary.first_errors)} more; see the rows with an "
            f"error in {output}",
            file=sys.stderr,
        )
    print(f"{summary} -> {output}", file=sys.stderr if is_stream(output) else sys.stdout)
    if not summary.any_captioned:
        print("error: no image could be captioned", file=sys.stderr)
        return EXIT_NOTHING_CAPTIONED
    return 0


def _read_focus(parser: argparse.ArgumentParser, path: str) -> dict[str, list[float]]:
    from captioner.model.focus import as_box

    try:
        focus = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        parser.error(f"--focus-json {path}: {err}")
    if not isinstance(focus, dict):
        parser.error(f'--focus-json {path}: expected an object {{"path": [x0, y0, x1, y1], ...}}')
    for name, box in focus.items():
        try:
            as_box(box)
        except ValueError as err:
            parser.error(f"--focus-json {path}: {name!r}: {err}")
    return focus


def _caption_with_ray(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    options: DecodeOptions,
    settings: BatchSettings,
    shard: tuple[int, int] | None,
) -> int:
    """--engine ray: Ray Data actors caption into OUTPUT/part-N.jsonl (captioner.serving.ray_engine)."""
    if args.focus_json or settings.save_attention or args.format == "csv" or args.num_gpus < 0:
        parser.error("--engine ray: JSONL only, no --focus-json or --save-attention, --num-gpus >= 0")
    from captioner.serving.hub import ModelNotFoundError
    from captioner.serving.ray_engine import RayEngineError, RayOptions, caption_with_ray
    from captioner.serving.records import OutputError

    ray_options = RayOptions(args.ray_address, args.concurrency, args.num_gpus)
    try:
        summary = caption_with_ray(
            args.inputs,
            args.output,
            ray_options,
            options,
            settings,
            model=args.model,
            revision=args.revision,
            device=args.device,
            quantize=args.quantize,
            shard=shard,
        )
    except (RayEngineError, OutputError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue into {args.output}", file=sys.stderr)
        return 130
    return _report(summary, args.output)


def _merge(sources: Sequence[str], target: str, fmt: str | None) -> int:
    from captioner.serving.ray_engine import part_files
    from captioner.serving.records import OutputError, merge_outputs

    folders = [s for s in sources if Path(s).is_dir()]
    sources = [str(p) for s in sources for p in (part_files(Path(s)) if s in folders else [s])]
    if not sources:
        print(f"error: --merge: no part files (part-*.jsonl) in {folders[0]}", file=sys.stderr)
        return EXIT_SETUP_FAILED
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
