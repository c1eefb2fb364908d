"""Command-line flags from dataclass configs: every field is a flag, nested ones dotted.

`--epochs 5 --model.grid-size 14 --data.root DIR --resume`, or `--config run/train_config.json`
to start from a saved config (the flags then override it). A field's help text is its attribute
docstring; a `Literal[...]` field takes one of its values; a bool field is `--x/--no-x`.

The flags are read from the config classes' source with `ast`, without importing their modules:
TrainConfig lives beside torch, and `captioner train --help` must not wait for torch. Once the
arguments are parsed, `config_from_args` builds the real dataclass.

Old spellings keep working: `--beam_size` for `--beam-size`, and `--resume true` / `--amp false`
for `--resume` / `--no-amp`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


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

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


ConfigRef = type | str  # a dataclass, or "module:ClassName" (not imported)


def config_fields(config: ConfigRef, prefix: str = "") -> list[ConfigField]:
    """The flags of a config class and its nested config classes, from its source."""
    module, name = (config.split(":") if isinstance(config, str)
                    else (config.__module__, config.__qualname__))
    tree, source_file = _parse_module(module)
    cls = next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name), None)
    if cls is None:
        raise LookupError(f"no class {name} in {source_file}")
    group = f"{name} (--{prefix}*)" if prefix else name
    flags: list[ConfigField] = []
    for statement, following in zip(cls.body, [*cls.body[1:], None], strict=True):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        field_name = statement.target.id
        where = f"{source_file}: {name}.{field_name}"
        nested = _nested_config(statement, tree, module)
        if nested:
            flags += config_fields(nested, f"{prefix}{field_name}.")
            continue
        kind, optional, choices = _annotation(statement.annotation, where)
        doc = ""
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            doc = following.value.value if isinstance(following.value.value, str) else ""
        if statement.value is None:
            raise TypeError(f"{where}: config fields need a default")
        flags.append(ConfigField(f"{prefix}{field_name}", kind, optional, choices,
                                 ast.literal_eval(statement.value), " ".join(inspect.cleandoc(doc).split()),
                                 group))
    return flags


def _parse_module(module: str) -> tuple[ast.Module, str]:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise LookupError(f"cannot find the source of module {module}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8")), spec.origin


def source_constant(module: str, name: str) -> Any:
    """A module-level literal (`FORMATS = ("jsonl", "csv")`) read from source, without importing
    the module: what --help shows as a default when the module itself imports torch."""
    tree, source_file = _parse_module(module)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(value)
    raise LookupError(f"no literal {name} = ... at the top level of {source_file}")


def _nested_config(statement: ast.AnnAssign, tree: ast.Module, module: str) -> str | None:
    """`data: DataConfig = field(default_factory=DataConfig)` -> "captioner.data.config:DataConfig"."""
    value = statement.value
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field"):
        return None
    factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
    if not isinstance(factory, ast.Name):
        return None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == factory.id for a in node.names):
            package = module.rsplit(".", node.level)[0] if node.level else ""
            source = ".".join(filter(None, [package, node.module]))
            return f"{source}:{factory.id}"
        if isinstance(node, ast.ClassDef) and node.name == factory.id:
            return f"{module}:{factory.id}"
    raise LookupError(f"{module}: cannot find where {factory.id} is defined")


def _annotation(node: ast.expr, where: str) -> tuple[type, bool, tuple[str, ...] | None]:
    """int | None -> (int, optional, no choices); Literal["a", "b"] -> (str, not optional, choices)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        if any(isinstance(s, ast.Constant) and s.value is None for s in sides):
            other = next(s for s in sides if not (isinstance(s, ast.Constant) and s.value is None))
            kind, _, choices = _annotation(other, where)
            return kind, True, choices
    if isinstance(node, ast.Name) and node.id in _SCALARS:
        return _SCALARS[node.id], False, None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
        values = ast.literal_eval(node.slice)
        values = values if isinstance(values, tuple) else (values,)
        if all(isinstance(v, str) for v in values):
            return str, False, values
    raise TypeError(f"{where}: no command-line flag for the annotation {ast.unparse(node)!r} "
                    "(supported: int, float, str, bool, Literal of strings, and X | None)")


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

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None,
                 help: str | None = None, **kwargs: Any):  # noqa: A002 (argparse's name)
        self.negatives = [_negative(option) for option in option_strings]
        super().__init__([*option_strings, *self.negatives], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string not in self.negatives)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _negative(option: str) -> str:
    head, dot, leaf = option[2:].rpartition(".")
    return f"--{head}{dot}no-{leaf}"


def add_config_arguments(parser: argparse.ArgumentParser, config: ConfigRef, prefix: str = "") -> None:
    """One flag per field of `config` (a dataclass or "module:ClassName"), grouped by class. Only
    the flags given end up in the namespace, so a saved --config is overridden, not replaced."""
    groups: dict[str, Any] = {}
    for f in config_fields(config, prefix):
        group = groups.get(f.group) or groups.setdefault(f.group, parser.add_argument_group(f.group))
        help_text = f"{f.help} (default: {_shown(f.default, f.kind)})".lstrip().replace("%", "%%")
        if f.kind is bool:
            group.add_argument(f.flag, dest=f.dest, action=Switch, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            metavar = None if f.choices else f.kind.__name__.upper()
            group.add_argument(f.flag, dest=f.dest, type=_converter(f.kind, f.optional), choices=f.choices,
                               metavar=metavar, default=argparse.SUPPRESS, help=help_text)


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


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    return json.loads(path.read_text())


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that also takes the old spellings: `--beam_size` for `--beam-size`, and
    `--resume true` / `--resume false` for a Switch's `--resume` / `--no-resume`."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        return super().parse_known_args(self._modern(sys.argv[1:] if args is None else list(args)),
                                        namespace)

    def _modern(self, args: list[str]) -> list[str]:
        switches = {option: negative for action in self._actions if isinstance(action, Switch)
                    for option, negative in zip(action.option_strings, action.negatives, strict=False)}
        takes_positionals = any(not action.option_strings for action in self._actions)
        out: list[str] = []
        i = 0
        while i < len(args):
            arg, i = args[i], i + 1
            if arg == "--":
                return out + args[i - 1:]
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
                if following is None or following.startswith("-") or (
                        takes_positionals and following.lower() not in TRUE_WORDS + FALSE_WORDS):
                    out.append(name)
                    continue
                value, i = following, i + 1
            try:
                out.append(name if parse_bool(value) else switches[name])
            except argparse.ArgumentTypeError as err:
                self.error(f"argument {name}: {err}")
        return out
