"""Training end to end on a tiny COCO-format dataset written by the tests themselves.

Everything is real: the pycocotools reader, the pretrained encoder and its feature cache,
beam-search validation scored by pycocoevalcap, run states on disk, a SIGKILLed subprocess,
and a 2-process torchrun (gloo) run. Models are tiny and epochs are 4 steps long.
"""

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from captioner import Captioner, CaptionModel
from captioner.cli.errors import CommandError
from captioner.cli.flags import FlagParser, add_config_arguments, config_from_args, load_config_file
from captioner.data.config import DataConfig
from captioner.data.datasets import DatasetError
from captioner.data.feature_cache import FeatureCache
from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write
from captioner.model.config import ModelConfig
from captioner.model.decoding import beam_search
from captioner.model.encoder import Encoder
from captioner.model.options import DecodeOptions
from captioner.training import loop as training_module
from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist
from captioner.training.inputs import (
    Inputs,
    epoch_batches,
    mirrored_rows,
    prepare_data,
    step_batch,
    training_items,
)
from captioner.training.loop import train
from captioner.training.optimizer import ema_decay_at
from captioner.training.run_state import STATE_FILE, last_step_model
from captioner.training.stages import SelfCritical

from .conftest import SHARED_DATA
from .shapes import write_coco_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY_DECODER = dict(image_size=128, embed_dim=32, hidden_dim=64, attention_dim=32, annotation_dim=64)
TIMING = {"captions_per_second", "epoch_seconds"}  # the only metrics two equal runs may differ in


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    return write_coco_dataset(tmp_path_factory.mktemp("coco-shapes"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


def make_config(dataset, output_dir, cache_dir, dropout=0.3, **overrides) -> TrainConfig:
    """16 images, validated on themselves; 4 steps per epoch; 3 XE epochs then 1 SCST epoch.
    The weights' moving average is on (so resume and torchrun cover it), with a short memory."""
    captions, images = dataset
    data = DataConfig(
        kind="coco", train=str(captions), train_images=str(images), val=str(captions), val_images=str(images)
    )
    settings = dict(
        min_word_count=1,
        epochs=3,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        scst_epochs=1,
        scst_samples=3,
        checkpoint_every=2,
        num_workers=0,
        progress=False,
        device="cpu",
        ema_decay=0.5,
    )
    return TrainConfig(
        data=data,
        model=ModelConfig(**TINY_DECODER, dropout=dropout),
        output_dir=str(output_dir),
        cache_dir=str(cache_dir),
        **(settings | overrides),
    )


def as_flags(cfg: TrainConfig) -> list[str]:
    """The scripts/train.py command line of a config: every field, nested ones dotted."""

    def flatten(values: dict, prefix: str = ""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, bool):
                yield from (f"--{prefix}{key}", str(value).lower())
            else:
                yield from (f"--{prefix}{key}", str(value))

    return list(flatten(dataclasses.asdict(cfg)))


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def saved_config(run: Path) -> TrainConfig:
    """train_config.json, with the model's grid as chosen by the encoder (4x4 at 128 px)."""
    return TrainConfig.from_dict(json.loads((run / "train_config.json").read_text()))


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / STATE_FILE))


def state_progress(run: Path) -> dict:
    with safe_open(str(run / STATE_FILE), "pt") as f:
        return json.loads(f.metadata()["state"])["progress"]


def assert_same_metrics(actual: list[dict], expected: list[dict], rel: float = 1e-9) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for key in e.keys() - TIMING:
            if isinstance(e[key], float):
                assert a[key] == pytest.approx(e[key], rel=rel, abs=1e-9), (e["stage"], e["epoch"], key)
            else:
                assert a[key] == e[key], (e["stage"], e["epoch"], key)


