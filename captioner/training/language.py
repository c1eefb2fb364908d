"""Teach the language side new words and sentence shapes from captions without photos (issue #37
(e); the recipe of Hendricks et al. 2016, "Deep Compositional Captioning": a text model, an image
model, and a combination trained on paired data).

Each step takes two batches:
- text: captions alone (e.g. COCO captions, whose photos we do not have), read by the decoder as
  a language model; the image is replaced by a NEUTRAL context, the mean annotation vector of the
  paired photos (one grid cell), so the words and sentence shapes ("a kitchen with a
  refrigerator") enter the prior the decoder has for an average photo;
- paired: Flickr8k photos (cached grids) with their captions, teacher forcing as in training,
  so that the image conditioning stays.
Only the language side trains: word embeddings, the LSTM, the deep output's L_h and the output
layer L_o. The visual path (encoder, annotation projection, attention, init_h/init_c, gate,
L_z) stays as trained on the paired data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from captioner.data.config import DataConfig
from captioner.data.datasets import load_dataset
from captioner.data.feature_cache import FeatureCache
from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel
from captioner.model.config import check_number
from captioner.model.decoder import AttentionDecoder
from captioner.model.folder import load_model, save_model
from captioner.model.options import check_whole_number
from captioner.model.vocabulary import Vocabulary
from captioner.training.inputs import caption_batch, encode_captions
from captioner.training.losses import caption_loss
from captioner.training.run_state import Progress, load_run_state, read_progress, save_run_state

CONFIG_FILE, STATE_FILE, METRICS_FILE, MODEL_DIR = (
    "language_config.json",
    "language_state.safetensors",
    "metrics.jsonl",
    "model",
)
# The decoder modules that learn language; everything else is the visual path and stays frozen.
LANGUAGE_MODULES = ("embedding", "lstm", "out_hidden", "classifier")
# Settings that may change when a run resumes (the rest must equal the saved config).
RESUMABLE = ("resume", "stop_after_step")


@dataclass
class LanguageConfig:
    """One language-training run, saved as language_config.json next to its state."""

    init_from: str = "weights"
    """Model folder to start from (e.g. one made by scripts/extend_vocabulary.py)."""
    text_captions: str = ""
    """COCO-format captions JSON (pycocotools layout) whose captions train the language side."""
    data: DataConfig = field(default_factory=DataConfig)
    """Paired data (photos + captions); its train split keeps the image conditioning."""
    output_dir: str = "runs/language"
    """Where language_config.json, the run state, metrics.jsonl and model/ go."""
    cache_dir: str = "cache"
    """The frozen encoder's feature cache of the paired photos."""
    paired_images: int | None = 2000
    """Use the first N photos of the paired train split (none: all)."""
    held_out_text: int = 500
    """Text captions kept out of training: the language-model loss is measured on them."""
    steps: int = 2000
    """Training steps (each: one text batch and one paired batch)."""
    batch_size: int = 32
    """Captions per text batch and per paired batch."""
    text_weight: float = 1.0
    """Loss = paired loss + text_weight x text loss."""
    lr: float = 1e-4
    """Peak learning rate (linear warm-up over 5% of the steps, then cosine to 10%)."""
    grad_clip: float = 5.0
    """Gradients are clipped to this global norm."""
    alpha_reg: float = 1.0
    """Doubly stochastic attention regularisation on the paired batches (as in training)."""
    max_caption_words: int = 30
    """Longer captions are truncated."""
    checkpoint_every: int = 200
    """Save the run state (and measure the held-out text loss) every this many steps."""
    stop_after_step: int | None = None
    """End this invocation after this step, state saved (resume continues it)."""
    seed: int = 0
    """Seeds the batches (each step's batch depends on seed and step only) and dropout."""
    resume: bool = False
    """Continue the run in output_dir from its saved state."""

    def check(self) -> None:
        """ValueError naming a setting that makes no sense."""
        if not self.text_captions:
            raise ValueError("text_captions must name a COCO-format captions JSON file")
        for name, low in (("steps", 1), ("batch_size", 1), ("max_caption_words", 1), ("checkpoint_every", 1)):
            check_whole_number(name, getattr(self, name), low)
        check_whole_number("held_out_text", self.held_out_text, 0)
        check_whole_number("seed", self.seed, 0)
        for name in ("paired_images", "stop_after_step"):
            if getattr(self, name) is not None:
                check_whole_number(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0.0, low_included=False)
        check_number("grad_clip", self.grad_clip, 0.0, low_included=False)
        check_number("text_weight", self.text_weight, 0.0)
        check_number("alpha_reg", self.alpha_reg, 0.0)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LanguageConfig:
        return cls(**{**values, "data": DataConfig(**values.get("data", {}))})


