"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D of sampled captions.

The baseline is the mean reward of the other samples of the same image (Luo 2020), so no extra
greedy decode is needed and the advantage is zero-mean per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .cider import CiderD
from .vocabulary import Vocabulary


def scst_loss(
    tokens: torch.Tensor,  # (B*S, T) sampled captions, from decode_tensors(greedy=False)
    log_probs: torch.Tensor,  # (B*S, T) their log-probabilities, with the autograd graph
    mask: torch.Tensor,  # (B*S, T)
    references: Sequence[Sequence[Sequence[str]]],  # per image: its tokenised references
    cider: CiderD,
    vocab: Vocabulary,
    samples: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss -(r - b) log p(w) over `samples` sampled captions per image."""
    if samples < 2:
        raise ValueError("SCST with a mean-of-others baseline needs at least 2 samples per image")
    words = [vocab.decode(seq) for seq in tokens.tolist()]
    refs = [references[i // samples] for i in range(len(words))]
    rewards = cider.scores(words, refs).reshape(-1, samples)  # (B, S)
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (samples - 1)
    advantage = torch.as_tensor((rewards - baseline).reshape(-1), dtype=log_probs.dtype,
                                device=log_probs.device)
    mask = mask.to(log_probs.dtype)
    loss = -(advantage.unsqueeze(1) * log_probs * mask).sum() / mask.sum()
    return loss, {"reward": float(np.mean(rewards)), "scst_loss": loss.item()}
