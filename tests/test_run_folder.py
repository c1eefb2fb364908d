"""A training run's folder and settings: checked before any work, never silently replaced, one
training at a time, a resume that does not fit refused before anything is written, and errors
that name the file and what to do."""

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.cli.main import main
from captioner.data.feature_cache import FeatureCache
from captioner.files import exclusive_lock
from captioner.model.encoder import Encoder
from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist
from captioner.training.inputs import epoch_batches
from captioner.training.loop import TrainingDiverged, train
from captioner.training.run_folder import LOCK_FILE, RunFolderError
from captioner.training.run_state import STATE_FILE, TRAIN_CONFIG_FILE, RunStateError

from .shapes import write_coco_dataset
from .test_training import _image_paths, make_config, metrics_rows, state_progress


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    return write_coco_dataset(tmp_path_factory.mktemp("coco-shapes"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


def quick(dataset, out, cache_dir, **overrides) -> TrainConfig:
    """One cross-entropy epoch of 4 steps."""
    return make_config(dataset, out, cache_dir, **({"epochs": 1, "scst_epochs": 0} | overrides))


@pytest.fixture(scope="module")
def stopped_run(dataset, cache_dir, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """A run stopped after step 2 of 4 (its run state saved): (config, folder). Tests copy it."""
    out = tmp_path_factory.mktemp("runs") / "stopped"
    cfg = quick(dataset, out, cache_dir, stop_after_step=2)
    train(cfg)
    return cfg, out


def copy_of(stopped_run, tmp_path) -> tuple[TrainConfig, Path]:
    cfg, folder = stopped_run
    out = shutil.copytree(folder, tmp_path / "run")
    return dataclasses.replace(cfg, output_dir=str(out)), out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint-every", "0"], "checkpoint_every must be a whole number >= 1, got 0"),
        (["--model.dropout", "1.5"], "model.dropout must be a number >= 0 and < 1, got 1.5"),
        (["--lr", "-1"], "lr must be a number > 0, got -1.0"),
        (["--batch-size", "0"], "batch_size must be a whole number >= 1, got 0"),
        (["--epochs", "0"], "epochs must be a whole number >= 1, got 0"),
        (["--resume", "--overwrite"], "resume and overwrite: choose one"),
    ],
)
def test_bad_training_settings_are_refused_before_any_work(dataset, tmp_path, capsys, flags, message):
    """Were: a ZeroDivisionError after data preparation, a torch traceback, gradient ascent saved
    as best, a batch size silently 1, exit 0 without a model. Now one line naming the setting."""
    captions, images = dataset
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as refused:
        main(
            [
                "train",
                "--output-dir",
                str(out),
                "--data.kind",
                "coco",
                "--data.train",
                str(captions),
                "--data.train-images",
                str(images),
                "--progress",
                "false",
                *flags,
            ]
        )
    assert refused.value.code != 0 and message in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- a folder holding a run


@pytest.mark.slow
def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(dataset, cache_dir, tmp_path):
    out = tmp_path / "run"
    train(quick(dataset, out, cache_dir, epochs=2))  # finished: 2 epochs
    before = snapshot(out)
    pattern = (
        rf"{re.escape(str(out))} holds a training run \(checkpoint.safetensors, train_config.json, "
        r"metrics.jsonl, .*best/model.safetensors, best/config.json\); nothing was written. "
        r"Continue it with --resume true, start it anew with --overwrite true"
    )
    with pytest.raises(RunFolderError, match=pattern):
        train(quick(dataset, out, cache_dir, seed=1))
    assert snapshot(out) == before

    (out / "notes.txt").write_text("mine")
    train(quick(dataset, out, cache_dir, seed=1, overwrite=True))  # 1 epoch, into the same folder
    assert [r["epoch"] for r in metrics_rows(out)] == [1]  # not the earlier run's epoch 2 as well
    saved = json.loads((out / TRAIN_CONFIG_FILE).read_text())
    assert (saved["seed"], saved["overwrite"]) == (1, False)  # overwrite is an act, not a setting
    assert state_progress(out)["global_step"] == 4 and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl file locks on Windows")
def test_a_second_training_into_a_folder_in_use_is_refused(dataset, cache_dir, tmp_path):
    """Two trainings in one folder at once ended as a mix of both. (The other training is
    played by this process holding the folder's lock through another open file: the same OS
    lock a second process meets.)"""
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out / LOCK_FILE):
        message = rf"another training is writing to {re.escape(str(out))} \(.*held by process {os.getpid()}\)"
        with pytest.raises(RunFolderError, match=message + "; nothing was written"):
            train(quick(dataset, out, cache_dir))
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    train(quick(dataset, out, cache_dir, stop_after_step=1))  # once it is free
    assert state_progress(out)["global_step"] == 1


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_before_anything_is_written(stopped_run, tmp_path):
    """A typo in --model.hidden-dim was a raw size-mismatch traceback after train_config.json
    had been overwritten, so the documented `--config RUN/train_config.json --resume` failed
    from then on."""
    cfg, out = copy_of(stopped_run, tmp_path)
    before = snapshot(out)
    typo = dataclasses.replace(cfg, resume=True, seed=3, model=dataclasses.replace(cfg.model, hidden_dim=128))
    message = (
        r"--resume: .* is a run with other settings \(the run's -> given: model.hidden_dim 64 -> 128; "
        r"seed 0 -> 3\); nothing was written"
        rf".*--config {re.escape(str(out / TRAIN_CONFIG_FILE))} --resume true"
    )
    with pytest.raises(RunFolderError, match=message):
        train(typo)
    assert snapshot(out) == before
    # What a resume may change (how long, where, the learning rate) it may.
    train(dataclasses.replace(cfg, resume=True, stop_after_step=None, epochs=2, lr=1e-3, num_workers=0))
    assert state_progress(out)["done"] is True and len(metrics_rows(out)) == 2


