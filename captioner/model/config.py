"""The architecture as a plain dataclass (no torch here: the command line builds flags from it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from captioner.model.options import check_whole_number

LEGACY_SETTINGS = ("decoders",)
"""Keys older files hold among the model settings that are not architecture: `decoders`, the
number of voting decoders, written before ensembles became an inference-time wrapper (a model
folder's config.json now says `ensemble_size`, see captioner.model.folder.ensemble_size)."""


@dataclass
class ModelConfig:
    """The architecture; every field is a `captioner train --model.FIELD` flag, documented by its
    docstring."""

    backbone: Literal[
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet101"
    ] = "efficientnet_lite0"
    """The pretrained CNN that turns the image into a grid of annotation vectors."""
    image_size: int = 224
    """Side of the (square) image the encoder sees, in pixels."""
    grid_size: int | None = None
    """Side of the annotation grid (none: the backbone's natural grid at image_size)."""
    attention: Literal["additive", "multiplicative", "hard"] = "additive"
    """How the decoder scores the grid's regions before each word; hard: additive scores, one
    sampled region per word in training (Xu et al. section 4.1), the likeliest one when captioning."""
    annotation_dim: int | None = 512
    """Backbone features are projected to this size (none: not)."""
    embed_dim: int = 512
    """Size of the word embeddings."""
    hidden_dim: int = 512
    """Size of the LSTM's hidden state."""
    attention_dim: int = 512
    """Size of the attention's hidden layer."""
    dropout: float = 0.5
    """Dropout before the output layer."""
    input_dropout: float = 0.0
    """Dropout on word embeddings and projected annotations."""
    deep_output: bool = True
    """Off: words are predicted from h_t alone (an ablation)."""
    gate: bool = True
    """Off: no gating scalar beta on the context (an ablation)."""
    semantic_attributes: bool = False
    """On: the decoder also reads the encoder's ImageNet label distribution (captioner.model.evidence),
    projected and added to every annotation vector (issue #37 2c; captioner.training.attributes)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse sizes and rates that make no sense (ValueError naming the setting), before they
        reach torch, whose errors would not say which."""
        for name in ("image_size", "embed_dim", "hidden_dim", "attention_dim"):
            check_whole_number(name, getattr(self, name), 1)
        for name in ("grid_size", "annotation_dim"):
            if getattr(self, name) is not None:
                check_whole_number(name, getattr(self, name), 1)
        for name in ("dropout", "input_dropout"):
            check_number(name, getattr(self, name), 0.0, 1.0, high_included=False)

    @classmethod
    def from_saved(cls, settings: Mapping[str, Any]) -> ModelConfig:
        """The architecture a saved file describes: a model folder's config.json "model"
        section, or a training run's train_config.json "model". Keys older files hold
        (LEGACY_SETTINGS) are left out; a key no version wrote is a ValueError that names it."""
        known = {f.name for f in fields(cls)}
        unknown = set(settings) - known - set(LEGACY_SETTINGS)
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        return cls(**{k: v for k, v in settings.items() if k in known})


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_included: bool = True,
    high_included: bool = True,
) -> None:
    """ValueError naming the setting and its allowed range unless `value` is a finite number in it."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (value >= low if low_included else value > low)
    below = number and (value <= high if high_included else value < high)
    if not (above and below):
        allowed = f"{'>=' if low_included else '>'} {low:g}"
        if math.isfinite(high):
            allowed += f" and {'<=' if high_included else '<'} {high:g}"
        raise ValueError(f"{name} must be a number {allowed}, got {value!r}")