def read_text_captions(path: str | Path) -> list[str]:
    """The captions of a COCO-format annotation file (its images need not exist)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"text captions file {path} does not exist")
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
        captions = [a["caption"].strip() for a in annotations if isinstance(a.get("caption"), str)]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a COCO captions file (annotations with captions): {err!r}") from err
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"{path} holds no captions")
    return captions


def freeze_visual_path(decoder: AttentionDecoder) -> list[torch.nn.Parameter]:
    """Freeze everything but the language modules (LANGUAGE_MODULES); returns their parameters."""
    decoder.requires_grad_(False)
    trainable = []
    for name in LANGUAGE_MODULES:
        module = getattr(decoder, name, None)
        if module is not None:
            module.requires_grad_(True)
            trainable += list(module.parameters())
    return trainable


def text_loss(
    decoder: AttentionDecoder, neutral: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Mean token cross-entropy of captions (N, T) read with the neutral context (1, 1, D) as the
    image; `<unk>` targets do not count (the text has many words the vocabulary lacks)."""
    image_index = torch.zeros(len(captions), dtype=torch.long)
    logits, _ = decoder(neutral, captions, lengths, image_index)  # (N, T-1, V)
    targets = captions[:, 1 : logits.shape[1] + 1].clone()
    targets[targets == Vocabulary.unk_id] = Vocabulary.pad_id
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)


def encode_text(caption: str, vocab: Vocabulary, max_words: int) -> list[int]:
    """`<start> w1 .. wn <end>` ids of at most max_words words."""
    ids = vocab.encode(caption)
    return ids if len(ids) <= max_words + 2 else [*ids[: max_words + 1], vocab.end_id]


@dataclass
class LanguageData:
    text: list[list[int]]  # training text captions as ids
    held_out: list[list[int]]  # text captions only measured
    paired: list[list[list[int]]]  # per paired photo: its captions as ids
    cache: FeatureCache  # the paired photos' grids
    neutral: torch.Tensor  # (1, 1, D) the mean annotation vector of the paired photos


def prepare_language_data(cfg: LanguageConfig, model: CaptionModel, vocab: Vocabulary) -> LanguageData:
    """Encode the text and paired captions, extract the paired grids (once, cached) and their mean."""
    texts = read_text_captions(cfg.text_captions)
    order = np.random.default_rng(cfg.seed).permutation(len(texts))
    text = [encode_text(texts[i], vocab, cfg.max_caption_words) for i in order]
    held_out, text = text[: cfg.held_out_text], text[cfg.held_out_text :]
    if not text:
        raise ValueError(f"{cfg.text_captions}: no captions left to train on after held_out_text")
    images = load_dataset(cfg.data)["train"][: cfg.paired_images]
    cache = FeatureCache(cfg.cache_dir, model.encoder, [i.path for i in images])
    cache.extract(batch_size=16, num_workers=0, progress=True)
    sample = np.linspace(0, len(images) - 1, min(len(images), 500)).astype(int)
    neutral = cache.batch(sample.tolist()).mean(dim=(0, 1)).view(1, 1, -1)  # (1, 1, D)
    paired = encode_captions(images, vocab, cfg.max_caption_words)
    return LanguageData(text, held_out, paired, cache, neutral)


def step_batches(data: LanguageData, cfg: LanguageConfig, step: int):
    """The step's text batch and paired batch: drawn from (seed, step) alone, so a resumed run
    sees the same batches."""
    rng = np.random.default_rng([cfg.seed, step])
    text = [data.text[i] for i in rng.choice(len(data.text), cfg.batch_size)]
    pairs = [
        (int(i), data.paired[i][rng.integers(len(data.paired[i]))])
        for i in rng.choice(len(data.paired), cfg.batch_size)
    ]
    rows = sorted({i for i, _ in pairs})
    captions, lengths, _ = caption_batch([[ids] for _, ids in pairs])
    image_index = torch.tensor([rows.index(i) for i, _ in pairs])
    return caption_batch([[ids] for ids in text])[:2], (
        data.cache.batch(rows),
        captions,
        lengths,
        image_index,
    )


