"""The `captioner` command: subcommands, help from the configs' field docs, choices, --x/--no-x,
kebab-case flags with the old spellings still accepted, and a --help that imports no torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from captioner.cli.flags import config_fields, config_from_args
from captioner.cli.main import COMMANDS, build_parser, caption_folder_parser, main
from captioner.data import images
from captioner.data.config import DataConfig
from captioner.data.datasets import DATASET_PATHS
from captioner.model.attention import ATTENTION_TYPES
from captioner.model.config import ModelConfig
from captioner.model.encoder import BACKBONES
from captioner.model.options import DecodeOptions
from captioner.serving import records
from captioner.serving.settings import BatchSettings
from captioner.training.config import TrainConfig
from captioner.training.inputs import BATCH_BY

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "gradio", "matplotlib")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_one_command_has_every_subcommand():
    names = ["caption", "train", "evaluate", "app", "export", "benchmark"]
    assert list(subcommands()) == names == list(COMMANDS)


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS)])
def test_help_imports_neither_torch_nor_gradio(argv):
    """`captioner [SUB] --help` parses its flags before importing anything heavy."""
    code = (
        "import sys\nfrom captioner.cli.main import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit as done:\n    assert done.code == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, *argv, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "usage: captioner" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


@pytest.mark.slow
def test_import_captioner_loads_neither_gradio_nor_matplotlib():
    code = (
        "import sys, captioner\nassert captioner.Captioner.__name__ == 'Captioner'\n"
        "print(sorted(m for m in ('gradio', 'matplotlib') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert run.stdout.strip() == "[]"


def test_every_flag_has_help_and_a_kebab_case_name():
    for name, parser in subcommands().items():
        for action in parser._actions:
            for option in action.option_strings:
                assert "_" not in option, f"captioner {name} {option}"
            if action.option_strings and action.dest != "help":
                text = action.help or ""
                assert text and not text.startswith("(default"), f"captioner {name} {action.option_strings}"


@pytest.mark.parametrize("cls", [TrainConfig, ModelConfig, DataConfig, DecodeOptions, BatchSettings])
def test_config_flags_match_the_dataclasses_and_carry_their_docs(cls):
    """Names, defaults and optionality from the classes, and a docstring for every field."""
    flags = {f.dest: f for f in config_fields(cls)}
    hints = typing.get_type_hints(cls)
    leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
    assert [f.dest for f in config_fields(cls) if "." not in f.dest] == [f.name for f in leaves]
    for f in leaves:
        assert flags[f.name].default == f.default, f.name
        assert len(flags[f.name].help) > 10, f"{cls.__name__}.{f.name} has no docstring"
        assert flags[f.name].optional == (type(None) in typing.get_args(hints[f.name])), f.name
    train = {f.dest for f in config_fields(TrainConfig)}
    assert {f"model.{f.name}" for f in dataclasses.fields(ModelConfig)} <= train
    assert {f"data.{f.name}" for f in dataclasses.fields(DataConfig)} <= train


def test_enumerated_fields_offer_exactly_what_the_library_accepts():
    flags = {f.dest: f for f in config_fields(TrainConfig)}
    assert flags["batch_by"].choices == BATCH_BY
    assert set(flags["data.kind"].choices) == set(DATASET_PATHS)
    assert set(flags["model.attention"].choices) == set(ATTENTION_TYPES)
    assert set(flags["model.backbone"].choices) == set(BACKBONES)
    with pytest.raises(SystemExit):
        parse("train", "--batch-by", "sentence")


def test_help_text_comes_from_the_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--epochs INT Cross-entropy epochs (at most: early stopping may end sooner). (default: 20)" in out
    assert "--resume, --no-resume Continue the run in output_dir" in out
    assert "--model.gate, --model.no-gate" in out and "(default: on)" in out
    assert "--batch-by {image,caption}" in out and "(default: none)" in out


@pytest.mark.parametrize("command", ["caption", "evaluate", "app", "benchmark"])
def test_the_decoding_flags_are_declared_once_from_decode_options(command):
    parser = subcommands()[command]
    given = parser.parse_args(
        [
            *(["x.jpg"] if command == "caption" else []),
            "--beam-size",
            "5",
            "--length-penalty",
            "1.0",
            "--no-repeat-ngram-size",
            "2",
            "--n-best",
            "2",
            "--max-length",
            "9",
        ]
    )
    assert config_from_args(DecodeOptions, given) == DecodeOptions(5, 9, 1.0, 2, 2)
    flags = {f.dest: f for f in config_fields(DecodeOptions)}
    actions = {a.dest: a for a in parser._actions}
    assert all(actions[name].help.startswith(flags[name].help) for name in flags)


def test_the_caption_command_keeps_one_caption_per_row_unless_asked():
    assert config_from_args(DecodeOptions, parse("caption", "x.jpg")) == DecodeOptions(n_best=1)
    assert config_from_args(DecodeOptions, parse("evaluate")) == DecodeOptions()


def test_help_shows_the_librarys_own_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {images.DEFAULT_MAX_PIXELS})" in out
    assert f"--format {{{','.join(records.FORMATS)}}}" in out
    assert f"(default: {DecodeOptions().no_repeat_ngram_size})" in out
    assert "--model MODEL, --checkpoint MODEL model folder or Hugging Face Hub repo id" in out


@pytest.mark.parametrize("command", ["caption", "evaluate", "app", "benchmark"])
def test_checkpoint_is_the_old_name_of_model(command):
    inputs = ["x.jpg"] if command == "caption" else []
    assert parse(command, *inputs, "--checkpoint", "runs/a/best").model == "runs/a/best"
    assert parse(command, *inputs, "--model", "runs/a/best").model == "runs/a/best"


def test_booleans_are_switches_and_the_old_true_false_still_works():
    def train(*argv: str) -> TrainConfig:
        return config_from_args(TrainConfig, parse("train", *argv))

    assert train().resume is False and train("--resume").resume is True
    assert train("--resume", "true").resume is True and train("--resume=yes").resume is True
    assert train("--resume", "--no-resume").resume is False
    assert train("--amp", "false", "--epochs", "2").amp is False
    assert train("--model.no-gate").model.gate is False and train("--model.gate", "0").model.gate is False
    assert train("--data.skip-missing").data.skip_missing is True
    with pytest.raises(SystemExit):
        parse("train", "--progress", "maybe")

    args = parse("evaluate", "--meteor", "false", "--spice")
    assert (args.meteor, args.spice) == (False, True)
    # With positional inputs a word after a switch is an input, unless it is true/false.
    args = parse("caption", "--quantize", "photos", "--no-progress")
    assert (args.quantize, args.inputs, args.progress) == (True, ["photos"], False)
    assert parse("caption", "--quantize", "false", "photos").quantize is False


def test_flags_are_kebab_case_and_the_underscore_spelling_is_accepted():
    kebab = parse("caption", "x.jpg", "--beam-size", "5", "--no-repeat-ngram-size", "2", "--n-best", "2")
    snake = parse("caption", "x.jpg", "--beam_size", "5", "--no_repeat_ngram_size=2", "--n_best", "2")
    settings = [{k: v for k, v in vars(args).items() if k != "command_parser"} for args in (kebab, snake)]
    assert settings[0] == settings[1] and (kebab.beam_size, kebab.no_repeat_ngram_size) == (5, 2)
    args = parse(
        "train", "--output_dir", "runs/my_run", "--model.grid_size", "7", "--data.max-val-images", "3"
    )
    assert (args.output_dir, getattr(args, "model.grid_size"), getattr(args, "data.max_val_images")) == (
        "runs/my_run",
        7,
        3,
    )  # values keep their underscores
    assert caption_folder_parser().parse_args(["--beam_size", "4", "a.png"]).beam_size == 4


def test_train_flags_override_a_saved_config(tmp_path):
    from captioner.cli.main import load_config_file

    saved = TrainConfig(epochs=7, model=ModelConfig(hidden_dim=64), output_dir="runs/a")
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(dataclasses.asdict(saved)))
    args = parse("train", "--config", str(path), "--epochs", "3", "--model.dropout", "0.1", "--resume")
    cfg = config_from_args(TrainConfig, args, load_config_file(args.config))
    assert (cfg.epochs, cfg.model.hidden_dim, cfg.model.dropout, cfg.output_dir, cfg.resume) == (
        3,
        64,
        0.1,
        "runs/a",
        True,
    )


def test_unknown_flags_are_refused_with_the_subcommand_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--beam-sise", "3"])
    assert exit_.value.code == 2
    assert "captioner evaluate: error: unrecognized arguments: --beam-sise" in capsys.readouterr().err


@pytest.mark.slow
def test_scripts_and_app_py_are_aliases_of_the_subcommands():
    for script, command in [
        ("scripts/train.py", "train"),
        ("scripts/evaluate.py", "evaluate"),
        ("scripts/export_model.py", "export"),
        ("scripts/caption_folder.py", "caption"),
        ("scripts/benchmark.py", "benchmark"),
        ("app.py", "app"),
    ]:
        alias = subprocess.run(
            [sys.executable, script, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            check=True,
        )
        direct = subprocess.run(
            [sys.executable, "-m", "captioner", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        assert alias.stdout == direct.stdout and f"usage: captioner {command}" in alias.stdout, script


@pytest.mark.slow
def test_app_stops_with_a_clear_error_when_the_model_fails_behind_the_page(shapes_checkpoint, tmp_path):
    """The page is served while the model loads; if loading then fails, the app stops, exit 1."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((shapes_checkpoint / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    from .app_server import OFFLINE_ENV, free_port

    run = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(broken), "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 1, run.stderr
    assert "cannot start without a model" in run.stderr and "corrupt or not a safetensors file" in run.stderr
    assert "Traceback" not in run.stderr


