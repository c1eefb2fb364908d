"""Caption thousands of image files into a resumable JSONL or CSV file.

Worker processes decode and preprocess images while the model captions the previous batch
(captioner.serving.inputs finds the files and splits them into shards).
A file that cannot be used becomes an `error` row instead of stopping the run. Records are
appended and flushed batch by batch, so a rerun with the same output picks up where a crashed
or interrupted run stopped.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.data.images import ImageBatch, ImageFiles, LoadedImage, collate_images
from captioner.model.focus import Focus, as_box
from captioner.model.options import DecodeOptions
from captioner.model.results import CaptionResult
from captioner.serving.captioner import Captioner
from captioner.serving.inputs import ATTENTION_MARKER  # finding and sharding files; its API also here:
from captioner.serving.inputs import find_images as find_images
from captioner.serving.inputs import find_inputs as find_inputs
from captioner.serving.inputs import looks_like_image as looks_like_image
from captioner.serving.inputs import parse_shard as parse_shard
from captioner.serving.inputs import select_shard as select_shard
from captioner.serving.records import (
    ExistingOutput,
    OutputError,
    RecordWriter,
    csv_fields,
    drop_failures,
    failure_record,
    locked_output,
    output_format,
    path_key,
    read_output,
    success_record,
)
from captioner.serving.settings import BatchSettings
from captioner.visualize import save_attention_grid

THUMBNAIL_SIZE = 320  # images kept for --save-attention grids (panels are ~200 px wide)


# ----------------------------------------------------------------------------- torchrun


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_output(output: str | Path, rank: int) -> Path:
    """out.jsonl -> out.rank3.jsonl: one output per torchrun process."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rank{rank}{output.suffix}")


# ----------------------------------------------------------------------------- records


def attention_filename(path: str) -> str:
    """A flat, collision-free PNG name: the path's readable tail plus a hash of the full path."""
    readable = re.sub(r"[^\w.-]+", "_", path.replace(os.sep, "__").replace("/", "__")).strip("._")
    if len(readable) > 80:  # keep the tail, starting at a folder boundary if there is one
        tail = readable[-80:]
        readable = tail.partition("__")[2] or tail
    digest = hashlib.sha1(os.fsencode(path_key(path))).hexdigest()[:10]
    return f"{readable or 'image'}-{digest}.png"


# ----------------------------------------------------------------------------- the run


@dataclass
class Summary:
    found: int  # files to consider, after expanding the inputs
    already_done: int = 0  # captioned by an earlier run with the same output
    failed_before: int = 0  # failed in an earlier run, not retried
    captioned: int = 0
    failed: int = 0
    seconds: float = 0.0
    first_errors: list[str] = field(default_factory=list)

    def add_failure(self, error: str) -> None:
        self.failed += 1
        if len(self.first_errors) < 10:
            self.first_errors.append(error)

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    @property
    def any_captioned(self) -> bool:
        """After this run, does at least one input have a caption in the output?"""
        return self.captioned + self.already_done > 0

    def __str__(self) -> str:
        skipped = f"skipped {self.already_done} already captioned"
        if self.failed_before:
            skipped += f" and {self.failed_before} that failed before (--retry-failed retries them)"
        return (
            f"{self.found} files: captioned {self.captioned}, failed {self.failed}, {skipped} | "
            f"{self.images_per_second:.1f} images/s, wall time {self.seconds:.1f} s"
        )