def test_a_run_state_that_does_not_fit_the_model_is_refused_from_its_header(stopped_run, tmp_path):
    """Even with train_config.json edited to match the new setting: the run state's tensor
    shapes are checked against the model before anything is written."""
    cfg, out = copy_of(stopped_run, tmp_path)
    wide = dataclasses.replace(cfg, resume=True, model=dataclasses.replace(cfg.model, hidden_dim=128))
    (out / TRAIN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(wide)))
    before = snapshot(out)
    with pytest.raises(
        RunStateError,
        match=rf"{re.escape(str(out / STATE_FILE))} holds weights of another "
        r"model: decoder\..*: saved \(.*\), the model has \(.*128",
    ):
        train(wide)
    assert snapshot(out) == before


@pytest.mark.parametrize("kept", [0.0, 0.5])
def test_a_truncated_run_state_is_named_with_what_to_do(stopped_run, tmp_path, kept):
    """Was a raw SafetensorError ("header too small", "incomplete metadata")."""
    cfg, out = copy_of(stopped_run, tmp_path)
    state = out / STATE_FILE
    os.truncate(state, int(state.stat().st_size * kept))
    before = snapshot(out)
    message = (
        rf"{re.escape(str(state))} cannot be resumed from: it is truncated or damaged \(.*\)\. "
        r"Restore it from a copy, or start the run anew with --overwrite true"
    )
    with pytest.raises(RunStateError, match=message):
        train(dataclasses.replace(cfg, resume=True))
    assert snapshot(out) == before


def test_a_nan_at_the_first_step_does_not_point_to_a_run_state_never_written(dataset, cache_dir, tmp_path):
    poisoned = shutil.copytree(cache_dir, tmp_path / "cache")
    cfg = quick(dataset, tmp_path / "run", poisoned, checkpoint_every=1)
    paths = [p for _, p in sorted(_image_paths(cfg).items())]
    cache = FeatureCache(poisoned, Encoder("efficientnet_lite0", 128), [*paths, *paths])
    cache.extract(num_workers=0, progress=False)
    row = epoch_batches(16, cfg.batch_size, cfg.seed, 0, Dist())[0][0]  # in the first step
    grids = np.memmap(cache.features_file, dtype=np.float16, mode="r+", shape=cache.shape)
    grids[row, 0, 0] = np.nan
    grids.flush()
    del grids
    with pytest.raises(
        TrainingDiverged,
        match=r"loss became nan at step 1 .*no run state was saved yet, "
        r"so there is nothing to resume.*--overwrite true",
    ) as err:
        train(cfg)
    assert STATE_FILE not in str(err.value) and not (tmp_path / "run" / STATE_FILE).exists()
