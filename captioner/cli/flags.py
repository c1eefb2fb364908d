"""Command-line flags from dataclass configs: every field is a flag, nested ones dotted.

`--epochs 5 --model.grid-size 14 --data.root DIR --resume`, or `--config run/train_config.json`
to start from a saved config (the flags then override it). A field's help text is its attribute
docstring; a `Literal[...]` field takes one of its values; a bool field is `--x/--no-x`; an
`X | None` field also takes "none".

The flags come from `dataclasses.fields` and `typing.get_type_hints` of the config classes,
which live in torch-free modules (captioner.model.config, .model.options, .data.config,
.training.config, .serving.settings), so `captioner SUB --help` answers without loading torch.

Old spellings keep working: `--beam_size` for `--beam-size`, and `--resume true` / `--amp false`
for `--resume` / `--no-amp`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SCALARS = (int, float, str, bool)


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class ConfigField:
    """One leaf field of a config class, as a flag."""

    dest: str  # "model.grid_size": the key in the parsed namespace and the saved config
    kind: type  # int, float, str or bool
    optional: bool  # also takes "none"
    choices: tuple[str, ...] | None
    default: Any
    help: str
    group: str  # the config class it belongs to, e.g. "ModelConfig (--model.*)"
    metavar: str | None = None  # field(metadata={"metavar": "DIR"}); default: the kind, e.g. INT

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def config_fields(config: type, prefix: str = "") -> list[ConfigField]:
    """The flags of a config dataclass and of the config dataclasses nested in it."""
    hints = typing.get_type_hints(config)
    docs = field_docs(config)
    group = f"{config.__name__} (--{prefix}*)" if prefix else config.__name__
    flags: list[ConfigField] = []
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            flags += config_fields(hint, f"{prefix}{f.name}.")
            continue
        where = f"{config.__qualname__}.{f.name}"
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{where}: a config field needs a default to be a flag")
        kind, optional, choices = _annotation(hint, where)
        flags.append(
            ConfigField(
                f"{prefix}{f.name}",
                kind,
                optional,
                choices,
                f.default,
                f.metadata.get("help", docs.get(f.name, "")),
                group,
                f.metadata.get("metavar"),
            )
        )
    return flags


def field_docs(config: type) -> dict[str, str]:
    """{field: its attribute docstring (the string right below it)}, read from the class's own
    source (and its bases'); Python keeps no such docstrings at run time."""
    docs: dict[str, str] = {}
    for cls in reversed(config.__mro__[:-1]):  # a subclass's docstring wins
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):  # no source (a frozen app): flags without help text
            continue
        body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
        for statement, following in zip(body, body[1:], strict=False):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _annotation(hint: Any, where: str) -> tuple[type, bool, tuple[str, ...] | None]:
    """int | None -> (int, optional, no choices); Literal["a", "b"] -> (str, not optional, choices)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            kind, _, choices = _annotation(others[0], where)
            return kind, True, choices
    if hint in _SCALARS:
        return hint, False, None
    if typing.get_origin(hint) is Literal and all(isinstance(v, str) for v in args):
        return str, False, args
    raise TypeError(
        f"{where}: no command-line flag for the annotation {hint!r} "
        "(supported: int, float, str, bool, Literal of strings, and X | None)"
    )


def _converter(kind: type, optional: bool):
    """int with optional=True -> a parser of ints that also accepts 'none'."""

    def parse(text: str):
        return None if optional and text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def _shown(value: Any, kind: type) -> str:
    if value is None:
        return "none"
    if kind is bool:
        return "on" if value else "off"
    return str(value)


class Switch(argparse.Action):
    """A boolean flag pair: --resume / --no-resume (nested: --model.gate / --model.no-gate)."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        default: Any = None,
        help: str | None = None,
        **kwargs: Any,
    ):  # noqa: A002 (argparse's name)
        self.negatives = [_negative(option) for option in option_strings]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    """--quantize / --no-quantize, unset by default: the Captioner's own choice (int8 on a CPU
    when the model folder has an int8 encoder made from its weights)."""
    parser.add_argument(
        "--quantize",
        action=Switch,
        default=None,
        help="int8 encoder (the model folder's encoder_int8.onnx) and int8 decoder step on a CPU: "
        "~1.5x faster, other captions of the same dev scores (default: on when the folder has one "
        "made from its weights; --no-quantize: float32)",
    )


