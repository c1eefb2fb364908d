"""The whole captioning model: encoder + attention decoder, described by one plain config."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from captioner.model.config import ModelConfig
from captioner.model.decoder import AttentionDecoder
from captioner.model.decoding import decode_tensors
from captioner.model.encoder import Encoder
from captioner.model.ensemble import DecoderEnsemble


def build_decoder(config: ModelConfig, vocab_size: int, feature_dim: int) -> AttentionDecoder:
    return AttentionDecoder(
        vocab_size,
        feature_dim,
        config.annotation_dim,
        config.embed_dim,
        config.hidden_dim,
        config.attention_dim,
        config.attention,
        config.dropout,
        config.input_dropout,
        config.deep_output,
        config.gate,
        config.semantic_attributes,
    )


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int, encoder_weights: str = "imagenet"):
        super().__init__()
        self.encoder = Encoder(config.backbone, config.image_size, config.grid_size, encoder_weights)
        self.config = replace(config, grid_size=self.encoder.grid_size)  # resolved, caller's untouched
        # At inference a DecoderEnsemble may take its place (model.folder.load_ensemble).
        self.decoder: AttentionDecoder | DecoderEnsemble = build_decoder(
            config, vocab_size, self.encoder.feature_dim
        )

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.encoder.grid_size, self.encoder.grid_size)

    def forward(
        self,
        inputs: torch.Tensor,
        captions: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        from_stage: int | None = 0,
        samples: int = 0,
        max_length: int = 16,
        return_locations: bool = False,
    ):
        """The training pass, so that DistributedDataParallel sees every gradient.

        inputs: pixels (B, 3, S, S); with from_stage=K the activations entering encoder stage K
        (a stage cache's rows); with from_stage=None cached grids (B, L, D).
        samples=0: teacher forcing -> (logits, alphas). samples=S: S sampled captions per image
        -> decode_tensors' (tokens, log_probs, mask, alphas), for self-critical training.
        return_locations: teacher forcing also returns hard attention's cells (AttentionDecoder).
        """
        features = inputs if from_stage is None else self.encoder(inputs, from_stage)
        if samples:
            return decode_tensors(self.decoder, features, max_length, greedy=False, samples_per_image=samples)
        return self.decoder(features, captions, lengths, image_index, return_locations=return_locations)
