"""The README's examples work, so they cannot rot: every ```python block of README.md runs for
real, in order, on the shipped model and a real photo (scikit-image's astronaut, written as
photo.jpg, the name the examples use); every `captioner` command in a ```bash block of the README
or docs/ is parsed by the real command line, so a flag that no longer exists fails here."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from captioner.cli.caption import caption_folder_parser
from captioner.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`(captioner(?:-caption)? [^`]*--[^`]*)`")


def code_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of `language` in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def captioner_commands(path: Path) -> list[str]:
    """Every `captioner ...` / `captioner-caption ...` command of the file's bash blocks (each
    command of an `a && b` line too), and the inline ones that give a flag."""
    found = []
    for _, code in code_blocks(path, "bash"):
        for line in shell_commands(code):
            found += [
                part.strip()
                for part in re.split(r"&&|\|\||;", line)
                if part.split() and part.split()[0] in ("captioner", "captioner-caption")
            ]
    found += INLINE_COMMAND.findall(path.read_text(encoding="utf-8"))
    return found


def parse(command: str) -> None:
    """Parse a command line as `captioner` would; fail naming it if the parser refuses it."""
    argv = shlex.split(command, comments=True)
    parser = build_parser() if argv[0] == "captioner" else caption_folder_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv[1:])
    except SystemExit as stop:
        if stop.code not in (0, None):  # --help exits 0
            pytest.fail(f"{command!r} is refused by the command line:\n{errors.getvalue()}")


def test_the_readme_shows_captioner_commands_and_python_examples():
    assert len(captioner_commands(README)) >= 8
    assert len(code_blocks(README, "python")) >= 2


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_captioner_command_in_the_docs_parses(path):
    for command in captioner_commands(path):
        parse(command)


def test_a_flag_that_does_not_exist_is_caught():
    with pytest.raises(pytest.fail.Exception, match="--beam-width"):
        parse("captioner caption photos/ --beam-width 3")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_in_docs_is_valid_python(path):
    """The docs' examples need a server, the Hub or names of the reader's own (a box, a mask):
    they are compiled, not run. The README's are run below."""
    for line, code in code_blocks(path, "python"):
        compile(code, f"{path.name}, block at line {line}", "exec")


@pytest.mark.slow
def test_the_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "photo.jpg", quality=92)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for line, code in code_blocks(README, "python"):
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    result = namespace["result"]
    assert result.text and result.attention.shape == (len(result.words), 14, 14)  # type: ignore[attr-defined]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert capsys.readouterr().out.strip()
