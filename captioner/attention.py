"""Soft attention over the annotation grid: one interface, two scoring functions.

Both modules take `(features (B, L, D), hidden (B, H))` (and optionally precomputed keys) and return
`(context (B, D), alpha (B, L))`. `prepare(features)` computes the part of the score that
does not depend on the hidden state, so the decoder can do it once per image, not per word.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _attend(scores: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = F.softmax(scores, dim=-1)  # (B, L)
    context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
    return context, alpha


class AdditiveAttention(nn.Module):
    """Bahdanau attention, as in Xu et al. 2015: e = v^T tanh(W_f f + W_h h)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, L, A)

    def forward(self, features, hidden, keys=None):
        keys = self.prepare(features) if keys is None else keys
        energy = torch.tanh(keys + self.hidden_proj(hidden).unsqueeze(1))  # (B, L, A)
        return _attend(self.score(energy).squeeze(-1), features)


class MultiplicativeAttention(nn.Module):
    """Luong 'general' attention, scaled: e = f^T W h / sqrt(D)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int | None = None):
        super().__init__()
        self.query_proj = nn.Linear(hidden_dim, feature_dim, bias=False)
        self.scale = 1.0 / math.sqrt(feature_dim)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return features  # the keys are the annotation vectors themselves

    def forward(self, features, hidden, keys=None):
        keys = features if keys is None else keys
        query = self.query_proj(hidden).unsqueeze(-1)  # (B, D, 1)
        scores = torch.bmm(keys, query).squeeze(-1) * self.scale  # (B, L)
        return _attend(scores, features)


ATTENTION_TYPES = {"additive": AdditiveAttention, "multiplicative": MultiplicativeAttention}


def build_attention(kind: str, feature_dim: int, hidden_dim: int, attention_dim: int) -> nn.Module:
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention type {kind!r}; choose from {sorted(ATTENTION_TYPES)}")
    return ATTENTION_TYPES[kind](feature_dim, hidden_dim, attention_dim)