def kill_at_first_run_state(flags: list[str], out: Path, log: Path) -> None:
    """Run scripts/train.py with `flags` and SIGKILL it as soon as its first run state exists."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "scripts/train.py", *flags],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not (out / STATE_FILE).exists():  # the first run state: after step 2 of epoch 1
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no run state within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference_run(dataset, cache_dir, tmp_path_factory):
    """One uninterrupted run (3 XE epochs, 1 SCST epoch): (config, output folder, summary)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    cfg = make_config(dataset, out, cache_dir)
    summary = train(cfg)
    return cfg, out, summary


# ----------------------------------------------------------------------------- a whole run


def test_training_run_writes_a_usable_model_and_its_metrics(reference_run, dataset, cache_dir):
    cfg, out, summary = reference_run
    rows = metrics_rows(out)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("xe", 1), ("xe", 2), ("xe", 3), ("scst", 1)]
    xe_losses = [r["train_loss"] for r in rows if r["stage"] == "xe"]
    assert xe_losses[-1] < 0.9 * xe_losses[0], xe_losses
    for row in rows:  # validation scores every epoch
        for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert 0 <= row[metric] <= 1000, (metric, row)
    assert max(r["CIDEr"] for r in rows) > 0
    assert rows[-1]["reward"] > 0 and all(r["reward"] is None for r in rows[:-1])
    assert rows[-1]["lr"] == cfg.scst_lr

    assert saved_config(out) == cfg
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and "train_loss" in csv_lines[0] and "CIDEr" in csv_lines[0]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert state_progress(out)["done"] is True

    # best/ is the model of the best validation CIDEr, loadable for captioning.
    best_row = max(rows, key=lambda r: r["CIDEr"])
    assert summary["best_epoch"] == f"{best_row['stage']}-{best_row['epoch']}"
    assert summary["best_score"] == pytest.approx(best_row["CIDEr"])
    captioner = Captioner.from_pretrained(out / "best", device="cpu")
    assert len(captioner.vocab) == summary["vocab_size"]
    image = next(Path(cfg.data.train_images).glob("*.jpg"))
    result = captioner.caption(image)
    assert result.words and set(result.words) <= set(captioner.vocab.to_json())

    # The logged CIDEr comes from real beam-search captions: recompute it from best/.
    model = captioner.model
    paths = [p for _, p in sorted(_image_paths(cfg).items())]
    cache = FeatureCache(cache_dir, model.encoder, [*paths, *paths])  # train + val lists
    hyps = beam_search(
        model.decoder,
        cache.batch(range(16, 32)),
        DecodeOptions(cfg.val_beam_size, cfg.val_max_length, length_penalty=0.0, no_repeat_ngram_size=0),
    )
    references = {str(i): caps for i, caps in _captions(cfg).items()}
    predictions = {
        str(i): " ".join(captioner.vocab.decode(h[0].tokens))
        for i, h in zip(sorted(references, key=int), hyps, strict=True)
    }
    scores = score_captions(predictions, references, meteor=False)
    assert scores["CIDEr"] == pytest.approx(best_row["CIDEr"], rel=1e-6)


def _captions(cfg: TrainConfig) -> dict[int, list[str]]:
    annotations = json.loads(Path(cfg.data.train).read_text())["annotations"]
    out: dict[int, list[str]] = {}
    for a in annotations:
        out.setdefault(a["image_id"], []).append(a["caption"])
    return out


def _image_paths(cfg: TrainConfig) -> dict[int, Path]:
    images = json.loads(Path(cfg.data.train).read_text())["images"]
    return {i["id"]: (Path(cfg.data.train_images) / i["file_name"]).resolve() for i in images}


