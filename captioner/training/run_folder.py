"""Guarding a run folder: one training in it at a time, an earlier run never silently replaced,
and a resume with other settings refused before anything is written.

Both run on rank 0 only (the other ranks may start after it has written). `check_run_folder`
runs before any data is read; `claim_run_folder` once the data and model are ready, just before
the first write: it locks the folder for the whole training, checks again under the lock, and
with `overwrite` deletes the earlier run's files (only those: other files in the folder stay).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from captioner.files import LockedError, exclusive_lock
from captioner.model.folder import CONFIG_FILE, WEIGHTS_FILE
from captioner.training.config import TrainConfig
from captioner.training.metrics_log import MetricsLog
from captioner.training.run_state import BEST_FOLDER, STATE_FILE, TRAIN_CONFIG_FILE, read_progress

LOCK_FILE = ".train.lock"

# What a resume may change; any other difference from the run's train_config.json is refused.
# Where and how it runs, how long it goes on, the learning rates (lowering them after a
# divergence is what TrainingDiverged advises), validation, and where the data now lives.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "output_dir",
        "cache_dir",
        "resume",
        "overwrite",
        "stop_after_step",
        "progress",
        "num_workers",
        "device",
        "amp",
        "checkpoint_every",
        "init_from",
        "epochs",
        "scst_epochs",
        "patience",
        "scst_patience",
        "lr",
        "scst_lr",
        "encoder_lr",
        "grad_clip",
        "val_beam_size",
        "val_max_length",
        "data.max_val_images",
        "data.root",
        "data.train",
        "data.train_images",
        "data.val",
        "data.val_images",
        "data.split_json",
        "data.image_root",
    }
)


class RunFolderError(RuntimeError):
    """A run folder that this training may not write to as asked; nothing was written."""


def run_files(folder: Path) -> list[Path]:
    """The files of a training run that `folder` holds (none: a new run may start there)."""
    metrics = MetricsLog(folder)
    names = [
        folder / STATE_FILE,
        folder / TRAIN_CONFIG_FILE,
        metrics.jsonl,
        metrics.csv,
        metrics.png,
        folder / BEST_FOLDER / WEIGHTS_FILE,
        folder / BEST_FOLDER / CONFIG_FILE,
    ]
    return [path for path in names if path.is_file()]


def check_run_folder(cfg: TrainConfig) -> None:
    """Refuse, before anything is read or written: a folder holding a run without resume or
    overwrite; a resume whose settings differ from the run's, or whose run state is damaged."""
    folder = Path(cfg.output_dir)
    state = folder / STATE_FILE
    if cfg.resume and state.exists():
        check_resume_settings(cfg, folder)
        read_progress(state)  # a truncated or damaged run state: RunStateError
        return
    found = run_files(folder)
    if found and not (cfg.resume or cfg.overwrite):
        raise RunFolderError(
            f"{folder} holds a training run ({', '.join(str(p.relative_to(folder)) for p in found)}); "
            "nothing was written. Continue it with --resume true, start it anew with --overwrite true "
            "(deletes its run state, metrics and best/), or choose another --output-dir"
        )


def check_resume_settings(cfg: TrainConfig, folder: Path) -> None:
    """Refuse to resume with settings other than the run's (a typo in --model.hidden-dim would
    otherwise fail on the weights after train_config.json was overwritten), naming them."""
    path = folder / TRAIN_CONFIG_FILE
    if not path.is_file():
        return  # the run state's header is still checked against the model (check_state_fits)
    try:
        saved = _flat(asdict(TrainConfig.from_dict(json.loads(path.read_text()))))
    except (ValueError, TypeError) as err:
        raise RunFolderError(
            f"{path} cannot be read ({err}), so the resume cannot be checked against "
            "the run's settings; restore it, or start anew with --overwrite true"
        ) from err
    given = _flat(asdict(cfg))
    differ = [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in given.items()
        if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != value
    ]
    if differ:
        raise RunFolderError(
            f"--resume: {folder} is a run with other settings (the run's -> given: {'; '.join(differ)}); "
            f"nothing was written. Resume it as it was: captioner train --config {path} --resume true "
            "(a resume may change: "
            + ", ".join(sorted(k for k in MAY_CHANGE_ON_RESUME if "." not in k))
            + "), or train a new run in another --output-dir"
        )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"hidden_dim": 64}} -> {"model.hidden_dim": 64}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextmanager
def claim_run_folder(cfg: TrainConfig, is_main: bool) -> Iterator[None]:
    """Hold the run folder for this training (created if need be): locked by rank 0, so a second
    training into it is refused at once; checked again under the lock (another training may have
    finished there since check_run_folder); with overwrite, the earlier run's files deleted."""
    if not is_main:
        yield
        return
    folder = Path(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    held = ExitStack()
    try:
        held.enter_context(exclusive_lock(folder / LOCK_FILE, wait=False))
    except LockedError as err:
        raise RunFolderError(
            f"another training is writing to {folder} ({err}); nothing was written. "
            "Wait for it to end, or choose another --output-dir"
        ) from err
    with held:
        check_run_folder(cfg)
        if cfg.overwrite:
            for path in run_files(folder):
                path.unlink()
        yield
