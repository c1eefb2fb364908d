"""Caption thousands of image files into a resumable JSONL or CSV file.

Worker processes decode and preprocess images while the model captions the previous batch.
A file that cannot be used becomes an `error` row instead of stopping the run. Records are
appended and flushed batch by batch, so a rerun with the same output picks up where a crashed
or interrupted run stopped.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.data.images import ImageBatch, ImageFiles, LoadedImage, collate_images
from captioner.model.focus import Focus, as_box
from captioner.model.options import DecodeOptions
from captioner.model.results import CaptionResult
from captioner.serving.captioner import Captioner
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

# Folder scans take files with these extensions (a bad one becomes an error row), plus files of
# any name whose first bytes are an image signature (a JPEG saved as .dat). HEIC is listed so
# that phone photos Pillow cannot read are reported rather than silently left out.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
    ".avif", ".heic", ".heif", ".ico", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".tga",
})
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
               b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_ISO_MEDIA_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")

THUMBNAIL_SIZE = 320  # images kept for --save-attention grids (panels are ~200 px wide)
# Marks an attention folder, so that later scans of a folder containing it leave it out even
# when --save-attention is not given again.
ATTENTION_MARKER = ".captioner-attention"


# ----------------------------------------------------------------------------- finding images

def looks_like_image(path: str | Path) -> bool:
    """True if the file starts with the signature of an image format Pillow reads."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    if head.startswith(_SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return True
    return head[4:8] == b"ftyp" and head[8:12] in _ISO_MEDIA_BRANDS


def _scan(folder: str, excluded: set[str]) -> Iterator[str]:
    """Image files under `folder`, recursively and sorted. Hidden files and folders (.DS_Store,
    macOS `._x.jpg` sidecars, our temporary files) and attention folders are skipped."""
    seen_dirs: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        skipped = path_key(root) in excluded or os.path.exists(os.path.join(root, ATTENTION_MARKER))
        if real in seen_dirs or skipped:  # seen: a symlink loop
            dirs.clear()
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith(".") or path_key(path) in excluded:
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or looks_like_image(path):
                yield path


def find_images(inputs: Sequence[str | Path], exclude: Iterable[str | Path] = ()) -> list[str]:
    """Expand folders (recursively), files and glob patterns into a list of files to caption.

    Folders contribute files with an image extension or an image signature; other files there
    are skipped silently. Files named explicitly (or matched by a glob) are always kept, so a
    missing or non-image file the user asked for gets an error row. A pattern that matches
    nothing is kept as a literal name, as the shell does. Duplicates are dropped; `exclude`
    (the output file, the attention folder) is never captioned.
    """
    return list(find_inputs(inputs, exclude))


def find_inputs(inputs: Sequence[str | Path], exclude: Iterable[str | Path] = ()) -> dict[str, str]:
    """find_images' files, each with its shard key: its path relative to the input that found
    it (a folder; for a glob pattern, its folder part before the first wildcard; for a file
    named alone, its own folder), with / separators. The same files get the same keys on every
    machine, wherever the folder is mounted and wherever the command runs from."""
    excluded = {path_key(p) for p in exclude}
    found: dict[str, tuple[str, str]] = {}  # path_key -> (path, shard key)

    def add(path: str, base: str) -> None:
        key = path_key(path)
        if key not in excluded:
            found.setdefault(key, (path, os.path.relpath(path, base or ".").replace(os.sep, "/")))

    for item in map(str, inputs):
        matches, base = [item], None
        if not os.path.lexists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True)) or [item]
            base = str(Path(*itertools.takewhile(lambda p: not glob.has_magic(p), Path(item).parts[:-1])))
        for path in matches:
            if os.path.isdir(path):
                for file in _scan(path, excluded):
                    add(file, base or path)
            else:
                add(os.path.normpath(path), base or os.path.dirname(path))
    return dict(found.values())


def missing_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """The inputs that name nothing: no such file or folder, or a glob pattern matching none."""
    return [str(item) for item in inputs if not os.path.lexists(item)
            and not (glob.has_magic(str(item)) and glob.glob(str(item), recursive=True))]


# ----------------------------------------------------------------------------- shards

def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 0 <= K < N: this process takes shard K of N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r}: expected K/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need 0 <= K < N")
    return index, count


def shard_of(key: str, count: int) -> int:
    """A stable shard for a file, from a hash of its shard key (find_inputs): every file lands
    in exactly one shard, the same on every machine."""
    return int.from_bytes(hashlib.sha1(os.fsencode(key)).digest()[:8], "big") % count


def select_shard(paths: Mapping[str, str] | Sequence[str], index: int, count: int) -> list[str]:
    """The paths of shard `index` of `count`: of find_inputs' {path: shard key}, or of a list of
    paths, each keyed by its file name (as if named alone on the command line)."""
    keys = paths if isinstance(paths, Mapping) else {p: os.path.basename(os.path.normpath(p)) for p in paths}
    return [p for p in paths if shard_of(keys[p], count) == index]


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
        return (f"{self.found} files: captioned {self.captioned}, failed {self.failed}, {skipped} | "
                f"{self.images_per_second:.1f} images/s, wall time {self.seconds:.1f} s")