def test_second_run_reuses_the_feature_cache(reference_run, dataset, cache_dir, tmp_path):
    _, _, summary = reference_run
    assert summary["feature_extraction"]["images"] == 32  # 16 train + 16 val rows
    files = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    # backbone-size-grid-digest of the weights
    assert {p.parent.name[:-9] for p in files} == {"efficientnet_lite0-128px-4x4"}
    before = {p: p.stat().st_mtime_ns for p in files}

    again = train(make_config(dataset, tmp_path / "again", cache_dir, epochs=1, scst_epochs=0))
    assert (again["feature_extraction"]["images"], again["feature_extraction"]["already_cached"]) == (0, 32)
    assert {p: p.stat().st_mtime_ns for p in files} == before


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(reference_run, dataset, cache_dir, tmp_path):
    """SIGKILL mid-XE-epoch, then a stop mid-SCST-epoch: the run still ends bit for bit where
    the uninterrupted one did (weights, optimizer state, best model, logged metrics)."""
    ref_cfg, ref_out, _ = reference_run
    out = tmp_path / "interrupted"
    cfg = make_config(dataset, out, cache_dir)
    kill_at_first_run_state(as_flags(cfg), out, tmp_path / "killed.log")
    progress = state_progress(out)  # the run state file is whole (atomic rename)
    assert (progress["stage"], progress["done"]) == ("xe", False)
    assert progress["step_in_epoch"] > 0, f"not killed mid-epoch: {progress}"
    assert saved_config(out) == cfg  # the command line gave the very same config

    # Resume in-process, and stop again at the third SCST step (12 XE steps, then SCST).
    resume = dataclasses.replace(cfg, resume=True)
    stopped = train(dataclasses.replace(resume, stop_after_step=15))
    assert stopped["stopped_at_step"] == 15
    progress = state_progress(out)
    assert (progress["stage"], progress["step_in_epoch"], progress["done"]) == ("scst", 3, False)

    summary = train(resume)
    assert summary["feature_extraction"]["images"] == 0

    expected, actual = state_tensors(ref_out), state_tensors(out)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if k != "rng.torch" and not torch.equal(expected[k], actual[k])]
    assert different == []
    assert torch.equal(expected["rng.torch"], actual["rng.torch"])  # the very same random stream
    best_expected, best_actual = (load_file(str(o / "best" / "model.safetensors")) for o in (ref_out, out))
    assert all(torch.equal(best_expected[k], best_actual[k]) for k in best_expected)
    assert_same_metrics(metrics_rows(out), metrics_rows(ref_out))
    assert state_progress(out) == state_progress(ref_out)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["cache", "photos"])
