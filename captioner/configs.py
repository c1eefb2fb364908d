"""Command-line flags from dataclass configs: every field is a flag, nested ones dotted.

`--epochs 5 --model.grid_size 14 --data.root DIR`, or `--config run/train_config.json` to start
from a saved config (the flags then override it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(annotation):
    """int | None -> a parser that also accepts 'none'."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    convert = parse_bool if base is bool else base

    def parse(text: str):
        return None if optional and text.lower() == "none" else convert(text)

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            add_config_arguments(parser, hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{prefix}{f.name}", type=_converter(hint), default=argparse.SUPPRESS,
                            help=f"(default: {default})")


def config_from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None):
    """Build `cls` from an optional saved dict plus the flags that were given."""
    raw: dict[str, Any] = json.loads(json.dumps(base or {}))
    for key, value in vars(args).items():
        if key == "config":
            continue
        target = raw
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    return cls.from_dict(raw)


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    return json.loads(path.read_text())
