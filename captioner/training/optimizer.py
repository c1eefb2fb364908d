"""What updates the weights: Adam over the decoder (and the encoder stages being fine-tuned), and
the optional moving average of the weights that is validated and saved in their place."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.swa_utils import AveragedModel

from captioner.model.caption_model import CaptionModel
from captioner.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: CaptionModel, decoder_lr: float) -> torch.optim.Optimizer:
    """Adam with two parameter groups: the decoder's (group 0, whose rate the stage schedules)
    and, when fine-tuning, the trainable encoder stages' at cfg.encoder_lr."""
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": decoder_lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
    return torch.optim.Adam(groups)


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """The decay warms up as (1 + n) / (10 + n) (as timm's EMA does): with a fixed 0.999, the
    random initial weights would still weigh 0.999^375 = 69% after a 375-step epoch."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def make_average(cfg: TrainConfig, model: CaptionModel) -> AveragedModel | None:
    """EMA of the weights: a cheap ensemble over the last ~1/(1 - decay) steps, which scores
    better than the weights of the last step while the learning rate is still high."""
    if not cfg.ema_decay:
        return None

    def update(
        averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], num_averaged: torch.Tensor | int
    ) -> None:
        decay = ema_decay_at(cfg.ema_decay, int(num_averaged))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, 1 - decay)
            else:
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
