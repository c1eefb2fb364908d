"""How a command fails: one line on stderr that names the input and the fix, and an exit status.

An expected failure (a missing dataset, model or file, a busy port, a corrupt input) is a
message for the user, not a traceback; `--debug` or CAPTIONER_DEBUG=1 shows the traceback too.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
EXIT_STATUS = (
    "Exit status: 0 on success; 1 if the command failed (one line on stderr says why and "
    "what to do; --debug or CAPTIONER_DEBUG=1 also prints the traceback); 2 for a mistake "
    "on the command line (`captioner caption`: also when the model or the output cannot "
    "be set up); 130 if interrupted."
)

# The project's errors about an input, by qualified class name (their modules import torch, which
# `captioner --help` must not): a subclass counts too.
EXPECTED = {
    "captioner.model.folder.CheckpointError",
    "captioner.serving.hub.ModelNotFoundError",
    "captioner.data.image_captions.DatasetError",
    "captioner.files.LockedError",
    "captioner.files.DiskFullError",
    "captioner.data.feature_cache.FeatureCacheError",
    "captioner.model.evidence.EvidenceError",
    "captioner.model.quantize.Int8EncoderError",
    "captioner.data.images.ImageLoadError",
    "captioner.model.encoder.EncoderWeightsError",
    "captioner.serving.records.OutputError",
    "captioner.serving.ray_engine.RayEngineError",
    "captioner.training.loop.TrainingDiverged",
    "captioner.training.run_folder.RunFolderError",
    "captioner.training.run_state.RunStateError",
}
FILE_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}


class CommandError(Exception):
    """An expected failure, worded for the user: "what is wrong with which input: what to do"."""

    def __init__(self, message: str, status: int = EXIT_FAILED):
        super().__init__(message)
        self.status = status


def debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("CAPTIONER_DEBUG", "") not in ("", "0")


def run_reporting(run: Callable[[], int], args: argparse.Namespace, prog: str, setup_status: int) -> int:
    """run(), with an expected failure printed as "PROG: error: MESSAGE" (exit 1, or
    `setup_status` for the project's own errors) and Ctrl-C as "PROG: interrupted" (exit 130)."""
    try:
        return run()
    except KeyboardInterrupt:
        if debugging(args):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = expected_message(err, args)
        if message is None or debugging(args):
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return err.status if isinstance(err, CommandError) else setup_status


def expected_message(err: BaseException, args: argparse.Namespace) -> str | None:
    """The one-line message for an expected failure; None for anything else (a bug)."""
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in type(err).__mro__}
    if isinstance(err, CommandError):
        message = str(err)
    elif names & EXPECTED:
        message = str(err) + data_flag_hint(str(err), args)
    elif isinstance(err, OSError) and err.errno in FILE_ERRNOS:
        message = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    else:
        return None
    return " ".join(message.split())  # one line


def data_flag_hint(message: str, args: argparse.Namespace) -> str:
    """ " (check --data.root)" if the message names the value of a --data.* path flag."""
    for dest, value in vars(args).items():
        if (
            dest.startswith("data.")
            and isinstance(value, str)
            and value
            and (value in message or str(Path(value).expanduser().resolve()) in message)
        ):
            return f" (check --{dest.replace('_', '-')})"
    return ""


def require_dataset(
    kind: str, given: dict[str, Any], docs: dict[str, str], paths: dict[str, tuple[set[str], set[str]]]
) -> None:
    """CommandError unless the --data.* paths given fit dataset `kind`: "no dataset given: pass
    --data.root DIR (flickr: the folder with ...)". `paths`: data.datasets.DATASET_PATHS."""
    takes, required = paths[kind]
    present = {name for name, value in given.items() if value is not None}
    missing, extra = sorted(required - present), sorted(present - takes)
    if extra:
        them = "it" if len(extra) == 1 else "them"
        raise CommandError(
            f"--data.kind {kind} takes {_flags(sorted(takes))}, not {_flags(extra)}: "
            f"drop {them} or pass the --data.kind {them} belong{'s' * (them == 'it')} to"
        )
    if missing:
        wanted = " ".join(f"{_flag(name)} {_metavar(name)}" for name in missing)
        what = "; ".join(docs[name].rstrip(".") for name in missing if docs.get(name))
        start = "no dataset given" if not present else f"--data.kind {kind} also needs {_flags(missing)}"
        raise CommandError(f"{start}: pass {wanted}" + (f" ({what})" if what else ""))


def _flag(name: str) -> str:
    return f"--data.{name.replace('_', '-')}"


def _flags(names: list[str]) -> str:
    return ", ".join(map(_flag, names))


def _metavar(name: str) -> str:
    return "DIR" if name.endswith(("root", "images")) else "FILE"