def caption_files(
    captioner: Captioner,
    paths: Sequence[str],
    output: str | Path,
    options: DecodeOptions | None = None,
    settings: BatchSettings | None = None,
    *,
    fmt: str | None = None,
    focus: Mapping[str, Focus] | None = None,
    evidence: bool = False,
) -> Summary:
    """Caption `paths` into `output` (JSONL or CSV, `fmt` or by its suffix), skipping files it
    already holds a row for.

    `options`: how captions are searched for (default: DecodeOptions(n_best=1), the best caption
    alone); when they keep more than one caption per image, the rows hold the alternatives.
    `settings`: batch size, workers, retries, attention PNGs... (default: BatchSettings()).
    Failed files are skipped too unless `settings.retry_failed`; their old rows are then
    replaced. `focus` maps paths to boxes (x0, y0, x1, y1) or masks to caption a region of those
    images; every row then says in `focus` which box it used ("mask", or null: the whole image),
    and a region that does not fit its image makes an error row. `evidence`: every row holds in
    `evidence` what the encoder's ImageNet classifier saw (of the box, in a focus row): its top
    labels and the caption's words it supports (records.evidence_field); a file started with it
    keeps it. One run at a time writes an output; a pipe or
    device (`/dev/stdout`) is written to without resume. Raises OutputError if the output is
    being written by another run, or cannot be read back or written.
    """
    options = options or DecodeOptions(n_best=1)
    settings = settings or BatchSettings()
    start = time.perf_counter()
    output = Path(output)
    fmt = output_format(output, fmt)
    boxes = None if focus is None else {path_key(p): box for p, box in focus.items()}
    with locked_output(output):
        existing = read_output(output, fmt, csv_fields(options.per_image > 1, focus is not None, evidence))
        todo, summary = _plan(paths, output, fmt, existing, settings.retry_failed)
        alternatives = options.per_image > 1 or "alternatives" in existing.fields
        evidence = evidence or "evidence" in existing.fields
        run = _Run(captioner, options, settings, alternatives, boxes, summary, evidence)
        try:
            with RecordWriter(output, fmt, existing.fields) as writer:
                run.caption(todo, writer)
        finally:
            summary.seconds = time.perf_counter() - start
    return summary


def prepare_output(
    output: str | Path,
    options: DecodeOptions | None = None,
    *,
    fmt: str | None = None,
    focus: bool = False,
    evidence: bool = False,
) -> None:
    """Check or create the output of a run with nothing to caption (an empty shard), as
    caption_files would, so that --merge finds every shard's file."""
    output = Path(output)
    fmt = output_format(output, fmt)
    alternatives = (options or DecodeOptions(n_best=1)).per_image > 1
    with locked_output(output):
        existing = read_output(output, fmt, csv_fields(alternatives, focus, evidence))
        RecordWriter(output, fmt, existing.fields).close()


