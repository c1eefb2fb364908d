"""Feature cache: with a frozen encoder, each image's annotation grid is computed once.

The grids live in one fp16 memory-mapped file per (encoder, image list), so a COCO-sized cache
(123k x 49 x 1280 fp16 = 15 GB) never has to fit in RAM. Extraction is resumable: a per-row
"done" byte is set only after the row is flushed, and a rerun computes just the missing rows.
Under torchrun every rank extracts its own share of rows. A new image list first copies the
rows it shares with the encoder's other caches (the dev half of a train+dev cache, a run with a
different `max_val_images`), so each image goes through the encoder once. Creating a cache
holds a file lock, so two processes started together do not truncate each other's files.

The files get all their disk blocks before rows are written (captioner.files.reserve_space): a
memory-mapped write into a sparse file on a full disk would kill the process with SIGBUS, no
message. A file of the wrong size (a truncated copy) or a folder that cannot be written is a
FeatureCacheError that names the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm import tqdm

from captioner.data.images import ImageBatch, ImageFiles, collate_images
from captioner.files import DiskFullError, atomic_write, exclusive_lock, reserve_space
from captioner.model.encoder import Encoder
from captioner.model.onnx_encoder import runtime_encoder


def encoder_key(encoder: Encoder, mirrored: bool = False, stage: int | None = None) -> str:
    """Names what determines the cached tensors: backbone, input size, grid (or, for a stage
    cache, the stage they enter), a digest of the weights that compute them (a fine-tuned
    encoder's grids are not the ImageNet backbone's), and whether the photos were mirrored."""
    g = encoder.grid_size
    what = f"{g}x{g}" if stage is None else f"stage{stage}"
    trunk = [encoder] if stage is None else encoder.stages[:stage]
    return f"{encoder.backbone_name}-{encoder.image_size}px-{what}-{weights_digest(trunk)}" + (
        "-hflip" if mirrored else ""
    )


def weights_digest(modules: Sequence[torch.nn.Module]) -> str:
    """8 hex digits that change whenever any weight or batch-norm statistic of `modules` does."""
    digest = hashlib.sha1()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:8]


class FeatureCacheError(RuntimeError):
    """A cache that cannot be used as it is: the message names its files and what to do."""


class FeatureCache:
    """The (N, L, D) fp16 grids of one list of images under one encoder, or with `stage=K` the
    (N, C, H, W) activations entering the encoder's stage K (fine-tuning the stages from K on
    then starts from them instead of from the photos).

    `mirrored=True`: computed from the left-right mirrored photos (training augmentation; a CNN's
    features of a mirrored photo are not its grid mirrored, so they are computed for real).
    """

    def __init__(
        self,
        root: str | Path,
        encoder: Encoder,
        paths: Sequence[str | Path],
        mirrored: bool = False,
        stage: int | None = None,
    ):
        self.paths = [str(p) for p in paths]
        digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()[:12]
        self.key = encoder_key(encoder, mirrored, stage)
        self.transform = transforms.Compose([TF.hflip, encoder.transform]) if mirrored else encoder.transform
        self.folder = Path(root) / self.key
        self.stem = self.folder / f"{len(self.paths)}-{digest}"
        row_shape = (
            (encoder.grid_size**2, encoder.feature_dim) if stage is None else encoder.stage_input_shape(stage)
        )
        self.shape = (len(self.paths), *row_shape)
        self.encoder, self.stage = encoder, stage
        self._features: np.memmap | None = None

    @property
    def features_file(self) -> Path:
        return self.stem.with_suffix(".f16")

    @property
    def done_file(self) -> Path:
        return self.stem.with_suffix(".done")

    @property
    def nbytes(self) -> int:
        """Size of the features file."""
        return int(np.prod(self.shape)) * np.dtype(np.float16).itemsize

    def missing_rows(self) -> np.ndarray:
        if not self.done_file.exists():
            return np.arange(len(self.paths))
        self._check_size(self.done_file, len(self.paths))
        done = np.memmap(self.done_file, dtype=np.uint8, mode="r", shape=(len(self.paths),))
        return np.flatnonzero(done == 0)

    def _check_size(self, path: Path, expected: int) -> None:
        """A file of another size than its cache's shape (a truncated copy, a disk that filled
        up under an older version) would fail deep in numpy, or be read as zeros."""
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes, expected {expected:,}"
            raise FeatureCacheError(
                f"feature cache file {path} is {found} (truncated or damaged): delete "
                f"{self.stem}.f16, .done and .json to compute the cache again"
            )

    def _open_features(self, mode: Literal["r", "r+"]) -> np.memmap:
        self._check_size(self.features_file, self.nbytes)
        return np.memmap(self.features_file, dtype=np.float16, mode=mode, shape=self.shape)

    def is_complete(self) -> bool:
        return len(self.missing_rows()) == 0

    def extract(
        self,
        batch_size: int = 32,
        num_workers: int = 2,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        rows: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """Compute the missing rows (this rank's share; only those in `rows` if given). Returns
        timing stats.

        Unreadable images stop extraction with one error listing them: training on a silently
        zero-filled grid would be worse than failing.
        """
        missing = self.missing_rows()
        stats = {
            "images": 0,
            "seconds": 0.0,
            "images_per_second": 0.0,
            "already_cached": len(self.paths) - len(missing),
            "copied": 0,
        }
        if len(missing) == 0:  # the same answer on every rank: nobody writes before the barrier
            return stats
        if rank == 0:
            stats["copied"] = self._create_once()
        if world_size > 1:  # every rank, even one with no rows of its own, meets here
            torch.distributed.barrier()
        missing = self.missing_rows()
        if rows is not None:
            missing = np.intersect1d(missing, np.asarray(rows))
        todo = [int(r) for r in missing if r % world_size == rank]
        if not todo:
            return stats
        self._check_size(self.features_file, self.nbytes)  # before reserving would pad it with zeros
        start = time.perf_counter()
        failed = self._fill(todo, batch_size, num_workers, device, progress)
        seconds = time.perf_counter() - start
        stats.update(images=len(todo), seconds=seconds, images_per_second=len(todo) / seconds)
        ImageBatch(failed, None).raise_errors()
        return stats

    def _fill(
        self, todo: list[int], batch_size: int, num_workers: int, device: str | torch.device, progress: bool
    ) -> list:
        """Encode the photos of rows `todo` into the cache; returns the items that failed to load."""
        with self._writing():
            reserve_space(self.features_file, self.nbytes)  # a cache made sparse by an older version
        features = self._open_features("r+")
        done = np.memmap(self.done_file, dtype=np.uint8, mode="r+", shape=(len(self.paths),))
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG, and a
        # training run would then depend on whether its features were already cached.
        loader = DataLoader(
            ImageFiles([self.paths[r] for r in todo], self.transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_images,
            generator=torch.Generator(),
        )
        # The same grids (or activations), faster: ONNX Runtime on a CPU.
        encoder = runtime_encoder(self.encoder.to(device).eval(), until_stage=self.stage)
        bar = tqdm(total=len(todo), desc=f"features {self.key}", unit="img", disable=not progress)
        failed = []
        with torch.inference_mode():
            for batch in loader:
                failed += [item for item in batch.items if item.error]
                batch_rows = np.array(
                    [todo[item.index] for item in batch.items if not item.error], dtype=np.int64
                )
                if batch.pixels is not None:
                    features[batch_rows] = encoder(batch.pixels.to(device)).to(torch.float16).cpu().numpy()
                    features.flush()
                    done[batch_rows] = 1
                    done.flush()
                bar.update(len(batch.items))
        bar.close()
        return failed

    def _create_once(self) -> int:
        """Allocate a new cache (zeros on reserved disk blocks) and copy what other caches hold;
        returns the rows copied, 0 if the cache already existed. Locked: another process may be
        creating it too."""
        with self._writing():
            self.folder.mkdir(parents=True, exist_ok=True)
            with exclusive_lock(self.stem.with_suffix(".lock")):
                if self.done_file.exists():
                    return 0
                self.features_file.unlink(missing_ok=True)  # left by a creation that was killed
                reserve_space(self.features_file, self.nbytes)
                info = json.dumps({"encoder": self.key, "shape": self.shape, "paths": self.paths})
                atomic_write(self.stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(info))
                reserve_space(self.done_file, len(self.paths))  # all rows to do; its existence: created
        return self._copy_from_other_caches()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A folder that cannot be written (read-only, not a folder, no permission) named as such."""
        try:
            yield
        except DiskFullError as err:
            raise DiskFullError(f"{err}: make room there, or put the cache elsewhere (--cache-dir)") from err
        except OSError as err:
            raise FeatureCacheError(
                f"cannot write the feature cache in {self.folder} "
                f"({err.strerror or err}): give a writable folder (--cache-dir)"
            ) from err

    def _copy_from_other_caches(self) -> int:
        """Fill this new cache with the rows other caches of the encoder already computed."""
        rows_of: dict[str, list[int]] = {}
        for row, path in enumerate(self.paths):  # a list may hold an image twice (train = val)
            rows_of.setdefault(os.path.abspath(path), []).append(row)
        features = self._open_features("r+")
        done = np.memmap(self.done_file, dtype=np.uint8, mode="r+", shape=(len(self.paths),))
        for info_file in sorted(self.folder.glob("*.json")):
            other = info_file.with_suffix("")
            if other == self.stem or not other.with_suffix(".done").exists():
                continue
            info = json.loads(info_file.read_text())
            if tuple(info["shape"][1:]) != self.shape[1:] or not _whole(other, info["shape"]):
                continue
            other_done = np.fromfile(other.with_suffix(".done"), dtype=np.uint8)
            pairs = [
                (mine, theirs)
                for theirs, path in enumerate(info["paths"])
                if other_done[theirs]
                for mine in rows_of.get(os.path.abspath(path), [])
                if not done[mine]
            ]
            if not pairs:
                continue
            source = np.memmap(
                other.with_suffix(".f16"), dtype=np.float16, mode="r", shape=tuple(info["shape"])
            )
            for start in range(0, len(pairs), 256):
                mine, theirs = (np.array(side) for side in zip(*pairs[start : start + 256], strict=True))
                features[mine] = source[theirs]
                features.flush()
                done[mine] = 1
                done.flush()
        return int(done.sum())

    def load(self) -> np.memmap:
        """The read-only memory map (N, L, D) fp16."""
        if self._features is None:
            if not self.is_complete():
                raise RuntimeError(f"feature cache {self.stem} is incomplete: run extract() first")
            self._features = self._open_features("r")
        return self._features

    def batch(self, rows: Sequence[int]) -> torch.Tensor:
        """Float32 grids (B, L, D) or activations (B, C, H, W) of the given rows (of a partly
        extracted cache: rows it has)."""
        wanted = np.asarray(rows)
        if self._features is None and not self.is_complete():
            if np.isin(wanted, self.missing_rows()).any():
                raise RuntimeError(
                    f"feature cache {self.stem} is incomplete: it lacks some of rows "
                    f"{wanted.tolist()[:8]}; run extract() first"
                )
            features = self._open_features("r")
        else:
            features = self.load()
        order = np.argsort(wanted)  # sorted reads are kinder to the page cache
        grids = np.empty((len(wanted), *self.shape[1:]), dtype=np.float16)
        grids[order] = features[wanted[order]]
        return torch.from_numpy(grids).float()


def _whole(stem: Path, shape: Sequence[int]) -> bool:
    """Whether another cache's files have the sizes of its shape (a damaged one is not copied from)."""
    features, done = stem.with_suffix(".f16"), stem.with_suffix(".done")
    return (
        features.exists()
        and features.stat().st_size == int(np.prod(shape)) * 2
        and done.exists()
        and done.stat().st_size == shape[0]
    )
