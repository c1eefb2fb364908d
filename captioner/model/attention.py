"""Attention over the annotation grid: one interface, two scoring functions, soft or hard.

Every module takes `(features (N, L, D), hidden (R, H))` (optionally precomputed keys, and a
bias (R, L) added to the scores, which steers attention: captioner.model.focus) and returns
`(context (R, D), alpha (R, L))`. R = N x W: each image's W rows (beam search's beams) are
consecutive and read its one grid, so a step reads each grid once, not once per beam (in
training W = 1). `prepare(features)` computes the part of the score that does not depend on the
hidden state, so the decoder can do it once per image, not per word.
Soft attention's context is the expectation sum_i alpha_i a_i; hard attention's is one a_i.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _attend(
    scores: torch.Tensor,  # (N, W, L)
    features: torch.Tensor,  # (N, L, D)
    bias: torch.Tensor | None,  # (R, L)
) -> tuple[torch.Tensor, torch.Tensor]:
    if bias is not None:
        scores = scores + bias.view(scores.shape)
    alpha = F.softmax(scores, dim=-1)  # (N, W, L)
    context = torch.bmm(alpha, features)  # (N, W, D)
    return context.flatten(0, 1), alpha.flatten(0, 1)


def _rows_by_image(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(R, X) -> (N, W, X): the rows grouped by the image (of N in keys) they belong to."""
    return rows.view(keys.shape[0], -1, rows.shape[-1])


class EnergyScore(nn.Linear):
    """v^T e + b for each cell's energy e: (..., L, A) -> (..., L).

    Computed as v^T E^T, not as nn.Linear's E v: onnxruntime runs that product three times
    faster (benchmarks: "The attention's scores as v^T E^T"). Its own class, so torch's dynamic
    int8 quantization, which swaps exactly nn.Linear, leaves it in float, as the int8 graph does.
    """

    def __init__(self, attention_dim: int):
        super().__init__(attention_dim, 1)

    def forward(self, energy: torch.Tensor) -> torch.Tensor:
        return (self.weight @ energy.transpose(-1, -2)).squeeze(-2) + self.bias


class AdditiveAttention(nn.Module):
    """Bahdanau attention, as in Xu et al. 2015: e = v^T tanh(W_f f + W_h h)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = EnergyScore(attention_dim)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, L, A)

    def forward(self, features, hidden, keys=None, bias=None):
        keys = self.prepare(features) if keys is None else keys  # (N, L, A)
        query = _rows_by_image(self.hidden_proj(hidden), keys)  # (N, W, A)
        energy = torch.tanh(keys.unsqueeze(1) + query.unsqueeze(2))  # (N, W, L, A)
        return _attend(self.score(energy), features, bias)


class MultiplicativeAttention(nn.Module):
    """Luong 'general' attention, scaled: e = f^T W h / sqrt(D)."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int | None = None):
        super().__init__()
        self.query_proj = nn.Linear(hidden_dim, feature_dim, bias=False)
        self.scale = 1.0 / math.sqrt(feature_dim)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        return features  # the keys are the annotation vectors themselves

    def forward(self, features, hidden, keys=None, bias=None):
        keys = features if keys is None else keys  # (N, L, D)
        query = _rows_by_image(self.query_proj(hidden), keys)  # (N, W, D)
        scores = torch.bmm(keys, query.transpose(1, 2)).transpose(1, 2) * self.scale  # (N, W, L)
        return _attend(scores, features, bias)


class HardAttention(AdditiveAttention):
    """Stochastic "hard" attention (Xu et al. 2015, section 4.1): the context is ONE annotation
    vector a_{s_t}, the location s_t drawn from Multinoulli(alpha_t).

    alpha comes from the additive scorer, under the same parameter names, so alpha maps compare
    with a soft model's. Which location the context comes from:
    - in train mode, "sample": s_t ~ alpha_t;
    - in eval mode, `decoding`: "argmax" (the most likely cell, the default) or "expectation"
      (the soft context sum_i alpha_i a_i; see `set_hard_decoding`);
    - `locating(mode)` overrides both for a block (training's expectation batches, SCST).
    After each call `location` holds the cells attended (R,), or None after an expectation.
    The REINFORCE baseline's running value lives here as buffers, so the run state (which saves
    the model's tensors) holds it and a killed run resumes exactly (captioner.training.hard_attention).
    """

    MODES = ("sample", "argmax", "expectation")
    DECODING_MODES = ("argmax", "expectation")
    reward_baseline: torch.Tensor  # buffers, registered in __init__
    baseline_updates: torch.Tensor

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__(feature_dim, hidden_dim, attention_dim)
        self.decoding = "argmax"
        self.forced_mode: str | None = None
        self.location: torch.Tensor | None = None
        self.register_buffer("reward_baseline", torch.zeros(()))  # b, in nats per caption
        self.register_buffer("baseline_updates", torch.zeros((), dtype=torch.long))

    @contextmanager
    def locating(self, mode: str) -> Iterator[None]:
        """Within the block every call uses `mode` ("sample", "argmax" or "expectation")."""
        if mode not in self.MODES:
            raise ValueError(f"hard attention mode {mode!r}: expected one of {', '.join(self.MODES)}")
        previous, self.forced_mode = self.forced_mode, mode
        try:
            yield
        finally:
            self.forced_mode = previous

    def forward(self, features, hidden, keys=None, bias=None):
        expected, alpha = super().forward(features, hidden, keys, bias)  # (R, D), (R, L)
        mode = self.forced_mode or ("sample" if self.training else self.decoding)
        if mode == "expectation":
            self.location = None
            return expected, alpha
        if mode == "sample":
            self.location = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (R,)
        else:
            self.location = alpha.argmax(dim=-1)
        images = torch.arange(len(hidden), device=features.device) // (len(hidden) // len(features))
        return features[images, self.location], alpha  # a_{s_t}: (R, D)


def set_hard_decoding(model: nn.Module, decoding: str) -> None:
    """How a hard-attention model (or ensemble) picks its context when captioning: "argmax"
    (the default: the most likely cell per word) or "expectation" (decode as a soft model)."""
    if decoding not in HardAttention.DECODING_MODES:
        raise ValueError(
            f"hard attention decoding {decoding!r}: expected one of {', '.join(HardAttention.DECODING_MODES)}"
        )
    modules = [m for m in model.modules() if isinstance(m, HardAttention)]
    if not modules:
        raise ValueError("set_hard_decoding: the model has no hard attention (its attention is soft)")
    for module in modules:
        module.decoding = decoding


Attention = AdditiveAttention | MultiplicativeAttention  # HardAttention is an AdditiveAttention
ATTENTION_TYPES: dict[str, type[Attention]] = {
    "additive": AdditiveAttention,
    "multiplicative": MultiplicativeAttention,
    "hard": HardAttention,
}


def build_attention(kind: str, feature_dim: int, hidden_dim: int, attention_dim: int) -> Attention:
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention type {kind!r}; choose from {sorted(ATTENTION_TYPES)}")
    return ATTENTION_TYPES[kind](feature_dim, hidden_dim, attention_dim)