def learning_rate(cfg: LanguageConfig, step: int) -> float:
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_language(cfg: LanguageConfig, progress_every: int = 50) -> dict[str, Any]:
    """Run (or resume) language training; returns the last metrics. Writes the config,
    metrics.jsonl, the run state every checkpoint_every steps and, at the end, model/ (a model
    folder: load it with --model)."""
    cfg.check()
    out = Path(cfg.output_dir)
    model, vocab, _ = load_model(cfg.init_from)
    if not isinstance(model.decoder, AttentionDecoder):
        raise ValueError(f"{cfg.init_from} is an ensemble: language training takes one decoder")
    decoder = model.decoder
    trainable = freeze_visual_path(decoder)
    model.encoder.requires_grad_(False)
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
    progress = start_or_resume(cfg, out, model, optimizer)  # a resumed run restores the RNG streams
    if progress.global_step == 0:
        torch.manual_seed(cfg.seed)
    data = prepare_language_data(cfg, model, vocab)
    metrics: dict[str, Any] = {}
    last = cfg.steps if cfg.stop_after_step is None else min(cfg.steps, cfg.stop_after_step)
    started, sums = time.perf_counter(), np.zeros(2)
    for step in range(progress.global_step, last):
        decoder.train()
        sums += train_step(cfg, data, decoder, optimizer, step)
        progress.global_step = step + 1
        if progress.global_step % progress_every == 0 or progress.global_step == last:
            metrics = {"step": progress.global_step, "text_xent": sums[0] / max(1, step % progress_every + 1)}
            metrics |= {"paired_xent": sums[1] / max(1, step % progress_every + 1)}
            metrics |= {"lr": learning_rate(cfg, step), "seconds": round(time.perf_counter() - started, 1)}
            sums[:] = 0
            if progress.global_step % cfg.checkpoint_every == 0 or progress.global_step == last:
                metrics["held_out_text_xent"] = held_out_loss(decoder, data, cfg.batch_size)
                progress.done = progress.global_step >= cfg.steps
                save_run_state(out / STATE_FILE, model, optimizer, vocab, progress)
            with (out / METRICS_FILE).open("a") as log:
                log.write(json.dumps(metrics) + "\n")
            print(json.dumps(metrics), flush=True)
    if progress.global_step >= cfg.steps:
        save_language_model(cfg, model, vocab, progress.global_step)
    return metrics


def save_language_model(cfg: LanguageConfig, model: CaptionModel, vocab: Vocabulary, step: int) -> Path:
    """The run's model folder (output_dir/model), its settings and step in the metadata."""
    metadata = {"language_training": asdict(cfg), "steps": step, "init_from": cfg.init_from}
    return save_model(Path(cfg.output_dir) / MODEL_DIR, model.eval(), vocab, metadata=metadata)


def export_last_step(output_dir: str | Path) -> Path:
    """Save output_dir/model from the run's last saved state: for a run stopped before its end
    (the time budget ran out); the metadata says at which step."""
    out = Path(output_dir)
    cfg = LanguageConfig.from_dict(json.loads((out / CONFIG_FILE).read_text()))
    model, vocab, _ = load_model(cfg.init_from)
    optimizer = torch.optim.Adam(freeze_visual_path(model.decoder), lr=cfg.lr)  # type: ignore[arg-type]
    load_run_state(out / STATE_FILE, model, optimizer)
    return save_language_model(cfg, model, vocab, read_progress(out / STATE_FILE).global_step)


def start_or_resume(cfg: LanguageConfig, out: Path, model: CaptionModel, optimizer) -> Progress:
    """Save the config next to the state (a new run), or check it and restore the state (resume)."""
    config_path, state_path = out / CONFIG_FILE, out / STATE_FILE
    if not cfg.resume:
        if config_path.exists():
            raise ValueError(
                f"{out} already holds a language run: resume it (--resume) or pick another output_dir"
            )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(config_path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(cfg), indent=2)))
        return Progress(stage="language")
    if not state_path.is_file():
        raise ValueError(f"nothing to resume: {state_path} is missing")
    saved = json.loads(config_path.read_text())
    mine = asdict(cfg)
    changed = sorted(k for k in mine if k not in RESUMABLE and saved.get(k) != mine[k])
    if changed:
        raise ValueError(f"resume with the run's own settings ({config_path}); these differ: {changed}")
    load_run_state(state_path, model, optimizer)
    return read_progress(state_path)


def train_step(cfg: LanguageConfig, data: LanguageData, decoder: AttentionDecoder, optimizer, step: int):
    """One optimiser step on a text batch and a paired batch; returns their losses."""
    (text_captions, text_lengths), (grids, captions, lengths, image_index) = step_batches(data, cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    lm = text_loss(decoder, data.neutral, text_captions, text_lengths)
    logits, alphas = decoder(grids, captions, lengths, image_index)
    paired, _ = caption_loss(logits, captions, alphas, cfg.alpha_reg)
    optimizer.zero_grad(set_to_none=True)
    (paired + cfg.text_weight * lm).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return np.array([lm.item(), paired.item()])


@torch.no_grad()
def held_out_loss(decoder: AttentionDecoder, data: LanguageData, batch_size: int) -> float | None:
    """The language-model loss on the held-out text captions (dropout off)."""
    if not data.held_out:
        return None
    decoder.eval()
    total, count = 0.0, 0
    for start in range(0, len(data.held_out), batch_size):
        part = data.held_out[start : start + batch_size]
        captions, lengths, _ = caption_batch([[ids] for ids in part])
        total += float(text_loss(decoder, data.neutral, captions, lengths)) * len(part)
        count += len(part)
    decoder.train()
    return total / count
