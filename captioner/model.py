"""The whole captioning model: encoder + attention decoder, described by one plain config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .decoder import AttentionDecoder
from .encoder import Encoder


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    grid_size: int | None = None  # None: the backbone's natural grid at image_size
    attention: str = "additive"  # or "multiplicative"
    annotation_dim: int = 512  # backbone features are projected to this size
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, encoder_weights: str = "imagenet"):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.backbone, config.image_size, config.grid_size, encoder_weights)
        config.grid_size = self.encoder.grid_size
        self.decoder = AttentionDecoder(
            vocab_size,
            self.encoder.feature_dim,
            config.annotation_dim,
            config.embed_dim,
            config.hidden_dim,
            config.attention_dim,
            config.attention,
            config.dropout,
        )

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.encoder.grid_size, self.encoder.grid_size)

    def forward(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
        """Teacher-forced pass from pixels (used when fine-tuning the encoder)."""
        return self.decoder(self.encoder(images), captions, lengths)