def test_fine_tuning_run_resumes_to_the_same_result(dataset, tmp_path, inputs):
    """With the encoder's head trained from its cached input activations, or from pixels through
    a DataLoader (no cache), and mirrored photos mixed in."""

    def config(name, **overrides):
        return make_config(
            dataset,
            tmp_path / name,
            tmp_path / "cache",
            epochs=1,
            scst_epochs=0,
            fine_tune_from=8,
            fine_tune_inputs=inputs,
            encoder_lr=1e-3,
            hflip=True,
            **overrides,
        )

    summary = train(config("reference"))
    if inputs == "photos":
        assert "feature_extraction" not in summary and not (tmp_path / "cache").exists()
    else:
        plain, mirrored = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert plain.startswith("efficientnet_lite0-128px-stage8-") and mirrored == f"{plain}-hflip"

    train(config("interrupted", stop_after_step=2))
    assert state_progress(tmp_path / "interrupted")["step_in_epoch"] == 2
    train(config("interrupted", resume=True))

    expected, actual = state_tensors(tmp_path / "reference"), state_tensors(tmp_path / "interrupted")
    assert [k for k in expected if not torch.equal(expected[k], actual[k])] == []
    pretrained = Encoder("efficientnet_lite0", 128).state_dict()
    head = "body.conv_head.weight"
    assert not torch.equal(expected[f"model.encoder.{head}"], pretrained[head])  # it was trained
    assert torch.equal(expected["model.encoder.body.conv_stem.weight"], pretrained["body.conv_stem.weight"])
    assert_same_metrics(metrics_rows(tmp_path / "interrupted"), metrics_rows(tmp_path / "reference"))


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    target = tmp_path / STATE_FILE
    target.write_text("the previous, complete file")

    def dies_halfway(tmp):
        Path(tmp).write_text("half a fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, dies_halfway)
    assert target.read_text() == "the previous, complete file"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_stale_temporary_files_of_a_killed_run_are_removed(dataset, cache_dir, tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    stale = [out / f".{STATE_FILE}.abc123.tmp", out / "best" / ".model.safetensors.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    keep = out / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    train(make_config(dataset, out, cache_dir, epochs=1, scst_epochs=0, stop_after_step=1))
    assert not any(p.exists() for p in stale) and keep.exists()


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(dataset, cache_dir, reference_run, tmp_path):
    """2 ranks x 2 images = 1 process x 4 images: the same weights, losses and scores.

    The cache is half-done in a way that leaves rank 1 nothing to extract, which must not
    desynchronise the ranks' collectives.
    """
    single = make_config(dataset, tmp_path / "single", cache_dir, dropout=0.0, epochs=2, scst_epochs=0)
    train(single)

    ddp_cache = tmp_path / "ddp-cache"
    shutil.copytree(cache_dir, ddp_cache)
    (done_file,) = ddp_cache.rglob("*.done")
    done = np.memmap(done_file, dtype=np.uint8, mode="r+")
    done[::2] = 0  # only rank 0's rows (row % 2 == 0) are missing
    done.flush()
    del done
    ddp = dataclasses.replace(single, output_dir=str(tmp_path / "ddp"), cache_dir=str(ddp_cache))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "scripts/train.py",
        *as_flags(ddp),
    ]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to the ranks (each in its own session)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"torchrun hung (ranks out of step?):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    epoch_lines = [line for line in stdout.splitlines() if line.startswith('{"stage"')]
    assert len(epoch_lines) == 2, stdout  # printed (and logged) by rank 0 only

    assert np.memmap(done_file, dtype=np.uint8, mode="r").all()  # rank 0 filled in its rows
    one, two = state_tensors(Path(single.output_dir)), state_tensors(Path(ddp.output_dir))
    # attention.score.bias shifts every score alike, which softmax ignores: its gradient is float
    # noise that Adam scales up to lr-sized steps, so it is the one weight that may wander.
    decoder = [k for k in one if k.startswith("model.decoder.") and k != "model.decoder.attention.score.bias"]
    assert len(decoder) > 20
    for key in decoder:
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-4), key
    assert_same_metrics(metrics_rows(Path(ddp.output_dir)), metrics_rows(Path(single.output_dir)), rel=1e-4)


# ----------------------------------------------------------------------------- real COCO files


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "coco-mini").is_dir(), reason="shared coco-mini data not present")
def test_one_epoch_on_real_coco_files(tmp_path):
    root = SHARED_DATA / "coco-mini"
    captions, images = root / "annotations" / "captions_train2017.json", root / "train2017"
    data = DataConfig(
        kind="coco",
        train=str(captions),
        train_images=str(images),
        val=str(captions),
        val_images=str(images),
        max_val_images=16,
    )
    cfg = TrainConfig(
        data=data,
        model=ModelConfig(**TINY_DECODER, dropout=0.0),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        min_word_count=2,
        epochs=1,
        batch_size=16,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=1000,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    summary = train(cfg)
    assert summary["feature_extraction"]["images"] == 80 + 16
    (row,) = metrics_rows(Path(cfg.output_dir))
    assert np.isfinite(row["train_loss"]) and row["CIDEr"] >= 0
    assert row["captions_per_second"] > 0 and summary["vocab_size"] > 100
    captioner = Captioner.from_pretrained(Path(cfg.output_dir) / "best", device="cpu")
    result = captioner.caption(sorted(images.glob("*.jpg"))[0])
    assert isinstance(result.text, str) and result.words


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_fail_clearly_before_anything_is_written(dataset, cache_dir, tmp_path):
    captions, _ = dataset
    out = tmp_path / "run"

    def run(**data_overrides):
        cfg = make_config(dataset, out, cache_dir)
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_overrides)))

    with pytest.raises(DatasetError, match="image folder .* not found: .*no-such-folder"):
        run(train_images=str(tmp_path / "no-such-folder"))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty.json: file is empty"):
        run(train=str(empty))
    no_captions = tmp_path / "no_captions.json"
    no_captions.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="no images with captions"):
        run(val=str(no_captions))
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'"):
        run(kind="imagenet")
    with pytest.raises(DatasetError, match="coco.*required"):
        run(train=None)
    assert not out.exists()