BENCHMARK_FLAGS = [
    "--checkpoint",
    "--quantize",
    "--encoder-batches",
    "--vocab-size",
    "--batch-sizes",
    "--beam-size",
    "--max-length",
    "--image-size",
    "--runs",
    "--warmup",
    "--threads",
    "--extract-images",
    "--extract-runs",
    "--flickr-root",
    "--dev-cider",
    "--encoders",
    "--clock",
]


def test_benchmark_help_lists_the_benchmarks_own_flags():
    """The benchmark lives in the library (captioner.benchmark); its flags are the subcommand's."""
    run = subprocess.run(
        [sys.executable, "-m", "captioner", "benchmark", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "usage: captioner benchmark" in run.stdout
    assert [flag for flag in BENCHMARK_FLAGS if flag not in run.stdout] == []
    assert "torch,onnx" in run.stdout  # --encoders' choices


def test_benchmark_refuses_dev_cider_without_flickr8k(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["benchmark", "--dev-cider", "5", "--flickr-root", str(tmp_path / "missing")])
    assert done.value.code == 2
    assert f"--flickr-root {tmp_path / 'missing'} is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_benchmark_runs_every_timing(tmp_path, capsys):
    """One run of each table (random decoder, Lite0 at 224 px, generated photos): the numbers
    are meaningless, but every code path behind them runs."""
    main(
        [
            "benchmark",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--batch-sizes",
            "1",
            "2",
            "--encoder-batches",
            "1",
            "2",
            "--max-length",
            "4",
            "--extract-images",
            "2",
            "--extract-runs",
            "1",
            "--flickr-root",
            str(tmp_path / "missing"),
        ]
    )
    out = capsys.readouterr().out
    for row in (
        "timm stock forward_features",
        "torch eager (Encoder)",
        "onnxruntime fp32",
        "torch (encoder, decoder)",
        "decoder step, 5 beams",
        "feature extraction, 2 generated photos",
        "onnxruntime encoder start-up",
        "this CPU's large matrix product on onnxruntime: fp32",
        "onnxruntime decoder step start-up",
        "peak memory",
    ):
        assert row in out, row
    caption_rows = [
        line.split()
        for line in out.splitlines()
        if line.split()[:3] == ["onnxruntime", "fp32", "(quantize=False)"] and line.split()[3].isdigit()
    ]
    assert [row[3] for row in caption_rows] == ["1", "2"]  # caption() of 1 photo and of 2


# --- expected failures: one line on stderr naming the input and the fix, no traceback -------------


def run_captioner(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `captioner` command in a subprocess, offline."""
    return subprocess.run(
        [sys.executable, "-m", "captioner", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def assert_one_line_error(run: subprocess.CompletedProcess, command: str, *expected: str) -> None:
    assert run.returncode == 1, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"captioner {command}: error: "), run.stderr
    assert all(text in lines[0] for text in expected), lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate"], ["no dataset given: pass --data.root DIR (flickr: the folder with the token file"]),
        (
            ["evaluate", "--data.root", "/nope"],
            ["Flickr dataset folder not found: /nope (check --data.root)"],
        ),
        (["evaluate", "--data.kind", "coco"], ["pass --data.train FILE --data.train-images DIR"]),
        (["evaluate", "--data.train", "a.json"], ["--data.kind flickr takes --data.root, not --data.train"]),
        (["train", "--data.root", "/nope", "--epochs", "1"], ["/nope (check --data.root)"]),
        (
            ["train", "--config", "/nope/train_config.json"],
            ["--config /nope/train_config.json: no such file"],
        ),
        (["export", "/nope", "/tmp/captioner-export-test"], ["model path /nope does not exist"]),
        (["app", "--model", "/nope"], ["cannot start without a model: /nope does not exist: pass --model"]),
    ],
)
def test_an_expected_failure_is_one_line_naming_the_input_and_the_fix(argv, expected):
    assert_one_line_error(run_captioner(*argv), argv[0], *expected)


@pytest.mark.slow
def test_app_on_a_busy_port_says_to_pass_another_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = run_captioner("app", "--port", str(port))
    assert_one_line_error(run, "app", f"port {port} on 127.0.0.1 is already in use: pass another --port")
    assert "GRADIO_SERVER_PORT" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--debug"], ["--no-debug"]])
def test_debug_shows_the_traceback(how):
    env = {"CAPTIONER_DEBUG": "1"} if how == ["--no-debug"] else {}  # the variable, or the flag
    run = run_captioner("evaluate", *how, env=env)
    assert run.returncode == 1 and "Traceback" in run.stderr and "pass --data.root DIR" in run.stderr


def test_the_help_documents_the_exit_status(capsys):
    for argv in ([], ["evaluate"], ["app"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "Exit status: 0 on success; 1 if the command failed" in out, argv
        assert argv == [] or "--debug, --no-debug on an error, also print the traceback" in out


def test_every_expected_error_name_is_a_real_error_class():
    """The one-line reporting matches errors by qualified name: a moved class must not fall out."""
    import importlib

    from captioner.cli.errors import EXPECTED

    for name in EXPECTED:
        module, cls = name.rsplit(".", 1)
        found = getattr(importlib.import_module(module), cls)
        assert issubclass(found, Exception) and found.__module__ == module, name
