"""Training: cross-entropy with teacher forcing, then optionally self-critical (SCST) fine-tuning.

One `TrainConfig` describes a run and is saved beside its checkpoints. The run state (model,
optimizer, epoch, step, RNG, best score) is one safetensors file written atomically every N
steps and every epoch, so `resume=True` continues exactly where a killed run left off. Under
torchrun it trains with DistributedDataParallel (nccl on GPUs, gloo on CPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import functional as TF
from tqdm import tqdm

from .checkpoint import atomic_write, save_model
from .configs import load_config_file
from .data import CaptionDataset, DatasetError, ImageCaptions, load_dataset
from .evaluation import best_captions, score_captions
from .features import FeatureCache
from .images import load_image
from .losses import caption_loss
from .model import CaptionModel, ModelConfig
from .scst import reward_scorer, scst_loss
from .vocabulary import Vocabulary, tokenize

STATE_FILE = "checkpoint.safetensors"


@dataclass
class DataConfig:
    kind: str = "flickr"  # flickr | coco | karpathy | pairs (see captioner.data.load_dataset)
    root: str | None = None  # flickr: the folder with the token file, split lists and images
    train: str | None = None  # coco / pairs: annotation file of the training split
    train_images: str | None = None
    val: str | None = None
    val_images: str | None = None
    split_json: str | None = None  # karpathy
    image_root: str | None = None  # karpathy / pairs
    skip_missing: bool = False  # drop (and warn about) captions whose image file is missing
    max_val_images: int | None = None  # validate on the first N images only (faster epochs)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "runs/default"
    cache_dir: str = "cache"
    min_word_count: int = 5
    max_caption_words: int = 30  # longer training captions are truncated
    epochs: int = 20  # cross-entropy epochs (at most: early stopping may end sooner)
    batch_size: int = 32  # images per batch (batch_by "image") or captions (batch_by "caption")
    batch_by: str = "image"  # "image": each image with all its captions; "caption": captions alone,
    #   shuffled across images (cross-entropy only: SCST always batches images)
    lr: float = 4e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 5.0
    ema_decay: float = 0.0  # > 0: validate and save an exponential moving average of the weights
    alpha_reg: float = 1.0  # doubly stochastic attention regularisation (lambda)
    label_smoothing: float = 0.0
    hflip: bool = False  # show each training photo mirrored in a random half of the epochs
    fine_tune_from: int | None = None  # train encoder stages from this index (no feature cache)
    encoder_lr: float = 1e-4
    scst_epochs: int = 0  # self-critical epochs after cross-entropy
    scst_lr: float = 2e-5
    scst_samples: int = 5
    scst_max_length: int = 16
    scst_dropout: bool = True  # sample with dropout on (False: sample the test-time policy)
    scst_xe_weight: float = 0.0  # SCST loss + this x cross-entropy on the references
    val_beam_size: int = 3
    val_max_length: int = 20
    patience: int = 4  # epochs without a better validation CIDEr before a stage ends
    scst_patience: int | None = None  # the same for SCST (None: `patience`); SCST often dips first
    checkpoint_every: int = 200  # steps
    seed: int = 0
    device: str | None = None
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    num_workers: int = 2
    resume: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        data = DataConfig(**raw.pop("data", {}))
        model = ModelConfig(**raw.pop("model", {}))
        return cls(data=data, model=model, **raw)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; pick this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        info = Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        return info, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Dist(), torch.device(chosen)


# ----------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    vocab: Vocabulary
    images: list[ImageCaptions]  # train images first, then validation images
    num_train: int
    encoded: list[list[list[int]]]  # per training image: its captions as ids
    references: list[list[list[str]]]  # per training image: tokenised captions (SCST rewards)

    @property
    def val_rows(self) -> range:
        return range(self.num_train, len(self.images))


def load_configured_dataset(d: DataConfig) -> CaptionDataset:
    paths = {
        "flickr": {"root": d.root},
        "karpathy": {"split_json": d.split_json, "image_root": d.image_root},
        "coco": {"train": d.train, "train_images": d.train_images, "val": d.val,
                 "val_images": d.val_images},
        "pairs": {"train": d.train, "val": d.val, "image_root": d.image_root},
    }.get(d.kind)
    if paths is None:
        raise DatasetError(f"unknown dataset kind {d.kind!r} (expected flickr, coco, karpathy, pairs)")
    return load_dataset(d.kind, skip_missing=d.skip_missing, **paths)


def prepare_data(cfg: TrainConfig, vocab: Vocabulary | None = None) -> PreparedData:
    """Read the dataset, build the vocabulary from the training split only, encode once."""
    d = cfg.data
    dataset = load_configured_dataset(d)
    train = dataset["train"]
    val = dataset.splits.get("val", [])[: d.max_val_images]
    vocab = vocab or Vocabulary.build((c for item in train for c in item.captions), cfg.min_word_count)
    limit = cfg.max_caption_words
    encoded = [[_truncate(vocab.encode(c), limit) for c in item.captions] for item in train]
    references = [[tokenize(c) for c in item.captions] for item in train]
    return PreparedData(vocab, train + val, len(train), encoded, references)


def _truncate(ids: list[int], max_words: int) -> list[int]:
    return ids if len(ids) <= max_words + 2 else [*ids[: max_words + 1], Vocabulary.end_id]


BATCH_BY = ("image", "caption")


def training_items(data: PreparedData, batch_by: str) -> list[tuple[int, list[list[int]]]]:
    """What an epoch shuffles and batches, as (image row, its captions' ids): every training
    image with all its captions, or every caption on its own (its image then recurs in 5
    different batches an epoch instead of once)."""
    if batch_by == "image":
        return list(enumerate(data.encoded))
    return [(row, [ids]) for row, captions in enumerate(data.encoded) for ids in captions]


def caption_batch(caption_lists: list[list[list[int]]]):
    """The captions of a batch's items -> (captions (N, T), lengths (N,), image_index (N,)),
    where image_index says which item (input grid) each caption belongs to."""
    seqs, owner = [], []
    for i, captions in enumerate(caption_lists):
        for ids in captions:
            seqs.append(ids)
            owner.append(i)
    lengths = torch.tensor([len(s) for s in seqs])
    captions = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        captions[i, : len(s)] = torch.tensor(s)
    return captions, lengths, torch.tensor(owner)


class _PixelRows(Dataset):
    """Images by row, for training with a fine-tuned encoder (no cache). Index row + N is
    image `row` mirrored."""

    def __init__(self, images: list[ImageCaptions], transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return 2 * len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        mirrored, row = divmod(index, len(self.images))
        image = load_image(self.images[row].path)
        return self.transform(TF.hflip(image) if mirrored else image)


class Inputs:
    """Gives the annotation grids (or pixels, when fine-tuning the encoder) of image rows."""

    def __init__(self, cfg: TrainConfig, model: CaptionModel, data: PreparedData, dist_info: Dist,
                 device: torch.device):
        self.model, self.device = model, device
        self.fine_tune = cfg.fine_tune_from is not None
        self.num_workers = cfg.num_workers
        self.pixels = _PixelRows(data.images, model.encoder.transform)
        self.cache = self.mirrored = None
        if not self.fine_tune:
            extract = dict(num_workers=cfg.num_workers, device=device, rank=dist_info.rank,
                           world_size=dist_info.world_size, progress=cfg.progress and dist_info.is_main)
            self.cache = FeatureCache(cfg.cache_dir, model.encoder, [i.path for i in data.images])
            self.extract_stats = self.cache.extract(**extract)
            if cfg.hflip:  # only training photos are ever shown mirrored
                self.mirrored = FeatureCache(cfg.cache_dir, model.encoder,
                                             [i.path for i in data.images[: data.num_train]], mirrored=True)
                self.extract_stats["mirrored"] = self.mirrored.extract(**extract)
            if dist_info.world_size > 1:
                dist.barrier()

    def batches(self, row_batches: list[list[int]], mirror: np.ndarray | None = None):
        """Yields (rows, input tensor on device) for each batch of rows; rows r with mirror[r]
        come from the mirrored photo."""
        flags = [[bool(mirror is not None and mirror[r]) for r in rows] for rows in row_batches]
        if self.cache is not None:
            for rows, flipped in zip(row_batches, flags, strict=True):
                if not any(flipped):
                    yield rows, self.cache.batch(rows).to(self.device)
                    continue
                x = torch.empty(len(rows), *self.cache.shape[1:])  # each row read from one cache only
                for source, mirrored in ((self.cache, False), (self.mirrored, True)):
                    picked = [i for i, f in enumerate(flipped) if f == mirrored]
                    if picked:
                        x[picked] = source.batch([rows[i] for i in picked])
                yield rows, x.to(self.device)
            return
        # Own generator: drawing worker seeds from the global RNG would shift the dropout and
        # sampling streams, so a run resumed mid-epoch would no longer match an unbroken one.
        n = len(self.pixels.images)
        indices = [[r + n * f for r, f in zip(rows, flipped, strict=True)]
                   for rows, flipped in zip(row_batches, flags, strict=True)]
        loader = DataLoader(self.pixels, batch_sampler=indices, num_workers=self.num_workers,
                            generator=torch.Generator())
        for rows, pixels in zip(row_batches, loader, strict=True):
            yield rows, pixels.to(self.device)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(inputs) if self.fine_tune else inputs

    @property
    def encode(self) -> bool:
        """Whether the model must run the encoder on these inputs (pixels) or not (grids)."""
        return self.fine_tune


def mirrored_rows(cfg: TrainConfig, num_images: int, order_seed: int) -> np.ndarray | None:
    """Which training images are shown mirrored this epoch (about half): drawn per image from
    the seed and the epoch, so every rank and every resume agrees."""
    if not cfg.hflip:
        return None
    return np.random.default_rng([cfg.seed, order_seed]).random(num_images) < 0.5


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, d: Dist) -> list[list[int]]:
    """This rank's batches of training-item indices for an epoch (the same on every resume).

    DistributedSampler hands rank r every world_size-th item of one shuffled order, so at
    equal global batch the ranks together see exactly the items one process would.
    """
    sampler = DistributedSampler(range(num_items), num_replicas=d.world_size, rank=d.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    rows = list(sampler)
    local = max(1, batch_size // d.world_size)
    return [rows[i : i + local] for i in range(0, len(rows), local)]


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_captions(model: CaptionModel, inputs: Inputs, rows: list[int], vocab: Vocabulary,
                      beam_size: int, max_length: int, batch_size: int = 64) -> dict[int, str]:
    """Real beam-search captions (never teacher-forced outputs) for image rows."""
    was_training = model.training
    model.eval()
    out = {}
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch_rows, x in inputs.batches(batches):
        texts = best_captions(model, inputs.features(x), vocab, beam_size, max_length)
        out.update(zip(batch_rows, texts, strict=True))
    model.train(was_training)
    return out


def validate(model, inputs: Inputs, data: PreparedData, cfg: TrainConfig, d: Dist,
             meteor: bool = False) -> tuple[dict[str, float], dict[int, str]]:
    """Caption the validation images (sharded across ranks) and score them on rank 0."""
    rows = list(data.val_rows)[d.rank :: d.world_size]
    captions = generate_captions(model, inputs, rows, data.vocab, cfg.val_beam_size, cfg.val_max_length)
    if d.world_size > 1:
        gathered: list[dict[int, str]] = [{} for _ in range(d.world_size)]
        dist.all_gather_object(gathered, captions)
        captions = {k: v for part in gathered for k, v in part.items()}
    metrics: dict[str, float] = {}
    if d.is_main:
        predictions = {data.images[r].image_id: c for r, c in captions.items()}
        references = {data.images[r].image_id: data.images[r].captions for r in captions}
        metrics = score_captions(predictions, references, meteor=meteor)
    if d.world_size > 1:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics, captions


# ----------------------------------------------------------------------------- run state


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_run_state(path: Path, model: CaptionModel, optimizer, vocab: Vocabulary,
                   progress: dict[str, Any], average: AveragedModel | None = None) -> None:
    """Model (+ its moving average) + optimizer + RNG + progress in one safetensors file,
    replaced atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if average is not None:
        tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in average.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"progress": progress, "optimizer": opt_meta, "vocabulary": vocab.to_json(),
            "python_rng": random.getstate()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"state": json.dumps(meta)}))