# ----------------------------------------------------------------------------- config flags


def parser() -> argparse.ArgumentParser:
    p = FlagParser()  # the `captioner train` parser: also takes the old `--fine_tune_from`, `--amp Yes`
    p.add_argument("--config")
    add_config_arguments(p, TrainConfig)
    return p


def parse(argv: list[str]) -> TrainConfig:
    args = parser().parse_args(argv)
    return config_from_args(TrainConfig, args, load_config_file(args.config))


def test_flags_parse_bools_nones_and_nested_fields():
    assert parse([]) == TrainConfig()
    cfg = parse(
        [
            "--progress",
            "false",
            "--amp",
            "Yes",
            "--fine_tune_from",
            "none",
            "--device",
            "None",
            "--model.hidden_dim",
            "64",
            "--model.grid_size",
            "7",
            "--data.kind",
            "coco",
            "--data.max_val_images",
            "8",
            "--lr",
            "1e-3",
            "--data.skip_missing",
            "true",
        ]
    )
    assert (cfg.progress, cfg.amp, cfg.fine_tune_from, cfg.device, cfg.lr) == (False, True, None, None, 1e-3)
    assert (cfg.model.hidden_dim, cfg.model.grid_size, cfg.model.embed_dim) == (64, 7, 512)
    assert (cfg.data.kind, cfg.data.max_val_images, cfg.data.skip_missing) == ("coco", 8, True)
    assert parse(["--fine_tune_from", "3"]).fine_tune_from == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--progress", "maybe"], "expected true/false"),
        (["--epochs", "none"], "invalid int value"),
        (["--model.hidden_dim", "1.5"], "invalid int value"),
        (["--model.no_such_field", "1"], "unrecognized arguments"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_saved_config_plus_flags_reproduces_a_config(tmp_path):
    cfg = make_config(("c.json", "imgs"), "runs/x", "cache", epochs=7)
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert parse(["--config", str(saved)]) == cfg
    assert parse(as_flags(cfg)) == cfg
    changed = parse(["--config", str(saved), "--epochs", "9", "--model.dropout", "0.1", "--resume", "true"])
    assert changed == dataclasses.replace(
        cfg, epochs=9, resume=True, model=dataclasses.replace(cfg.model, dropout=0.1)
    )
    with pytest.raises(CommandError, match="missing.json: no such file"):
        parse(["--config", str(tmp_path / "missing.json")])


def stage_batch(dataset, cache_dir, cfg, rows=(0, 1, 2, 3)):
    """A real batch of the first images' cached grids with all their captions, and the data."""
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    model = CaptionModel(cfg.model, len(data.vocab))
    inputs = Inputs(model, data, torch.device("cpu"), str(cache_dir), False, 0, Dist(), progress=False)
    ((rows, grids),) = inputs.batches([list(rows)])
    batch = step_batch(rows, grids, [data.encoded[r] for r in rows], None, torch.device("cpu"))
    return model, data, batch


@pytest.mark.parametrize("scst_dropout", [True, False])
def test_scst_samples_with_dropout_only_when_asked(dataset, cache_dir, tmp_path, scst_dropout):
    """--scst_dropout false samples the policy used at test time (the model in eval mode)."""
    cfg = make_config(dataset, tmp_path / "run", cache_dir, dropout=0.5, scst_dropout=scst_dropout)
    model, data, batch = stage_batch(dataset, cache_dir, cfg)
    stage = SelfCritical(cfg, model, data, Dist(), torch.device("cpu"))
    assert stage.dropout is scst_dropout
    losses = []
    for training_mode in (stage.dropout, False):  # as an epoch of this stage runs, then eval mode
        model.train(training_mode)
        torch.manual_seed(1)
        losses.append(stage.loss(batch)[0].item())
    assert (losses[0] == losses[1]) is (not scst_dropout)


@pytest.mark.slow
@pytest.mark.parametrize(("scst_patience", "scst_epochs_run"), [(None, 1), (3, 5)])
def test_scst_patience_lets_self_critical_training_recover_from_its_first_dip(
    dataset, cache_dir, tmp_path, monkeypatch, scst_patience, scst_epochs_run
):
    """SCST usually starts below the cross-entropy best: its own patience keeps it going."""
    scripted_cider = iter([50.0, 40.0, 41.0, 60.0, 45.0, 46.0])  # XE 1, then SCST 1..5
    monkeypatch.setattr(training_module, "validate", lambda *args, **kwargs: {"CIDEr": next(scripted_cider)})
    cfg = make_config(
        dataset, tmp_path / "run", cache_dir, epochs=1, scst_epochs=5, patience=1, scst_patience=scst_patience
    )
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["xe"] + ["scst"] * scst_epochs_run
    assert summary["best_epoch"] == ("xe-1" if scst_patience is None else "scst-3")


@pytest.mark.parametrize("xe_weight", [0.0, 0.5])
def test_mixed_scst_adds_weighted_cross_entropy(dataset, cache_dir, tmp_path, xe_weight):
    """--scst_xe_weight w: each SCST step minimises the policy-gradient loss + w x cross-entropy."""
    cfg = make_config(dataset, tmp_path / "run", cache_dir, scst_xe_weight=xe_weight, alpha_reg=0.5)
    model, data, batch = stage_batch(dataset, cache_dir, cfg)
    loss, stats = SelfCritical(cfg, model, data, Dist(), torch.device("cpu")).loss(batch)
    cross_entropy = stats.get("xent", 0.0) + cfg.alpha_reg * stats.get("attention_reg", 0.0)
    assert ("xent" in stats) is bool(xe_weight)
    assert loss.item() == pytest.approx(stats["scst_loss"] + xe_weight * cross_entropy, rel=1e-5)
    loss.backward()
    assert model.decoder.classifier.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_moving_average_is_what_gets_validated_and_saved(dataset, cache_dir, tmp_path):
    """--ema_decay d: best/ holds e_1 = w_1, e_k = d_k e_(k-1) + (1 - d_k) w_k over the steps'
    weights w_k, with d_k = min(d, k / (k + 9)); not the last step's weights. Without it, best/
    holds the raw weights."""
    cfg = make_config(dataset, tmp_path / "ema", cache_dir, epochs=1, scst_epochs=0, ema_decay=0.25)
    snapshots = []  # the raw weights after each of the epoch's 4 steps, from the saved run state
    for step in (1, 2, 3, None):
        train(dataclasses.replace(cfg, resume=step != 1, stop_after_step=step))
        snapshots.append(
            {
                k.removeprefix("model."): v
                for k, v in state_tensors(tmp_path / "ema").items()
                if k.startswith("model.")
            }
        )
    expected = dict(snapshots[0])
    for k, weights in enumerate(snapshots[1:], start=2):
        decay = min(0.25, k / (k + 9))  # 2/11 = 0.18, then capped at 0.25
        assert decay == ema_decay_at(0.25, k - 1)
        expected = {name: decay * expected[name] + (1 - decay) * w for name, w in weights.items()}
    best = load_file(str(tmp_path / "ema" / "best" / "model.safetensors"))
    decoder = [k for k in best if k.startswith("decoder.")]
    assert len(decoder) > 20
    for key in decoder:
        assert torch.allclose(best[key], expected[key], atol=1e-6), key
    raw = state_tensors(tmp_path / "ema")
    assert not torch.allclose(best["decoder.classifier.weight"], raw["model.decoder.classifier.weight"])
    ema = {k.removeprefix("ema.module."): v for k, v in raw.items() if k.startswith("ema.module.")}
    assert all(torch.equal(ema[k], best[k]) for k in decoder)  # the run state keeps the average

    # scripts/export_model.py --last-step: the raw weights of the last step, as a model folder.
    exported = tmp_path / "last-step"
    subprocess.run(
        [
            sys.executable,
            "scripts/export_model.py",
            str(tmp_path / "ema"),
            str(exported),
            "--last-step",
            "--dtype",
            "float32",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        check=True,
    )
    last = load_file(str(exported / "model.safetensors"))
    assert last.keys() == best.keys()
    assert all(torch.equal(last[k], raw[f"model.{k}"]) for k in last)
    averaged, _, _ = last_step_model(tmp_path / "ema", averaged=True)
    assert all(torch.equal(averaged.state_dict()[k], best[k]) for k in decoder)
    image = next(Path(dataset[1]).glob("*.jpg"))
    assert Captioner.from_pretrained(exported, device="cpu").caption(image).words

    train(make_config(dataset, tmp_path / "plain", cache_dir, epochs=1, scst_epochs=0, ema_decay=0.0))
    best = load_file(str(tmp_path / "plain" / "best" / "model.safetensors"))
    raw = state_tensors(tmp_path / "plain")
    assert not any(k.startswith("ema.") for k in raw)
    assert all(torch.equal(best[k], raw[f"model.{k}"]) for k in best if k.startswith("decoder."))


@pytest.mark.slow
def test_hflip_trains_on_plain_or_mirrored_grids_chosen_per_image_and_epoch(dataset, cache_dir, tmp_path):
    """--hflip true: each training image's grid comes, per epoch, from the plain or the mirrored
    photo (about half each, drawn per epoch); validation always sees the plain photo."""
    cfg = make_config(dataset, tmp_path / "run", cache_dir, epochs=1, scst_epochs=0, hflip=True)
    summary = train(cfg)
    assert summary["feature_extraction"]["mirrored"]["images"] == 16  # training photos only

    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    model = CaptionModel(cfg.model, len(data.vocab))
    inputs = Inputs(model, data, torch.device("cpu"), str(cache_dir), True, 0, Dist(), progress=False)
    encoder = Encoder("efficientnet_lite0", 128)
    paths = [p for _, p in sorted(_image_paths(cfg).items())]
    plain = FeatureCache(cache_dir, encoder, [*paths, *paths])
    mirrored = FeatureCache(cache_dir, encoder, paths, mirrored=True)
    draws = [mirrored_rows(True, cfg.seed, 16, epoch) for epoch in range(2)]
    assert not np.array_equal(*draws)  # a new draw each epoch
    assert np.array_equal(draws[0], mirrored_rows(True, cfg.seed, 16, 0))  # the same on resume
    choices = []
    for mirror in draws:
        row_batches = epoch_batches(16, 4, cfg.seed, 0, Dist())
        for rows, x in inputs.batches(row_batches, mirror):
            for i, row in enumerate(rows):
                source = mirrored if mirror[row] else plain
                assert torch.equal(x[i], source.batch([row])[0]), row
                choices.append(bool(mirror[row]))
    assert 0 < sum(choices) < len(choices)
    ((_, x),) = inputs.batches([[16, 17]])  # validation rows: never mirrored
    assert torch.equal(x, plain.batch([16, 17]))


@pytest.mark.slow
def test_caption_batches_hold_single_captions_shuffled_across_images(dataset, cache_dir, tmp_path):
    """--batch_by caption: a cross-entropy epoch is every training caption once, in batches of
    batch_size captions, each caption paired with its own image's grid; SCST still batches
    whole images."""
    captions_json, images = dataset
    coco = json.loads(captions_json.read_text())
    coco["annotations"] += [
        {"id": 1000 * k + a["id"], "image_id": a["image_id"], "caption": f"{word} {a['caption']}"}
        for k, word in ((1, "look"), (2, "here"))
        for a in coco["annotations"]
    ]
    three_each = tmp_path / "three_captions.json"
    three_each.write_text(json.dumps(coco))
    cfg = make_config(
        (three_each, images),
        tmp_path / "run",
        cache_dir,
        epochs=2,
        scst_epochs=1,
        batch_size=8,
        batch_by="caption",
    )
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    every_caption = sorted((row, tuple(ids)) for row, caps in enumerate(data.encoded) for ids in caps)
    assert len(every_caption) == 48
    items = training_items(data, "caption")
    for epoch in range(2):
        batches = epoch_batches(len(items), cfg.batch_size, cfg.seed, epoch, Dist())
        assert [len(b) for b in batches] == [8] * 6
        seen = []
        for batch in batches:
            rows = [items[i][0] for i in batch]
            step = step_batch(rows, torch.zeros(8, 1), [items[i][1] for i in batch], None, "cpu")
            assert torch.equal(step.image_index, torch.arange(8))  # one grid per caption
            seen += [(row, tuple(step.captions[i, : step.lengths[i]].tolist())) for i, row in enumerate(rows)]
        assert sorted(seen) == every_caption
        # Shuffled across images: whole images (3 captions each) would give at most 4 per batch.
        assert np.mean([len({items[i][0] for i in b}) for b in batches]) > 5
    scst_items = training_items(data, "image")
    assert [row for row, _ in scst_items] == list(range(16)) and all(len(c) == 3 for _, c in scst_items)

    train(cfg)  # 2 epochs of 6 caption batches, then SCST over 2 batches of 8 images
    assert state_progress(tmp_path / "run")["global_step"] == 2 * 6 + 2


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(dataset, cache_dir, tmp_path):
    """A NaN in the inputs (here: one image's cached grid) makes the loss NaN: the run stops with
    an error before the weights change, the saved run state is the step before, and once the
    input is fixed the run resumes."""
    poisoned = tmp_path / "cache"
    shutil.copytree(cache_dir, poisoned)
    cfg = make_config(dataset, tmp_path / "run", poisoned, epochs=1, scst_epochs=0, checkpoint_every=1)
    paths = [p for _, p in sorted(_image_paths(cfg).items())]
    cache = FeatureCache(poisoned, Encoder("efficientnet_lite0", 128), [*paths, *paths])
    cache.extract(num_workers=0, progress=False)
    row = epoch_batches(16, cfg.batch_size, cfg.seed, 0, Dist())[2][0]  # in the third step
    grids = np.memmap(cache.features_file, dtype=np.float16, mode="r+", shape=cache.shape)
    grids[row, 0, 0] = np.nan
    grids.flush()
    with pytest.raises(training_module.TrainingDiverged, match=r"loss became nan at step 3 .*last good"):
        train(cfg)
    assert state_progress(tmp_path / "run")["global_step"] == 2
    saved = state_tensors(tmp_path / "run").values()
    assert all(torch.isfinite(v).all() for v in saved if v.is_floating_point())

    done = np.memmap(cache.done_file, dtype=np.uint8, mode="r+")
    done[row] = 0  # recompute that row
    done.flush()
    train(dataclasses.replace(cfg, resume=True))
    assert state_progress(tmp_path / "run")["done"] is True


def test_unknown_batch_by_is_refused_before_anything_is_written(dataset, cache_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="batch_by 'sentence': expected one of image, caption"):
        train(make_config(dataset, out, cache_dir, batch_by="sentence"))
    assert not out.exists()
