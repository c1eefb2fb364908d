"""The architecture as a plain dataclass (no torch here: the command line builds flags from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """The architecture; every field is a `captioner train --model.FIELD` flag, documented by its
    docstring."""

    backbone: Literal["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                      "resnet50", "resnet101"] = "efficientnet_lite0"
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
