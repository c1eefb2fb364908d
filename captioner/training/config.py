"""One training run, as a plain dataclass saved in its run folder as train_config.json (no torch
here: the command line builds flags from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from captioner.data.config import DataConfig
from captioner.model.config import ModelConfig, check_number
from captioner.model.options import check_whole_number

# The checked settings: whole numbers and their least value (none allowed where OPTIONAL) ...
WHOLE_NUMBERS = {
    "min_word_count": 1,
    "max_caption_words": 1,
    "epochs": 1,
    "batch_size": 1,
    "warmup_steps": 0,
    "fine_tune_from": 0,
    "scst_epochs": 0,
    "scst_samples": 1,
    "scst_max_length": 1,
    "val_beam_size": 1,
    "val_max_length": 1,
    "patience": 1,
    "scst_patience": 1,
    "checkpoint_every": 1,
    "stop_after_step": 1,
    "seed": 0,
    "num_workers": 0,
}
OPTIONAL = {"fine_tune_from", "scst_patience", "stop_after_step"}
# ... and numbers: (least, least allowed, most, most allowed).
ABOVE_0, AT_LEAST_0 = (0.0, False, math.inf, True), (0.0, True, math.inf, True)
NUMBERS = {
    "lr": ABOVE_0,
    "encoder_lr": ABOVE_0,
    "scst_lr": ABOVE_0,
    "grad_clip": ABOVE_0,
    "alpha_reg": AT_LEAST_0,
    "scst_xe_weight": AT_LEAST_0,
    "min_lr_ratio": (0.0, True, 1.0, True),
    "ema_decay": (0.0, True, 1.0, False),
    "label_smoothing": (0.0, True, 1.0, False),
}


@dataclass
class TrainConfig:
    """One training run; every field is a `captioner train` flag, documented by its docstring."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "runs/default"
    """Where the run writes best/, its run state, metrics.jsonl and train_config.json."""
    cache_dir: str = "cache"
    """Where the frozen encoder's features are cached, to be reused by later runs."""
    min_word_count: int = 5
    """Words seen fewer times in the training captions become <unk>."""
    max_caption_words: int = 30
    """Longer training captions are truncated."""
    epochs: int = 20
    """Cross-entropy epochs (at most: early stopping may end sooner)."""
    batch_size: int = 32
    """Images per batch (batch_by image) or captions (batch_by caption)."""
    batch_by: Literal["image", "caption"] = "image"
    """image: each image with all its captions; caption: captions alone, shuffled across images
    (cross-entropy only: SCST always batches images)."""
    lr: float = 4e-4
    """Peak learning rate of the decoder (cross-entropy)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 5.0
    """Gradients are clipped to this global norm."""
    ema_decay: float = 0.0
    """Above 0: validate and save an exponential moving average of the weights."""
    alpha_reg: float = 1.0
    """Doubly stochastic attention regularisation (lambda)."""
    hard_baseline_decay: float = 0.9
    """Hard attention: the REINFORCE baseline's moving average, b <- decay b + (1 - decay) r."""
    hard_entropy_weight: float = 0.002
    """Hard attention: lambda_e, the weight of the attention distribution's entropy."""
    hard_expectation_probability: float = 0.5
    """Hard attention: the share of batches that use the expected (soft) context instead of a sample."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss (0: none)."""
    hflip: bool = False
    """Show each training photo mirrored in a random half of the epochs."""
    fine_tune_from: int | None = None
    """Train the encoder's stages from this index on (0: stem, then one per block group, last: the
    head); none: the encoder stays frozen. Batch norm keeps its ImageNet statistics."""
    fine_tune_inputs: Literal["cache", "photos"] = "cache"
    """With fine_tune_from K: cache: cache the activations entering stage K once (the stages
    below are frozen) and run only stages K.. each step; photos: run the whole encoder on the
    photos every step (for GPUs, or augmentations a cache cannot hold)."""
    encoder_lr: float = 1e-4
    """Learning rate of the encoder stages trained by fine_tune_from."""
    init_from: str | None = None
    """Start from the weights and vocabulary of this model folder (e.g. weights, or a run's
    best/), e.g. to fine-tune the encoder under a trained decoder; its architecture must match
    --model's (dropout may differ)."""
    scst_epochs: int = 0
    """Self-critical (SCST) epochs after cross-entropy."""
    scst_lr: float = 2e-5
    """Learning rate during SCST."""
    scst_samples: int = 5
    """Captions sampled per image in each SCST step (their mean reward is the baseline)."""
    scst_max_length: int = 16
    """Most words per sampled SCST caption."""
    scst_dropout: bool = True
    """Sample with dropout on (off: sample the test-time policy)."""
    scst_xe_weight: float = 0.0
    """SCST loss + this x cross-entropy on the references."""
    val_beam_size: int = 3
    """Beam size of the validation captions scored after each epoch."""
    val_max_length: int = 20
    """Most words per validation caption."""
    patience: int = 4
    """Epochs without a better validation CIDEr before a stage ends."""
    scst_patience: int | None = None
    """The same for SCST (none: patience); SCST often dips first."""
    checkpoint_every: int = 200
    """Save the run state every this many steps (and at the end of every epoch)."""
    stop_after_step: int | None = None
    """End this invocation after this step, run state saved (resume continues it): for jobs in
    time slices."""
    seed: int = 0
    """Seeds the weights' initialisation, batch order and dropout."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (none: cuda if available; under torchrun, each rank's own)."""
    amp: bool = True
    """Mixed precision on CUDA (ignored on CPU)."""
    num_workers: int = 2
    """Processes loading images (0: load them in the main process)."""
    resume: bool = False
    """Continue the run in output_dir from its last saved state."""
    overwrite: bool = False
    """Train into an output_dir that holds another run anyway: its run state, config, metrics and
    best/ are deleted first (without this or resume, such a folder is refused)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse settings that make no sense (ValueError naming the setting and its range), before
        any data is read: a bad one would otherwise fail after data preparation, or quietly train
        something else (a negative learning rate climbs the loss)."""
        for name, low in WHOLE_NUMBERS.items():
            if getattr(self, name) is not None or name not in OPTIONAL:
                check_whole_number(name, getattr(self, name), low)
        for name, (least, least_included, most, most_included) in NUMBERS.items():
            check_number(name, getattr(self, name), least, most, least_included, most_included)
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite: choose one (resume continues the run in output_dir, "
                "overwrite deletes it)"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """A run's config from its JSON form (train_config.json, or a --config file); older
        files' model settings are read by ModelConfig.from_saved."""
        raw = dict(raw)
        data = DataConfig(**raw.pop("data", {}))
        try:
            model = ModelConfig.from_saved(raw.pop("model", {}))
        except ValueError as err:  # "dropout must be ..." -> "model.dropout must be ..."
            raise ValueError(
                f"model.{err}" if str(err).split(" ")[0] in ModelConfig.__dataclass_fields__ else str(err)
            ) from None
        return cls(data=data, model=model, **raw)