def caption_files(
    captioner: Captioner,
    paths: Sequence[str],
    output: str | Path,
    options: DecodeOptions | None = None,
    settings: BatchSettings | None = None,
    *,
    fmt: str | None = None,
    focus: Mapping[str, Focus] | None = None,
) -> Summary:
    """Caption `paths` into `output` (JSONL or CSV, `fmt` or by its suffix), skipping files it
    already holds a row for.

    `options`: how captions are searched for (default: DecodeOptions(n_best=1), the best caption
    alone); when they keep more than one caption per image, the rows hold the alternatives.
    `settings`: batch size, workers, retries, attention PNGs... (default: BatchSettings()).
    Failed files are skipped too unless `settings.retry_failed`; their old rows are then
    replaced. `focus` maps paths to boxes (x0, y0, x1, y1) to caption a region of those images;
    every row then says in `focus` which box it used (null: the whole image), and a box that
    does not fit its image makes an error row. One run at a time writes an output; a pipe or
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
        existing = read_output(output, fmt, csv_fields(options.per_image > 1, focus is not None))
        todo, summary = _plan(paths, output, fmt, existing, settings.retry_failed)
        alternatives = options.per_image > 1 or "alternatives" in existing.fields
        run = _Run(captioner, options, settings, alternatives, boxes, summary)
        try:
            with RecordWriter(output, fmt, existing.fields) as writer:
                run.caption(todo, writer)
        finally:
            summary.seconds = time.perf_counter() - start
    return summary


def prepare_output(output: str | Path, options: DecodeOptions | None = None, *, fmt: str | None = None,
                   focus: bool = False) -> None:
    """Check or create the output of a run with nothing to caption (an empty shard), as
    caption_files would, so that --merge finds every shard's file."""
    output = Path(output)
    fmt = output_format(output, fmt)
    alternatives = (options or DecodeOptions(n_best=1)).per_image > 1
    with locked_output(output):
        existing = read_output(output, fmt, csv_fields(alternatives, focus))
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

    def caption(self, todo: Sequence[str], writer: RecordWriter) -> None:
        settings = self.settings
        attention_dir = _attention_folder(settings.save_attention)
        dataset = ImageFiles(todo, self.captioner.transform, settings.max_pixels,
                             thumbnail_size=THUMBNAIL_SIZE if attention_dir is not None else None)
        loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers,
                            collate_fn=collate_images, pin_memory=self.captioner.device.type == "cuda")
        with tqdm(total=len(todo), unit="img", disable=not settings.progress or not todo,
                  smoothing=0.05) as bar:
            for batch in loader:
                self.caption_batch(batch, writer, attention_dir)
                writer.sync()
                bar.update(len(batch.items))

    def caption_batch(self, batch: ImageBatch, writer: RecordWriter, attention_dir: Path | None) -> None:
        bias = (_focus_bias(self.captioner, batch, self.boxes, self.settings.focus_strength)
                if self.boxes else None)
        results = iter(self.captioner.caption_tensors(batch.pixels, self.options, bias)
                       if batch.pixels is not None else ())
        for item in batch.items:
            if item.error:
                writer.write(self.record(failure_record(item.path, item.error)))
                self.summary.add_failure(item.error)
                continue
            result = next(results)
            assert item.size is not None  # ImageFiles gives every image it loaded its size
            if attention_dir is not None:
                _save_attention(attention_dir, item, result)
            writer.write(self.record(success_record(item.path, result, item.size, self.alternatives)))
            self.summary.captioned += 1

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """In a focus run, the record with the box it used (None: the whole image) before `error`."""
        if self.boxes is None:
            return record
        box = self.boxes.get(path_key(record["path"]))
        error = record.pop("error")
        record["focus"] = None if box is None else list(as_box(box))
        record["error"] = error
        return record


def _plan(paths: Sequence[str], output: Path, fmt: str, existing: ExistingOutput,
          retry_failed: bool) -> tuple[list[str], Summary]:
    """The files still to caption (no duplicates), and the summary of what earlier runs did.
    Failures to retry lose their old rows now."""
    done, failed = existing.done(), existing.failed()
    skip = done if retry_failed else done | failed
    todo = list({path_key(p): p for p in paths if path_key(p) not in skip}.values())
    summary = Summary(len(paths), already_done=sum(path_key(p) in done for p in paths),
                      failed_before=0 if retry_failed else sum(path_key(p) in failed for p in paths))
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


def _focus_bias(captioner: Captioner, batch: ImageBatch, boxes: Mapping[str, Focus],
                strength: float) -> torch.Tensor | None:
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
        save_attention_grid(path, Image.fromarray(item.thumbnail), result.words, result.attention,
                            title=result.text)
    except OSError as err:
        raise OutputError(f"cannot write attention grid {path}: {err}") from err
