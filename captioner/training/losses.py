"""Training objectives: cross-entropy with doubly stochastic attention regularisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_loss(
    logits: torch.Tensor,  # (B, T-1, V) from AttentionDecoder.forward
    captions: torch.Tensor,  # (B, T)
    alphas: torch.Tensor,  # (B, T-1, L), zero past each caption's end
    alpha_reg: float = 1.0,
    label_smoothing: float = 0.0,
    pad_id: int = 0,
    token_count: float | None = None,
    caption_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token cross-entropy + lambda * mean_i (1 - sum_t alpha_ti)^2 (Xu et al. eq. 14).

    The regulariser pushes the model to look at every part of the image over the caption. It
    averages over the L cells instead of summing, so one lambda suits a 7x7 and a 14x14 grid.
    `token_count`/`caption_count` replace the local counts as denominators: under DDP, passing
    the global counts makes the averaged gradient equal to one big batch's.
    """
    targets = captions[:, 1 : logits.shape[1] + 1]
    xent_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    token_count = token_count or float((targets != pad_id).sum())
    caption_count = caption_count or captions.shape[0]
    xent = xent_sum / token_count
    attention_reg = ((1.0 - alphas.sum(dim=1)) ** 2).mean(dim=1).sum() / caption_count
    loss = xent + alpha_reg * attention_reg
    return loss, {"xent": xent.item(), "attention_reg": attention_reg.item()}