def load_run_state(path: Path, model: CaptionModel, optimizer,
                   average: AveragedModel | None = None) -> dict[str, Any]:
    meta = _run_metadata(path)
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        saved = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not saved:
            raise ValueError(f"{path} holds no moving average of the weights, but ema_decay is set: "
                             "resume with the run's own train_config.json")
        average.load_state_dict(saved)
    _optimizer_from_tensors(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, state, gauss = meta["python_rng"]
    random.setstate((version, tuple(state), gauss))
    return meta["progress"]


def last_step_model(run_dir: str | Path, averaged: bool = False
                    ) -> tuple[CaptionModel, Vocabulary, TrainConfig]:
    """The model of a run's last saved step: its raw weights (or, with `averaged`, their moving
    average), which need not be best/'s. With a cosine schedule the last step can score as well."""
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{state_path} does not exist: not a training run folder")
    cfg = TrainConfig.from_dict(load_config_file(run_dir / "train_config.json"))
    vocab = read_run_vocabulary(state_path)
    prefix = "ema.module." if averaged else "model."
    saved = load_file(str(state_path))
    tensors = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    if averaged and not tensors:
        raise ValueError(f"{state_path} holds no moving average of the weights (ema_decay was 0)")
    model = CaptionModel(cfg.model, len(vocab), encoder_weights="random")  # the state holds all weights
    model.load_state_dict(tensors)
    return model.eval(), vocab, cfg


def read_run_vocabulary(path: Path) -> Vocabulary:
    return Vocabulary(_run_metadata(path)["vocabulary"])


def _run_metadata(path: Path) -> dict[str, Any]:
    """The JSON part of a run state: progress, optimizer settings, vocabulary, RNG."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["state"])


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """Per-epoch metrics as JSON lines, CSV and a PNG plot (rank 0 only)."""

    def __init__(self, folder: Path):
        self.jsonl, self.csv = folder / "metrics.jsonl", folder / "metrics.csv"
        self.png = folder / "metrics.png"

    def rows(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict[str, Any]) -> None:
        rows = [r for r in self.rows() if (r["stage"], r["epoch"]) != (row["stage"], row["epoch"])]
        rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.jsonl, lambda tmp: Path(tmp).write_text(text))
        keys = list(dict.fromkeys(k for r in rows for k in r))

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.csv, write_csv)
        self._plot(rows)

    def _plot(self, rows: list[dict[str, Any]]) -> None:
        from matplotlib.figure import Figure

        x = list(range(1, len(rows) + 1))
        fig = Figure(figsize=(10, 4), layout="constrained")
        loss_ax, score_ax = fig.subplots(1, 2)
        for key, label in (("train_loss", "train loss (xent + reg)"), ("reward", "SCST reward")):
            pts = [(i, r[key]) for i, r in zip(x, rows, strict=True) if r.get(key) is not None]
            if pts:
                loss_ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        loss_ax.set_xlabel("epoch")
        loss_ax.legend()
        for key in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L"):
            pts = [(i, r[key]) for i, r in zip(x, rows, strict=True) if r.get(key) is not None]
            if pts:
                score_ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        score_ax.set_xlabel("epoch")
        score_ax.set_title("validation (beam search)")
        if score_ax.lines:
            score_ax.legend()
        atomic_write(self.png, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


# ----------------------------------------------------------------------------- training


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio over the cross-entropy stage."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _make_optimizer(cfg: TrainConfig, model: CaptionModel, stage: str) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad],
               "lr": cfg.lr if stage == "xe" else cfg.scst_lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
    return torch.optim.Adam(groups)


def ema_decay_at(decay: float, num_averaged: int) -> float:
    """The decay warms up as (1 + n) / (10 + n) (as timm's EMA does): with a fixed 0.999, the
    random initial weights would still weigh 0.999^375 = 69% after a 375-step epoch."""
    return min(decay, (1 + num_averaged) / (10 + num_averaged))


def _make_average(cfg: TrainConfig, model: CaptionModel) -> AveragedModel | None:
    """EMA of the weights: a cheap ensemble over the last ~1/(1 - decay) steps, which scores
    better than the weights of the last step while the learning rate is still high."""
    if not cfg.ema_decay:
        return None

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        decay = ema_decay_at(cfg.ema_decay, int(num_averaged))
        for a, c in zip(averaged, current, strict=True):
            if a.is_floating_point():
                a.lerp_(c, 1 - decay)
            else:
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run. Returns a summary with the best validation scores."""
    if cfg.batch_by not in BATCH_BY:
        raise ValueError(f"batch_by {cfg.batch_by!r}: expected one of {', '.join(BATCH_BY)}")
    if cfg.model.decoders != 1:
        raise ValueError(f"model.decoders {cfg.model.decoders}: an ensemble is not trained; train "
                         "each member alone and combine them with scripts/export_model.py")
    d, device = setup_distributed(cfg.device)
    out = Path(cfg.output_dir)
    state_path = out / STATE_FILE
    resuming = cfg.resume and state_path.exists()
    if cfg.resume and not state_path.exists() and d.is_main:
        print(f"--resume: no {state_path} yet, starting a new run")
    seed_everything(cfg.seed)
    vocab = read_run_vocabulary(state_path) if resuming else None
    data = prepare_data(cfg, vocab)
    model = CaptionModel(cfg.model, len(data.vocab)).to(device)
    model.encoder.set_trainable(cfg.fine_tune_from)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob(".*.tmp"), *out.glob("best/.*.tmp")]:  # from a killed atomic_write
            stale.unlink(missing_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    inputs = Inputs(cfg, model, data, d, device)

    progress = {"stage": "xe", "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_score": None,
                "best_epoch": None, "bad_epochs": 0, "done": False}
    optimizer = _make_optimizer(cfg, model, "xe")
    average = _make_average(cfg, model)
    if resuming:
        if _peek_stage(state_path) == "scst":
            optimizer = _make_optimizer(cfg, model, "scst")
        progress = load_run_state(state_path, model, optimizer, average)
        if d.is_main:
            print(f"resumed {state_path}: stage {progress['stage']} epoch {progress['epoch']} "
                  f"step {progress['step_in_epoch']}")
    cider = reward_scorer(data.references) if cfg.scst_epochs else None
    net = model  # what the training pass calls: the model itself, or its DDP wrapper
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log = MetricsLog(out)
    items = {"xe": training_items(data, cfg.batch_by), "scst": training_items(data, "image")}
    steps_per_epoch = len(epoch_batches(len(items["xe"]), cfg.batch_size, cfg.seed, 0, d))
    total_xe_steps = steps_per_epoch * cfg.epochs

    def checkpoint(sums: dict[str, float] | None = None, seconds: float = 0.0) -> None:
        """Called by every rank at the same steps. Mid-epoch, `sums` (this rank's running loss
        sums) are saved summed over ranks, so a resumed epoch logs the metrics of a whole one."""
        if sums is not None:
            progress.update(epoch_sums=_sum_over_ranks(sums, d, device), epoch_seconds=seconds)
        if d.is_main:
            save_run_state(state_path, model, optimizer, data.vocab, progress, average)

    while not progress["done"]:
        stage, epoch = progress["stage"], progress["epoch"]
        stage_epochs = cfg.epochs if stage == "xe" else cfg.scst_epochs
        patience = cfg.patience if stage == "xe" or cfg.scst_patience is None else cfg.scst_patience
        if epoch >= stage_epochs or progress["bad_epochs"] >= patience:
            if stage == "xe" and cfg.scst_epochs > 0:
                _load_best(model, out, d)
                optimizer = _make_optimizer(cfg, model, "scst")
                average = _make_average(cfg, model)  # SCST averages its own weights
                progress.update(stage="scst", epoch=0, step_in_epoch=0, bad_epochs=0)
                checkpoint()
                continue
            progress["done"] = True
            checkpoint()
            break
        order_seed = epoch if stage == "xe" else 1000 + epoch  # SCST epochs get fresh orders
        batches = epoch_batches(len(items[stage]), cfg.batch_size, cfg.seed, order_seed, d)
        model.train(stage == "xe" or cfg.scst_dropout)
        # Running sums of this epoch: resumed mid-epoch, rank 0 restarts from the saved totals
        # of all ranks and the other ranks from zero.
        saved = progress.get("epoch_sums") or {}
        sums = {"loss": 0.0, "n": 0.0, "captions": 0.0,
                **{k: v if d.is_main else 0.0 for k, v in saved.items()}}
        start = time.perf_counter() - (progress.get("epoch_seconds") or 0.0)
        bar = tqdm(total=len(batches), initial=progress["step_in_epoch"], desc=f"{stage} epoch {epoch + 1}",
                   disable=not (cfg.progress and d.is_main))
        mirror = mirrored_rows(cfg, data.num_train, order_seed)
        todo, stage_items = batches[progress["step_in_epoch"] :], items[stage]
        row_batches = [[stage_items[i][0] for i in batch] for batch in todo]
        for batch, (rows, x) in zip(todo, inputs.batches(row_batches, mirror), strict=True):
            if stage == "xe":
                for group in optimizer.param_groups[:1]:
                    group["lr"] = lr_at(cfg, progress["global_step"], total_xe_steps)
            captions, lengths, image_index = caption_batch([stage_items[i][1] for i in batch])
            teacher_forcing = (net, x, captions.to(device), lengths.to(device), image_index.to(device),
                               inputs.encode, cfg, d, device)
            with torch.autocast(device.type, enabled=use_amp):
                if stage == "xe":
                    loss, stats = _xe_loss(*teacher_forcing)
                else:
                    tokens, log_probs, mask, _ = net(x, encode=inputs.encode, samples=cfg.scst_samples,
                                                     max_length=cfg.scst_max_length)
                    loss, stats = scst_loss(tokens, log_probs, mask, [data.references[r] for r in rows],
                                            cider, data.vocab, cfg.scst_samples)
                    if cfg.scst_xe_weight:  # mixed objective: stay close to the human captions
                        xe, xe_stats = _xe_loss(*teacher_forcing)
                        loss = loss + cfg.scst_xe_weight * xe
                        stats |= xe_stats
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update_parameters(model)
            sums["captions"] += len(captions)
            sums["loss"] += loss.item()
            sums["n"] += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            progress["step_in_epoch"] += 1
            progress["global_step"] += 1
            speed = sums["captions"] / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.3f}", captions_per_s=f"{speed:.0f}")
            bar.update(1)
            if progress["global_step"] % cfg.checkpoint_every == 0:
                checkpoint(sums, time.perf_counter() - start)
        bar.close()
        seconds = time.perf_counter() - start
        totals = _sum_over_ranks(sums, d, device)
        evaluated = model if average is None else average.module  # what is validated and saved
        metrics, _ = validate(evaluated, inputs, data, cfg, d) if data.val_rows else ({}, {})
        row = {"stage": stage, "epoch": epoch + 1, "train_loss": totals["loss"] / max(totals["n"], 1),
               "reward": totals["reward"] / totals["n"] if "reward" in totals else None,
               "captions_per_second": totals["captions"] / seconds, "epoch_seconds": seconds,
               "lr": optimizer.param_groups[0]["lr"], **metrics}
        score = metrics.get("CIDEr", -row["train_loss"])
        if progress["best_score"] is None or score > progress["best_score"]:
            progress.update(best_score=score, best_epoch=f"{stage}-{epoch + 1}", bad_epochs=0)
            if d.is_main:
                save_model(out / "best", evaluated, data.vocab, metadata={
                    "val_scores": metrics, "epoch": f"{stage}-{epoch + 1}", "train_config": asdict(cfg)})
        else:
            progress["bad_epochs"] += 1
        progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_sums=None, epoch_seconds=0.0)
        if d.is_main:
            log.append(row)
            print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}))
        checkpoint()
    summary = {"best_score": progress["best_score"], "best_epoch": progress["best_epoch"],
               "output_dir": str(out), "vocab_size": len(data.vocab)}
    if inputs.cache is not None:
        summary["feature_extraction"] = inputs.extract_stats
    return summary


