"""What a training step reads: encoded captions, each epoch's batches, and the inputs of a batch
(cached annotation grids with a frozen encoder; cached activations or photos when the encoder's
last stages are fine-tuned)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from captioner.data.config import DataConfig
from captioner.data.datasets import ImageCaptions, load_dataset
from captioner.data.feature_cache import FeatureCache
from captioner.data.images import ImageFiles, LoadedImage, collate_images
from captioner.model.caption_model import CaptionModel
from captioner.model.vocabulary import Vocabulary, tokenize
from captioner.training.distributed import Dist

BATCH_BY = ("image", "caption")


@dataclass
class PreparedData:
    vocab: Vocabulary
    images: list[ImageCaptions]  # train images first, then validation images
    num_train: int
    encoded: list[list[list[int]]]  # per training image: its captions as ids

    @property
    def val_rows(self) -> range:
        return range(self.num_train, len(self.images))

    @cached_property
    def references(self) -> list[list[list[str]]]:
        """Per training image: its tokenised captions (SCST rewards). Made on first use only:
        at COCO scale they are ~600k lists of strings, which cross-entropy never reads."""
        return [[tokenize(c) for c in item.captions] for item in self.images[: self.num_train]]


def prepare_data(
    config: DataConfig, min_word_count: int, max_caption_words: int, vocab: Vocabulary | None = None
) -> PreparedData:
    """Read the dataset, build the vocabulary from the training split only, encode once."""
    dataset = load_dataset(config)
    train = dataset["train"]
    val = dataset.splits.get("val", [])[: config.max_val_images]
    vocab = vocab or Vocabulary.build(
        (c for item in train for c in item.captions), min_word_count, max_words=max_caption_words
    )  # the words training sees
    return PreparedData(vocab, train + val, len(train), encode_captions(train, vocab, max_caption_words))


def encode_captions(
    images: Sequence[ImageCaptions], vocab: Vocabulary, max_words: int
) -> list[list[list[int]]]:
    return [[_truncate(vocab.encode(c), max_words) for c in item.captions] for item in images]


def _truncate(ids: list[int], max_words: int) -> list[int]:
    return ids if len(ids) <= max_words + 2 else [*ids[: max_words + 1], Vocabulary.end_id]


def training_items(data: PreparedData, batch_by: str) -> list[tuple[int, list[list[int]]]]:
    """What an epoch shuffles and batches, as (image row, its captions' ids): every training
    image with all its captions, or every caption on its own (its image then recurs in 5
    different batches an epoch instead of once)."""
    if batch_by == "image":
        return list(enumerate(data.encoded))
    return [(row, [ids]) for row, captions in enumerate(data.encoded) for ids in captions]


def caption_batch(
    caption_lists: Sequence[list[list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The captions of a batch's items -> (captions (N, T), lengths (N,), image_index (N,)),
    where image_index says which item (input grid) each caption belongs to."""
    seqs, owner = [], []
    for i, captions in enumerate(caption_lists):
        for ids in captions:
            seqs.append(ids)
            owner.append(i)
    lengths = torch.tensor([len(s) for s in seqs])
    padded = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.tensor(s)
    return padded, lengths, torch.tensor(owner)


@dataclass
class StepBatch:
    """What one training step feeds the model: a batch's inputs, and its captions on the device."""

    rows: list[int]  # image rows of the batch's items
    inputs: torch.Tensor  # (B, L, D) cached grids, or what the encoder runs on from from_stage
    captions: torch.Tensor  # (N, T) <start> w1 .. wn <end> <pad>..
    lengths: torch.Tensor  # (N,)
    image_index: torch.Tensor  # (N,) the item (row of `inputs`) of each caption
    from_stage: int | None  # None: inputs are grids; K: activations entering encoder stage K (0: pixels)


def step_batch(
    rows: list[int],
    inputs: torch.Tensor,
    caption_lists: list[list[list[int]]],
    from_stage: int | None,
    device: torch.device,
) -> StepBatch:
    """A StepBatch of image rows, their inputs and each row's captions (ids)."""
    captions, lengths, image_index = caption_batch(caption_lists)
    return StepBatch(
        rows, inputs, captions.to(device), lengths.to(device), image_index.to(device), from_stage
    )


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, d: Dist) -> list[list[int]]:
    """This rank's batches of training-item indices for an epoch (the same on every resume).

    DistributedSampler hands rank r every world_size-th item of one shuffled order, so at
    equal global batch the ranks together see exactly the items one process would.
    """
    items: Any = range(num_items)  # any Sized will do
    sampler: DistributedSampler[int] = DistributedSampler(
        items, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    rows = list(sampler)
    local = max(1, batch_size // d.world_size)
    return [rows[i : i + local] for i in range(0, len(rows), local)]


def mirrored_rows(hflip: bool, seed: int, num_images: int, order_seed: int) -> np.ndarray | None:
    """Which training images are shown mirrored this epoch (about half): drawn per image from
    the seed and the epoch, so every rank and every resume agrees."""
    if not hflip:
        return None
    return np.random.default_rng([seed, order_seed]).random(num_images) < 0.5


FINE_TUNE_INPUTS = ("cache", "photos")


class Inputs:
    """The inputs of image rows, and where the model's encoder starts on them (`from_stage`):
    - frozen encoder: annotation grids from the feature cache (from_stage None);
    - encoder tuned from stage K, inputs "cache": the activations entering stage K, cached once
      (the frozen stages below K give every photo the same ones); the model runs stages K..;
    - inputs "photos": pixels every step, the whole encoder runs (from_stage 0; for GPUs, and
      for augmentations a cache cannot hold).
    """

    def __init__(
        self,
        model: CaptionModel,
        data: PreparedData,
        device: torch.device,
        cache_dir: str,
        hflip: bool,
        num_workers: int,
        d: Dist,
        progress: bool,
        fine_tune_inputs: str = "cache",
    ):
        self.device, self.num_workers = device, num_workers
        tuned_from = model.encoder.fine_tune_from
        if fine_tune_inputs not in FINE_TUNE_INPUTS:
            raise ValueError(
                f"fine_tune_inputs {fine_tune_inputs!r}: expected one of {', '.join(FINE_TUNE_INPUTS)}"
            )
        if tuned_from == 0 and fine_tune_inputs == "cache":
            raise ValueError(
                "fine_tune_from 0 tunes the whole encoder, so there is nothing to cache: "
                "use fine_tune_inputs photos"
            )
        paths = [i.path for i in data.images]
        self.cache = self.mirrored = None
        self.extract_stats: dict[str, Any] = {}
        if tuned_from is not None and fine_tune_inputs == "photos":  # row r + len(paths): r mirrored
            self.from_stage: int | None = 0
            mirror = transforms.Compose([TF.hflip, model.encoder.transform])
            self.photos: ConcatDataset[LoadedImage] = ConcatDataset(
                [ImageFiles(paths, model.encoder.transform), ImageFiles(paths, mirror)]
            )
            return
        self.from_stage = tuned_from
        extract: dict[str, Any] = dict(
            num_workers=num_workers,
            device=device,
            rank=d.rank,
            world_size=d.world_size,
            progress=progress and d.is_main,
        )
        self.cache = FeatureCache(cache_dir, model.encoder, paths, stage=tuned_from)
        self.extract_stats.update(self.cache.extract(**extract))
        if hflip:  # only training photos are ever shown mirrored
            self.mirrored = FeatureCache(
                cache_dir, model.encoder, paths[: data.num_train], mirrored=True, stage=tuned_from
            )
            self.extract_stats["mirrored"] = self.mirrored.extract(**extract)
        d.barrier()

    def batches(
        self, row_batches: list[list[int]], mirror: np.ndarray | None = None
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yields (rows, input tensor on the device) per batch of rows; rows r with mirror[r]
        come from the mirrored photo."""
        flags = [[bool(mirror is not None and mirror[r]) for r in rows] for rows in row_batches]
        if self.cache is None:
            yield from self._photo_batches(row_batches, flags)
            return
        for rows, flipped in zip(row_batches, flags, strict=True):
            if not any(flipped):
                yield rows, self.cache.batch(rows).to(self.device)
                continue
            x = torch.empty(len(rows), *self.cache.shape[1:])  # each row read from one cache only
            for source, mirrored in ((self.cache, False), (self.mirrored, True)):
                picked = [i for i, f in enumerate(flipped) if f == mirrored]
                if picked:
                    assert source is not None  # a mirrored row implies a mirrored cache
                    x[picked] = source.batch([rows[i] for i in picked])
            yield rows, x.to(self.device)

    def _photo_batches(self, row_batches: list[list[int]], flags: list[list[bool]]):
        # Own generator: drawing worker seeds from the global RNG would shift the dropout and
        # sampling streams, so a run resumed mid-epoch would no longer match an unbroken one.
        n = self.photos.cumulative_sizes[0]
        indices = [
            [r + n * f for r, f in zip(rows, flipped, strict=True)]
            for rows, flipped in zip(row_batches, flags, strict=True)
        ]
        loader = DataLoader(
            self.photos,
            batch_sampler=indices,
            num_workers=self.num_workers,
            collate_fn=collate_images,
            generator=torch.Generator(),
        )
        for rows, batch in zip(row_batches, loader, strict=True):
            batch.raise_errors()
            yield rows, batch.pixels.to(self.device)
