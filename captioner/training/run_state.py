"""A training run's state: model (+ its moving average), optimizer, RNG and progress in one
safetensors file, replaced atomically, so a killed run resumes exactly where it stopped.

A run folder holds the run state (STATE_FILE), the run's config (TRAIN_CONFIG_FILE), its
metrics log and, in BEST_FOLDER, the model folder of its best epoch (captioner.model.folder).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel

from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.vocabulary import Vocabulary

STATE_FILE = "checkpoint.safetensors"  # the run state; the name of older runs, so they resume
TRAIN_CONFIG_FILE = "train_config.json"
BEST_FOLDER = "best"


class RunStateError(RuntimeError):
    """A run state that cannot be resumed from: the message names the file and what to do."""


@dataclass
class Progress:
    """Where a run is; saved in the run state as JSON."""

    stage: str = "xe"  # "xe" (cross-entropy) or "scst" (self-critical)
    epoch: int = 0  # epochs finished in this stage
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None  # validation CIDEr (or -train loss without validation images)
    best_epoch: str | None = None  # e.g. "xe-7"
    bad_epochs: int = 0  # epochs since the best, in this stage
    done: bool = False
    epoch_sums: dict[str, float] | None = None  # running sums of a half-done epoch, over all ranks
    epoch_seconds: float = 0.0  # time spent in a half-done epoch

    def start_stage(self, stage: str) -> None:
        self.stage, self.epoch, self.step_in_epoch, self.bad_epochs = stage, 0, 0, 0

    def record(self, score: float, label: str) -> bool:
        """An epoch's validation score; True if it is the best so far."""
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_epoch, self.bad_epochs = score, label, 0
        else:
            self.bad_epochs += 1
        self.epoch, self.step_in_epoch, self.epoch_sums, self.epoch_seconds = self.epoch + 1, 0, None, 0.0
        return improved


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_run_state(
    path: Path,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer,
    vocab: Vocabulary,
    progress: Progress,
    average: AveragedModel | None = None,
) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "progress": asdict(progress),
        "optimizer": opt_meta,
        "vocabulary": vocab.to_json(),
        "python_rng": random.getstate(),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_run_state(
    path: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, average: AveragedModel | None = None
) -> None:
    """Restore the weights, optimizer and RNG streams in place (see read_progress for the rest)."""
    meta = _run_metadata(path)
    tensors = _read_tensors(path)
    check_state_fits(path, model)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        saved = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not saved:
            raise ValueError(
                f"{path} holds no moving average of the weights, but ema_decay is set: "
                "resume with the run's own train_config.json"
            )
        average.load_state_dict(saved)
    _optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, state, gauss = meta["python_rng"]
    random.setstate((version, tuple(state), gauss))


def read_progress(path: Path) -> Progress:
    known = {f.name for f in fields(Progress)}
    return Progress(**{k: v for k, v in _run_metadata(path)["progress"].items() if k in known})


def read_run_vocabulary(path: Path) -> Vocabulary:
    try:
        return Vocabulary(_run_metadata(path)["vocabulary"])
    except (KeyError, TypeError, ValueError) as err:
        raise _unreadable(path, f"bad vocabulary: {err}") from err


def check_state_fits(path: Path, model: CaptionModel) -> None:
    """Refuse a run state whose weights do not fit `model` (another --model setting), from the
    file's header alone: before anything is written or trained."""
    try:
        with safe_open(str(path), "pt") as f:
            saved = {k[6:]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.")}
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, str(err)) from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [
        f"{k}: saved {saved[k]}, the model has {shape}"
        for k, shape in expected.items()
        if k in saved and saved[k] != shape
    ]
    problems += [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    if problems:
        raise RunStateError(
            f"{path} holds weights of another model: {'; '.join(problems[:4])}"
            + (f" (+{len(problems) - 4} more)" if len(problems) > 4 else "")
            + ". Resume with the run's own settings (--config of its train_config.json)"
        )


def _run_metadata(path: Path) -> dict[str, Any]:
    """The JSON part of a run state: progress, optimizer settings, vocabulary, RNG."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise _unreadable(path, str(err)) from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _unreadable(path, str(err)) from err


def _unreadable(path: Path, why: str) -> RunStateError:
    return RunStateError(
        f"{path} cannot be resumed from: it is truncated or damaged ({why}). Restore it from a "
        "copy, or start the run anew with --overwrite true (deletes its run state, metrics and "
        "best/)"
    )


def last_step_model(
    run_dir: str | Path, averaged: bool = False
) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """The model of a run's last saved step, its vocabulary and the run's train_config.json.

    Its raw weights (or, with `averaged`, their moving average), which need not be BEST_FOLDER's:
    with a cosine schedule the last step can score as well.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} does not exist: not a training run folder")
    train_config = json.loads((run_dir / TRAIN_CONFIG_FILE).read_text())
    vocab = read_run_vocabulary(state_path)
    prefix = "ema.module." if averaged else "model."
    saved = _read_tensors(state_path)
    tensors = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    if averaged and not tensors:
        raise ValueError(f"{state_path} holds no moving average of the weights (ema_decay was 0)")
    config = ModelConfig.from_saved(train_config["model"])
    model = CaptionModel(config, len(vocab), encoder_weights="random")  # all in the state
    model.load_state_dict(tensors)
    return model.eval(), vocab, train_config
