"""The two training stages, as objects with one small interface: what an epoch batches
(`items`), how its order is drawn (`order_seed`), whether dropout is on, the learning rate of a
step, and `loss(batch)` -> (loss, what to log).

Cross-entropy: teacher forcing with the doubly stochastic attention penalty (Xu et al. eq. 14);
with hard attention, the sampled-location estimator of section 4.1 (captioner.training.hard_attention).
Self-critical (Rennie et al. 2017): sample captions, reward their CIDEr-D (captioner.training.scst).
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Protocol

import torch

from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist
from captioner.training.hard_attention import hard_attention_loss, location_log_probs, sampled_locations
from captioner.training.inputs import PreparedData, StepBatch, training_items
from captioner.training.losses import caption_loss
from captioner.training.scst import reward_scorer, scst_loss


class Stage(Protocol):
    name: str
    epochs: int
    patience: int
    lr: float  # the decoder's starting learning rate
    dropout: bool  # train with dropout on

    @property
    def items(self) -> list[tuple[int, list[list[int]]]]: ...  # see inputs.training_items

    def order_seed(self, epoch: int) -> int: ...
    def step_lr(self, global_step: int) -> float | None: ...
    def loss(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]: ...


class CrossEntropy:
    name = "xe"

    def __init__(
        self,
        cfg: TrainConfig,
        net: torch.nn.Module,
        data: PreparedData,
        d: Dist,
        device: torch.device,
        steps_per_epoch: int,
    ):
        self.cfg, self.net, self.dist, self.device = cfg, net, d, device
        self.epochs, self.patience, self.lr, self.dropout = cfg.epochs, cfg.patience, cfg.lr, True
        self.data = data
        self.total_steps = steps_per_epoch * cfg.epochs

    @cached_property
    def items(self) -> list[tuple[int, list[list[int]]]]:
        """Built on first use: SCST's mixed objective needs this stage's loss, not its batches."""
        return training_items(self.data, self.cfg.batch_by)

    def order_seed(self, epoch: int) -> int:
        return epoch

    def step_lr(self, global_step: int) -> float:
        """Linear warm-up, then cosine decay to lr * min_lr_ratio over the stage."""
        cfg = self.cfg
        if global_step < cfg.warmup_steps:
            return cfg.lr * (global_step + 1) / cfg.warmup_steps
        progress = min(1.0, (global_step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)

    def loss(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, caps = float((batch.lengths - 1).sum()), float(len(batch.lengths))
        if self.dist.world_size > 1:  # global denominators: DDP's gradient mean then equals one big batch
            tokens, caps = self.dist.all_sum([tokens, caps], self.device)
            tokens, caps = tokens / self.dist.world_size, caps / self.dist.world_size
        if self.cfg.model.attention == "hard":
            return hard_attention_loss(self.cfg, self.net, batch, self.dist, self.device, tokens, caps)
        logits, alphas = self.net(
            batch.inputs, batch.captions, batch.lengths, batch.image_index, from_stage=batch.from_stage
        )
        return caption_loss(
            logits,
            batch.captions,
            alphas,
            self.cfg.alpha_reg,
            self.cfg.label_smoothing,
            token_count=tokens,
            caption_count=caps,
        )


class SelfCritical:
    """Optionally mixed: loss = SCST + scst_xe_weight x cross-entropy on the references.
    With hard attention the locations are sampled too, and a sample's log-probability is that of
    its words plus that of its locations: both follow the caption's CIDEr-D advantage."""

    name = "scst"

    def __init__(
        self,
        cfg: TrainConfig,
        net: torch.nn.Module,
        data: PreparedData,
        d: Dist,
        device: torch.device,
        steps_per_epoch: int = 0,
    ):
        self.cfg, self.net, self.data = cfg, net, data
        self.epochs, self.lr, self.dropout = cfg.scst_epochs, cfg.scst_lr, cfg.scst_dropout
        self.patience = cfg.patience if cfg.scst_patience is None else cfg.scst_patience
        self.items = training_items(data, "image")  # rewards compare samples of one image
        self.cider = reward_scorer(data.references)
        self.cross_entropy = CrossEntropy(cfg, net, data, d, device, steps_per_epoch)

    def order_seed(self, epoch: int) -> int:
        return 1000 + epoch  # fresh orders, not the cross-entropy epochs' again

    def step_lr(self, global_step: int) -> None:
        return None  # constant

    def loss(self, batch: StepBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        with sampled_locations(self.net) as locations:
            tokens, log_probs, mask, alphas = self.net(
                batch.inputs,
                from_stage=batch.from_stage,
                samples=cfg.scst_samples,
                max_length=cfg.scst_max_length,
            )
        if locations is not None:
            log_probs = log_probs + location_log_probs(alphas, torch.stack(locations, 1))
        references = [self.data.references[r] for r in batch.rows]
        loss, stats = scst_loss(
            tokens, log_probs, mask, references, self.cider, self.data.vocab, cfg.scst_samples
        )
        if cfg.scst_xe_weight:  # mixed objective: stay close to the human captions
            xe, xe_stats = self.cross_entropy.loss(batch)
            loss = loss + cfg.scst_xe_weight * xe
            stats |= xe_stats
        return loss, stats


STAGES = {"xe": CrossEntropy, "scst": SelfCritical}