def _sum_over_ranks(sums: dict[str, float], d: Dist, device) -> dict[str, float]:
    keys = sorted(sums)  # the same keys on every rank: all ranks run the same steps
    return dict(zip(keys, d.all_sum([float(sums[k]) for k in keys], device), strict=True))


def _peek_stage(path: Path) -> str:
    return _run_metadata(path)["progress"]["stage"]


def _load_best(model: CaptionModel, out: Path, d: Dist) -> None:
    """Start SCST from the best cross-entropy weights."""
    if d.world_size > 1:
        dist.barrier()
    best = load_file(str(out / "best" / "model.safetensors"))
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in best.items()})


def _xe_loss(net, x, captions, lengths, image_index, encode: bool, cfg: TrainConfig, d: Dist, device):
    logits, alphas = net(x, captions, lengths, image_index, encode=encode)
    tokens, caps = float((lengths - 1).sum()), float(len(lengths))
    if d.world_size > 1:  # global denominators: DDP's gradient mean then equals one big batch
        tokens, caps = d.all_sum([tokens, caps], device)
        tokens, caps = tokens / d.world_size, caps / d.world_size
    return caption_loss(logits, captions, alphas, cfg.alpha_reg, cfg.label_smoothing,
                        token_count=tokens, caption_count=caps)
