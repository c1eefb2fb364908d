"""Semantic attributes (issue #37 2c): fine-tune a decoder that reads the encoder's ImageNet label
distribution (ModelConfig.semantic_attributes) from cached (grid, evidence) pairs.

The encoder stays frozen, so each photo's grid (L, D) and ImageNet probabilities (1000,) are
computed once (`write_attribute_cache`, with the encode function the caller gives: the
Captioner's `encode_with_evidence`, which the serving layer owns) into an AttributeCache folder:
fp16 memory-mapped files plus a per-row done byte, so an interrupted pass resumes. Training then
reads only the cache; checkpoints are atomic and a rerun resumes from the last one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from captioner.data.readers.flickr import load_flickr
from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel
from captioner.model.folder import load_model, save_model
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.model.vocabulary import Vocabulary
from captioner.training.inputs import _truncate, caption_batch
from captioner.training.losses import caption_loss
from captioner.training.run_state import (
    BEST_FOLDER,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    Progress,
    load_run_state,
    read_progress,
    save_run_state,
)

EVIDENCE_CLASSES = 1000  # the ImageNet head's classes (captioner.model.evidence)
Encode = Callable[[list[Path]], tuple[torch.Tensor, torch.Tensor]]  # paths -> (B, L, D), (B, 1000)


class AttributeCache:
    """Per photo: its annotation grid (L, D) and ImageNet probabilities (1000,), fp16, memory-mapped.

    Files in `folder`: index.json (the photos' paths and the grid shape), grids.f16, evidence.f16
    and done.u8 (1 where a row is written and flushed)."""

    def __init__(self, folder: str | Path, mode: Literal["r", "r+"] = "r"):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.is_file():
            raise ValueError(f"{self.folder} is not an attribute cache (no index.json)")
        index = json.loads(index_file.read_text())
        self.paths = [Path(p) for p in index["paths"]]
        n, (cells, dim) = len(self.paths), index["grid_shape"]
        self.grids = np.memmap(self.folder / "grids.f16", np.float16, mode, shape=(n, cells, dim))
        self.evidence = np.memmap(self.folder / "evidence.f16", np.float16, mode, shape=(n, EVIDENCE_CLASSES))
        self.done = np.memmap(self.folder / "done.u8", np.uint8, mode, shape=(n,))

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self, index: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Grids (B, L, D) and evidence (B, 1000) of the rows `index`, as float32."""
        index = np.asarray(index)
        grids = torch.from_numpy(np.ascontiguousarray(self.grids[index])).float()
        return grids, torch.from_numpy(np.ascontiguousarray(self.evidence[index])).float()

    def check_complete(self) -> None:
        missing = int((np.asarray(self.done) == 0).sum())
        if missing:
            raise ValueError(f"attribute cache {self.folder}: {missing} of {len(self)} rows not written yet")


def create_attribute_cache(folder: str | Path, paths: Sequence[Path], grid_shape: tuple[int, int]) -> None:
    """Make the files of an empty cache for `paths` (a folder that already has one is kept)."""
    folder = Path(folder)
    if (folder / "index.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    n, (cells, dim) = len(paths), grid_shape
    for name, size in (
        ("grids.f16", n * cells * dim * 2),
        ("evidence.f16", n * EVIDENCE_CLASSES * 2),
        ("done.u8", n),
    ):
        with open(folder / name, "wb") as file:
            file.truncate(size)
    index = {"paths": [str(p) for p in paths], "grid_shape": list(grid_shape)}
    atomic_write(folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(index)))


def write_attribute_cache(
    folder: str | Path,
    paths: Sequence[Path],
    encode: Encode,
    grid_shape: tuple[int, int],
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> AttributeCache:
    """Fill the cache of `paths` with `encode`'s grids and evidence; rows already done are skipped
    (a rerun resumes)."""
    create_attribute_cache(folder, paths, grid_shape)
    cache = AttributeCache(folder, mode="r+")
    if [str(p) for p in cache.paths] != [str(p) for p in paths]:
        raise ValueError(f"attribute cache {folder} holds another list of photos")
    todo = [i for i in range(len(cache)) if not cache.done[i]]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        grids, evidence = encode([cache.paths[i] for i in rows])
        cache.grids[rows] = grids.to(torch.float16).cpu().numpy()
        cache.evidence[rows] = evidence.to(torch.float16).cpu().numpy()
        cache.grids.flush()
        cache.evidence.flush()
        cache.done[rows] = 1
        cache.done.flush()
        if progress is not None:
            progress(start + len(rows), len(todo))
    return cache


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class AttributeConfig:
    """A fine-tuning run of a model's decoder on cached (grid, evidence) pairs; every field is a
    flag of scripts/train_attributes.py."""

    init_from: str = "weights"
    """The model folder to start from (its encoder computed the caches)."""
    train_cache: str = ""
    """The AttributeCache of the training photos (scripts/cache_attributes.py)."""
    dev_cache: str = ""
    """The AttributeCache of the dev photos: each epoch is scored on them, the best kept."""
    flickr: str = ""
    """The Flickr8k folder: the captions of the cached photos."""
    output_dir: str = "runs/attributes"
    """The run folder: run state, metrics.jsonl, a model folder per epoch and best/."""
    semantic_attributes: bool = True
    """Off: the same fine-tuning without attributes (the control run)."""
    epochs: int = 3
    train_photos: int | None = None
    """Train on the cache's first this many photos only (none: all): to fit a time budget."""
    batch_size: int = 16
    """Photos per step, each with all its captions."""
    lr: float = 1e-4
    """Adam's learning rate for the decoder's trained weights."""
    attribute_lr: float = 1e-3
    """Adam's learning rate for attribute_proj, which starts from zero, not from trained values."""
    grad_clip: float = 5.0
    alpha_reg: float = 1.0
    label_smoothing: float = 0.1
    max_caption_words: int = 30
    checkpoint_every: int = 100
    """Steps between run-state saves (and one at every epoch's end)."""
    val_beam_size: int = 3
    seed: int = 0
    stop_after_step: int | None = None
    """Stop (with the run state saved) after this many steps: to test resuming."""


def caption_table(cache: AttributeCache, flickr: str | Path) -> list[list[str]]:
    """Per cache row, the captions of its photo in the Flickr8k folder (ValueError if it has none)."""
    dataset = load_flickr(flickr)
    captions = {str(item.path): item.captions for split in dataset.splits.values() for item in split}
    missing = [str(p) for p in cache.paths if str(p) not in captions]
    if missing:
        raise ValueError(f"flickr: {len(missing)} cached photos have no captions there, e.g. {missing[0]}")
    return [captions[str(p)] for p in cache.paths]


def start_model(cfg: AttributeConfig) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """The model to fine-tune: `init_from`, with the semantic_attributes option set as asked (a
    new attribute_proj starts at zero: the model then captions exactly as `init_from`)."""
    trained, vocab, config = load_model(cfg.init_from)
    model_config = replace(trained.config, semantic_attributes=cfg.semantic_attributes)
    model = CaptionModel(model_config, len(vocab), encoder_weights="random")
    missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
    if unexpected or any(not name.startswith("decoder.attribute_proj.") for name in missing):
        raise ValueError(f"init_from {cfg.init_from}: weights do not fit ({missing + unexpected})")
    model.encoder.requires_grad_(False)
    return model, vocab, config


def dev_scores(model: CaptionModel, vocab: Vocabulary, cache: AttributeCache, references, beam: int):
    """BLEU/ROUGE-L/CIDEr of beam-search captions of the dev cache (METEOR left out: slow)."""
    cache.check_complete()
    model.eval()
    options = DecodeOptions(beam, 20, length_penalty=0.0, n_best=1, no_repeat_ngram_size=0)
    predictions = {}
    for start in range(0, len(cache), 64):
        rows = list(range(start, min(start + 64, len(cache))))
        grids, evidence = cache.rows(rows)
        results = caption_features(
            model.decoder, vocab, grids, options, evidence=evidence, report_evidence=False
        )
        predictions.update({str(row): r.text for row, r in zip(rows, results, strict=True)})
    model.train()
    return score_captions(predictions, {str(i): references[i] for i in range(len(cache))}, meteor=False)


def train_step(model, optimizer, cfg: AttributeConfig, cache, encoded, rows: list[int]) -> float:
    """One cross-entropy step on the photos `rows` with all their captions; returns the loss."""
    grids, evidence = cache.rows(rows)
    captions, lengths, image_index = caption_batch([encoded[r] for r in rows])
    attributes = evidence if cfg.semantic_attributes else None
    logits, alphas = model.decoder(grids, captions, lengths, image_index, attributes=attributes)
    loss, _ = caption_loss(logits, captions, alphas, cfg.alpha_reg, cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.detach())


def make_optimizer(model: CaptionModel, cfg: AttributeConfig) -> torch.optim.Adam:
    """Adam over the decoder: attribute_proj at attribute_lr, the rest at lr."""
    named = list(model.decoder.named_parameters())
    new = [p for name, p in named if name.startswith("attribute_proj.")]
    groups = [{"params": [p for name, p in named if not name.startswith("attribute_proj.")], "lr": cfg.lr}]
    return torch.optim.Adam(groups + ([{"params": new, "lr": cfg.attribute_lr}] if new else []))


def epoch_order(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of an epoch: the same on every resume."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]


def fine_tune_attributes(cfg: AttributeConfig) -> dict[str, Any]:
    """Fine-tune the decoder of `cfg.init_from` (encoder frozen, cross-entropy) on the cached
    photos; scores every epoch on the dev cache, keeps each epoch's model folder and the best as
    best/; resumes from the run state in `output_dir`. Returns the best epoch and its scores."""
    folder = Path(cfg.output_dir)
    train, dev = AttributeCache(cfg.train_cache), AttributeCache(cfg.dev_cache)
    train.check_complete()  # the dev cache is checked when it is first read, at the epoch's end
    model, vocab, init_config = start_model(cfg)
    encoded = [
        [_truncate(vocab.encode(c), cfg.max_caption_words) for c in item]
        for item in caption_table(train, cfg.flickr)
    ]
    references = caption_table(dev, cfg.flickr)  # the photo list is written first: it is complete
    optimizer = make_optimizer(model, cfg)
    state, progress = folder / STATE_FILE, Progress()
    if state.is_file():
        load_run_state(state, model, optimizer)
        progress = read_progress(state)
        for group, lr in zip(optimizer.param_groups, (cfg.lr, cfg.attribute_lr), strict=False):
            group["lr"] = lr  # a resumed run may change its learning rates, as captioner train's
    else:
        torch.manual_seed(cfg.seed)
        config_text = json.dumps(asdict(cfg), indent=2)
        atomic_write(folder / TRAIN_CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
    model.train()
    started = time.perf_counter()
    while progress.epoch < cfg.epochs:
        photos = len(train) if cfg.train_photos is None else min(cfg.train_photos, len(train))
        batches = epoch_order(photos, cfg.batch_size, cfg.seed, progress.epoch)
        for rows in batches[progress.step_in_epoch :]:
            loss = train_step(model, optimizer, cfg, train, encoded, rows)
            progress.step_in_epoch, progress.global_step = (
                progress.step_in_epoch + 1,
                progress.global_step + 1,
            )
            if progress.global_step % 50 == 0:
                seconds = time.perf_counter() - started
                print(
                    json.dumps(
                        {"step": progress.global_step, "loss": round(loss, 4), "seconds": round(seconds)}
                    ),
                    flush=True,
                )
            if (
                progress.global_step % cfg.checkpoint_every == 0
                or progress.global_step == cfg.stop_after_step
            ):
                save_run_state(state, model, optimizer, vocab, progress)
            if progress.global_step == cfg.stop_after_step:
                return {"stopped_at_step": progress.global_step}
        finish_epoch(
            cfg,
            model,
            vocab,
            dev_scores(model, vocab, dev, references, cfg.val_beam_size),
            progress,
            init_config,
        )
        save_run_state(state, model, optimizer, vocab, progress)
    return {"best_epoch": progress.best_epoch, "best_CIDEr": progress.best_score}


def finish_epoch(cfg, model, vocab, scores: dict[str, float], progress: Progress, init_config) -> None:
    """Save the epoch's model folder (and best/ if it is the best by dev CIDEr) and log it."""
    label = f"epoch{progress.epoch + 1}"
    metadata = {**init_config.get("metadata", {}), "val_scores": scores, "epoch": label}
    metadata["attribute_training"] = asdict(cfg)
    folder = Path(cfg.output_dir)
    save_model(folder / label, model, vocab, metadata=metadata)
    if progress.record(scores["CIDEr"], label):
        save_model(folder / BEST_FOLDER, model, vocab, metadata=metadata)
    row = json.dumps({"epoch": label, **{k: round(v, 2) for k, v in scores.items()}})
    with open(folder / "metrics.jsonl", "a") as log:
        log.write(row + "\n")
    print(row, flush=True)
