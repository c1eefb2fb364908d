"""The whole captioning model: encoder + attention decoder, described by one plain config."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .decoder import AttentionDecoder
from .decoding import decode_tensors
from .encoder import Encoder


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    grid_size: int | None = None  # None: the backbone's natural grid at image_size
    attention: str = "additive"  # or "multiplicative", or "hard" (additive scores, one cell per word)
    annotation_dim: int | None = 512  # backbone features are projected to this size (None: not)
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    dropout: float = 0.5  # before the output layer
    input_dropout: float = 0.0  # on word embeddings and projected annotations
    deep_output: bool = True  # False: words are predicted from h_t alone (an ablation)
    gate: bool = True  # False: no gating scalar beta on the context (an ablation)


def build_decoder(config: ModelConfig, vocab_size: int, feature_dim: int) -> AttentionDecoder:
    return AttentionDecoder(vocab_size, feature_dim, config.annotation_dim, config.embed_dim,
                            config.hidden_dim, config.attention_dim, config.attention, config.dropout,
                            config.input_dropout, config.deep_output, config.gate)


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, encoder_weights: str = "imagenet"):
        super().__init__()
        self.encoder = Encoder(config.backbone, config.image_size, config.grid_size, encoder_weights)
        self.config = replace(config, grid_size=self.encoder.grid_size)  # resolved, caller's untouched
        # An AttentionDecoder, or at inference a DecoderEnsemble (checkpoint.load_ensemble).
        self.decoder: nn.Module = build_decoder(config, vocab_size, self.encoder.feature_dim)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.encoder.grid_size, self.encoder.grid_size)

    def forward(self, inputs: torch.Tensor, captions: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
                encode: bool = True, samples: int = 0, max_length: int = 16,
                return_locations: bool = False):
        """The training pass, so that DistributedDataParallel sees every gradient.

        inputs: pixels (B, 3, S, S), or cached grids (B, L, D) with encode=False.
        samples=0: teacher forcing -> (logits, alphas). samples=S: S sampled captions per image
        -> decode_tensors' (tokens, log_probs, mask, alphas), for self-critical training.
        return_locations: teacher forcing also returns hard attention's cells (AttentionDecoder).
        """
        features = self.encoder(inputs) if encode else inputs
        if samples:
            return decode_tensors(self.decoder, features, max_length, greedy=False,
                                  samples_per_image=samples)
        return self.decoder(features, captions, lengths, image_index, return_locations=return_locations)