def _negative(option: str) -> str:
    head, dot, leaf = option[2:].rpartition(".")
    return f"--{head}{dot}no-{leaf}"


def add_config_arguments(
    parser: argparse.ArgumentParser, config: type, prefix: str = "", defaults: Mapping[str, Any] | None = None
) -> None:
    """One flag per field of the dataclass `config`, grouped by class. Only the flags given end
    up in the namespace, so a saved --config is overridden, not replaced; `defaults` ({dest:
    value}) are this command's own defaults instead of the fields' (always in the namespace)."""
    defaults = defaults or {}
    groups: dict[str, Any] = {}
    for f in config_fields(config, prefix):
        group = groups.get(f.group) or groups.setdefault(f.group, parser.add_argument_group(f.group))
        default = defaults.get(f.dest, f.default)
        help_text = f"{f.help} (default: {_shown(default, f.kind)})".lstrip().replace("%", "%%")
        given_only = defaults.get(f.dest, argparse.SUPPRESS)
        if f.kind is bool:
            group.add_argument(f.flag, dest=f.dest, action=Switch, default=given_only, help=help_text)
        else:
            metavar = None if f.choices else f.metavar or f.kind.__name__.upper()
            group.add_argument(
                f.flag,
                dest=f.dest,
                type=_converter(f.kind, f.optional),
                choices=f.choices,
                metavar=metavar,
                default=given_only,
                help=help_text,
            )


def config_from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None, prefix: str = ""):
    """Build `cls` from an optional saved dict plus the flags of its fields that were given."""
    raw: dict[str, Any] = json.loads(json.dumps(base or {}))
    dests = {f.dest for f in config_fields(cls, prefix)}
    for key, value in vars(args).items():
        if key not in dests:
            continue
        target = raw
        *parents, leaf = key.removeprefix(prefix).split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    return cls.from_dict(raw) if hasattr(cls, "from_dict") else cls(**raw)


def checked_config(parser: argparse.ArgumentParser, cls, args: argparse.Namespace, prefix: str = ""):
    """config_from_args, with the config's ValueError about a field ("beam_size must be ...")
    turned into the parser's usage error about its flag ("--beam-size must be ...")."""
    try:
        return config_from_args(cls, args, prefix=prefix)
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        if f"{prefix}{name}" in {f.dest for f in config_fields(cls, prefix)}:
            parser.error(f"--{prefix}{name.replace('_', '-')} {rest}")
        parser.error(str(err))


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    """A saved config (--config FILE) as a dict; CommandError if it cannot be read as one."""
    from captioner.cli.errors import CommandError

    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise CommandError(
            f"--config {path}: no such file (a run's train_config.json, e.g. runs/NAME/train_config.json)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CommandError(f"--config {path}: not a readable JSON file ({err})") from err
    if not isinstance(config, dict):
        raise CommandError(
            f"--config {path}: expected a JSON object of settings, got {type(config).__name__}"
        )
    return config


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that also takes the old spellings: `--beam_size` for `--beam-size`, and
    `--resume true` / `--resume false` for a Switch's `--resume` / `--no-resume`."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        return super().parse_known_args(self._modern(sys.argv[1:] if args is None else list(args)), namespace)

    def _modern(self, args: list[str]) -> list[str]:
        switches = {
            option: negative
            for action in self._actions
            if isinstance(action, Switch)
            for option, negative in zip(action.option_strings, action.negatives, strict=False)
        }
        takes_positionals = any(not action.option_strings for action in self._actions)
        out: list[str] = []
        i = 0
        while i < len(args):
            arg, i = args[i], i + 1
            if arg == "--":
                return out + args[i - 1 :]
            if not arg.startswith("--"):
                out.append(arg)
                continue
            name, eq, value = arg.partition("=")
            name = "--" + name[2:].replace("_", "-")
            if name not in switches:
                out.append(name + eq + value)
                continue
            if not eq:
                following = args[i] if i < len(args) else None
                if (
                    following is None
                    or following.startswith("-")
                    or (takes_positionals and following.lower() not in TRUE_WORDS + FALSE_WORDS)
                ):
                    out.append(name)
                    continue
                value, i = following, i + 1
            try:
                out.append(name if parse_bool(value) else switches[name])
            except argparse.ArgumentTypeError as err:
                self.error(f"argument {name}: {err}")
        return out
