"""Model folders: a trained model as safetensors weights (WEIGHTS_FILE) + a JSON config
(CONFIG_FILE: architecture, vocabulary, metadata). No pickles, so loading never runs code.

A model folder is what captioning loads (`weights/`, a run's `best/`, an export); a training
run's resumable state is another file (captioner.training.run_state)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel, build_decoder
from captioner.model.config import ModelConfig
from captioner.model.decoder import AttentionDecoder
from captioner.model.encoder import backbone_spec
from captioner.model.ensemble import DecoderEnsemble
from captioner.model.vocabulary import Vocabulary

FORMAT_NAME = "captioner"
FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A model folder that is missing, corrupt, or whose weights do not fit its config (the name
    is kept for the users who catch it)."""


def save_model(
    directory: str | Path,
    model: CaptionModel,
    vocab: Vocabulary,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model.safetensors` and `config.json` into `directory`."""
    directory = Path(directory)
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": asdict(model.config),
        "ensemble_size": len(model.decoder.members) if isinstance(model.decoder, DecoderEnsemble) else 1,
        "weights_dtype": str(dtype).removeprefix("torch."),
        "vocabulary": vocab.to_json(),
        "metadata": metadata or {},
    }
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a captioner model folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a captioner config (no 'format': 'captioner')")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {config.get('format_version')}; this captioner reads "
            f"version {FORMAT_VERSION}"
        )
    return config


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """Load a model folder (or its model.safetensors). Returns (model in eval mode, vocab, config).

    The config is checked against the weights file's header (names and shapes, no tensor data)
    before anything is built: a config.json saying 100000 decoders or a 10^6-wide LSTM is refused
    at once instead of filling memory."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    if not directory.exists():
        raise CheckpointError(f"model path {path} does not exist")
    config = read_config(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    model_config, vocab, members = _read_settings(config, config_path)
    header = _read_header(weights_path)
    found = {k.split(".")[2] for k in header if k.startswith("decoder.members.")}
    if members != (len(found) or 1):
        raise CheckpointError(
            f"{config_path} says ensemble_size {members}, but {weights_path} holds "
            f"{len(found) or 1} decoder(s)"
        )
    _check_fits(
        _decoder_shapes(model_config, len(vocab), members, config_path),
        header,
        weights_path,
        config_path,
        only="decoder.",
    )
    state = _read_weights(weights_path)
    try:
        model = _build_model(model_config, len(vocab), members)
    except (TypeError, ValueError, RuntimeError) as err:  # e.g. a typo'd backbone, a size as text
        raise CheckpointError(f"{config_path}: bad model settings {config['model']} ({err})") from err
    expected = model.state_dict()
    _check_fits({k: tuple(v.shape) for k, v in expected.items()}, header, weights_path, config_path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), vocab, config


def _read_settings(config: dict[str, Any], config_path: Path) -> tuple[ModelConfig, Vocabulary, int]:
    """A config.json's architecture, vocabulary and number of voting decoders, each checked."""
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{config_path}: no 'model' settings")
    try:
        model_config = ModelConfig.from_saved(config["model"])
    except ValueError as err:  # a setting no version wrote, or a value out of range
        raise CheckpointError(f"{config_path}: {err}") from err
    try:
        vocab = Vocabulary(config["vocabulary"])
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_path}: bad vocabulary ({err})") from err
    members = ensemble_size(config)
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise CheckpointError(f"{config_path}: ensemble_size must be a whole number >= 1, got {members!r}")
    return model_config, vocab, members


def ensemble_size(config: dict[str, Any]) -> int:
    """How many decoders vote in the model folder whose config.json is `config` (older folders
    said it among the model settings: `decoders`, see ModelConfig.from_saved)."""
    return config["ensemble_size"] if "ensemble_size" in config else config["model"].get("decoders", 1)


def _read_header(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' names and shapes, from the file's header alone."""
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        with safe_open(str(weights_path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {err}") from err


def _decoder_shapes(
    config: ModelConfig, vocab_size: int, members: int, config_path: Path
) -> dict[str, tuple[int, ...]]:
    """The decoder tensors the config describes, from one decoder built on the meta device (no
    memory), repeated per member."""
    try:
        with torch.device("meta"):
            decoder = build_decoder(config, vocab_size, backbone_spec(config.backbone).feature_dim)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{config_path}: bad model settings {asdict(config)} ({err})") from err
    prefixes = ["decoder."] if members == 1 else [f"decoder.members.{i}." for i in range(members)]
    return {p + k: tuple(v.shape) for p in prefixes for k, v in decoder.state_dict().items()}


def _check_fits(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    weights_path: Path,
    config_path: Path,
    only: str = "",
) -> None:
    """Refuse weights that do not fit the model the config describes (among the tensors whose
    names start with `only`), naming the tensors and both shapes."""
    found = {k: v for k, v in found.items() if k.startswith(only)}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [
        f"{k}: file {v} vs config {expected[k]}"
        for k, v in found.items()
        if k in expected and v != expected[k]
    ]
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match {config_path}: {'; '.join(problems[:5])}"
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        )


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    """A model folder's tensors, refused if the file is missing, corrupt or not finite."""
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {err}") from err
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(
            f"{weights_path}: {len(broken)} tensors hold NaN or infinite values (a training run that "
            f"diverged?): {', '.join(broken[:5])}" + (" ..." if len(broken) > 5 else "")
        )
    return state


def _build_model(config: ModelConfig, vocab_size: int, ensemble_size: int) -> CaptionModel:
    """The model a folder describes, with random weights (its file supplies them all)."""
    model = CaptionModel(config, vocab_size, encoder_weights="random")
    if ensemble_size != 1:
        feature_dim = model.encoder.feature_dim
        model.decoder = DecoderEnsemble(
            [build_decoder(config, vocab_size, feature_dim) for _ in range(ensemble_size)]
        )
    return model


def architecture(config: ModelConfig) -> ModelConfig:
    """The settings that must match for decoders to vote (dropout acts in training only)."""
    return replace(config, dropout=0.0, input_dropout=0.0)


def _as_stored(tensor: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16, so a member exported in fp16 matches the same encoder kept in fp32."""
    return tensor.half() if tensor.is_floating_point() else tensor


def load_ensemble(
    paths: Sequence[str | Path], device: str | torch.device = "cpu"
) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """Load trained model folders as one model whose decoders vote (see captioner.model.ensemble).

    The members must share everything but their decoder weights: the encoder (the same frozen
    backbone at the same size), the decoder's shape and the vocabulary.
    """
    if len(paths) < 2:
        raise CheckpointError(f"an ensemble needs at least 2 model folders, got {len(paths)}")
    loaded = [load_model(p) for p in paths]
    first_model, vocab, _ = loaded[0]
    first_encoder = first_model.encoder.state_dict()
    members: list[AttentionDecoder] = []
    for path, (model, member_vocab, _) in zip(paths, loaded, strict=True):
        if not isinstance(model.decoder, AttentionDecoder):  # load_model's other kind: an ensemble
            raise CheckpointError(f"{path} is already an ensemble; list its members instead")
        members.append(model.decoder)
        if architecture(model.config) != architecture(first_model.config):
            raise CheckpointError(
                f"{path}: model settings {asdict(model.config)} differ from "
                f"{paths[0]}'s {asdict(first_model.config)}"
            )
        if member_vocab.to_json() != vocab.to_json():
            raise CheckpointError(f"{path}: its vocabulary differs from {paths[0]}'s")
        if any(
            not torch.equal(_as_stored(v), _as_stored(first_encoder[k]))
            for k, v in model.encoder.state_dict().items()
        ):
            raise CheckpointError(
                f"{path}: its encoder weights differ from {paths[0]}'s "
                "(only decoders trained on the same frozen encoder can vote)"
            )
    ensemble = first_model
    ensemble.decoder = DecoderEnsemble(members)
    metadata = {
        "ensemble_of": [
            {"path": str(p), **config["metadata"]} for p, (_, _, config) in zip(paths, loaded, strict=True)
        ]
    }
    return ensemble.to(device).eval(), vocab, metadata