@dataclass
class _Run:
    """How caption_files captions its files into a writer."""

    captioner: Captioner
    options: DecodeOptions
    settings: BatchSettings
    alternatives: bool  # rows hold the n-best list
    boxes: dict[str, Focus] | None  # path_key -> box, in a --focus-json run
    summary: Summary
    evidence: bool = False  # rows hold the ImageNet evidence

    def caption(self, todo: Sequence[str], writer: RecordWriter) -> None:
        settings = self.settings
        attention_dir = _attention_folder(settings.save_attention)
        dataset = ImageFiles(
            todo,
            self.captioner.transform,
            settings.max_pixels,
            thumbnail_size=THUMBNAIL_SIZE if attention_dir is not None else None,
        )
        loader = DataLoader(
            dataset,
            batch_size=settings.batch_size,
            num_workers=settings.workers,
            collate_fn=collate_images,
            pin_memory=self.captioner.device.type == "cuda",
        )
        with tqdm(
            total=len(todo), unit="img", disable=not settings.progress or not todo, smoothing=0.05
        ) as bar:
            for batch in loader:
                self.caption_batch(batch, writer, attention_dir)
                writer.sync()
                bar.update(len(batch.items))

    def caption_batch(self, batch: ImageBatch, writer: RecordWriter, attention_dir: Path | None) -> None:
        bias = (
            _focus_bias(self.captioner, batch, self.boxes, self.settings.focus_strength)
            if self.boxes
            else None
        )
        results = iter(
            self.captioner.caption_tensors(batch.pixels, self.options, bias, self.evidence)
            if batch.pixels is not None
            else ()
        )
        for item in batch.items:
            if item.error:
                writer.write(self.record(failure_record(item.path, item.error)))
                self.summary.add_failure(item.error)
                continue
            result = next(results)
            assert item.size is not None  # ImageFiles gives every image it loaded its size
            if attention_dir is not None:
                _save_attention(attention_dir, item, result)
            record = success_record(item.path, result, item.size, self.alternatives, self.evidence)
            writer.write(self.record(record))
            self.summary.captioned += 1

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with, before `error`, in a focus run the box it used (None: the whole image)
        and in an evidence run its evidence (None for a failure)."""
        error = record.pop("error")
        if self.boxes is not None:
            record["focus"] = _focus_field(self.boxes.get(path_key(record["path"])))
        if self.evidence:
            record.setdefault("evidence", None)
        record["error"] = error
        return record


def _focus_field(region: Focus | None) -> list[float] | str | None:
    """What a record says about its focus region: the box, "mask", or None for the whole image
    (what a region that is neither gives its error row: the error says what is wrong)."""
    if region is None:
        return None
    try:
        return list(as_box(region))
    except ValueError:
        return "mask" if np.ndim(region) == 2 else None


def still_to_caption(
    paths: Sequence[str], done: set[str], failed: set[str], retry_failed: bool
) -> tuple[list[str], Summary]:
    """The files earlier runs did not caption (failures too with retry_failed), each once, and
    the summary of what those runs did; `done`/`failed` hold path keys (records.path_key)."""
    skip = done if retry_failed else done | failed
    todo = list({path_key(p): p for p in paths if path_key(p) not in skip}.values())
    summary = Summary(
        len(paths),
        already_done=sum(path_key(p) in done for p in paths),
        failed_before=0 if retry_failed else sum(path_key(p) in failed for p in paths),
    )
    return todo, summary


def _plan(
    paths: Sequence[str], output: Path, fmt: str, existing: ExistingOutput, retry_failed: bool
) -> tuple[list[str], Summary]:
    """The files still to caption (no duplicates), and the summary of what earlier runs did.
    Failures to retry lose their old rows now."""
    failed = existing.failed()
    todo, summary = still_to_caption(paths, existing.done(), failed, retry_failed)
    retry = {path_key(p) for p in todo} & failed
    if retry:
        drop_failures(output, fmt, existing, retry)
    return todo, summary


def _attention_folder(folder: str | Path | None) -> Path | None:
    """The --save-attention folder, created and marked (later scans leave it out)."""
    if not folder:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ATTENTION_MARKER).touch()
    except OSError as err:
        raise OutputError(f"cannot create the attention folder {folder}: {err}") from err
    return folder


def _focus_bias(
    captioner: Captioner, batch: ImageBatch, boxes: Mapping[str, Focus], strength: float
) -> torch.Tensor | None:
    """The batch's attention bias (n, L), or None if no image of it has a box. An image whose
    box does not fit gets an error and leaves the batch."""
    loaded = [item for item in batch.items if not item.error]
    biases: list[torch.Tensor | None] = []
    for item in loaded:
        assert item.size is not None  # ImageFiles gives every image it loaded its size
        try:
            biases.append(captioner.focus_bias(boxes.get(path_key(item.path)), item.size, strength))
        except ValueError as err:
            item.error = f"{item.path}: {err}"
            biases.append(None)
    keep = torch.tensor([b is not None for b in biases], dtype=torch.bool)
    if batch.pixels is not None and not keep.all():
        batch.pixels = batch.pixels[keep] if keep.any() else None
    kept = [b for b in biases if b is not None]
    focused = any(path_key(item.path) in boxes for item in loaded if not item.error)
    return torch.stack(kept) if focused else None


def _save_attention(folder: Path, item: LoadedImage, result: CaptionResult) -> None:
    path = folder / attention_filename(item.path)
    assert item.thumbnail is not None  # caption_files asks ImageFiles for thumbnails with attention_dir
    try:
        save_attention_grid(
            path, Image.fromarray(item.thumbnail), result.words, result.attention, title=result.text
        )
    except OSError as err:
        raise OutputError(f"cannot write attention grid {path}: {err}") from err
