"""Caption millions of photos with Ray Data: batches of paths flow to actors that each load the
model once; the driver appends the records they return to a new part file under OUT/.

Ray schedules the actors over a cluster (CPU or GPU), restarts a dead actor and retries its
batches, so a killed worker loses nothing; a batch retried after its records came back can
repeat them, which `captioner caption --merge OUT` drops (one record per image). A rerun lists
OUT/part-*.jsonl and skips the images captioned there. The per-batch code is the plain batch
captioner's (`captioner.serving.batch`), so records, errors and decoding options are the same.

Ray is optional (`pip install "captioner[ray]"`): it is imported only when a run starts.
"""

from __future__ import annotations

import io
import math
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.files import LockedError, exclusive_lock
from captioner.model.options import DecodeOptions
from captioner.serving import hub
from captioner.serving.inputs import IMAGE_EXTENSIONS, find_inputs, missing_inputs, select_shard
from captioner.serving.records import OutputError, RecordWriter, format_line, parse_line, read_output
from captioner.serving.settings import BatchSettings

if TYPE_CHECKING:
    import torch

    from captioner.data.images import LoadedImage
    from captioner.serving.batch import Summary

RAY_MISSING = 'the Ray engine needs Ray: pip install "captioner[ray]"'
PART_PATTERN = "part-*.jsonl"  # the run outputs in OUT/, one per run
LOCK_NAME = ".captioner-ray.lock"
MAX_BLOCKS = 10_000  # Ray Data blocks of paths: one batch each, up to this many


class RayEngineError(RuntimeError):
    """Ray cannot run the job: not installed, the cluster cannot be reached, a bad source."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs (`captioner caption --engine ray` flags)."""

    address: str | None = None  # None: $RAY_ADDRESS, or start a local Ray
    concurrency: int = 1  # actors, each with a model
    num_gpus: float = 0.0  # per actor


def import_ray() -> Any:
    """The ray module, or RayEngineError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 (the Data library is the extra's point)
    except ImportError as err:
        raise RayEngineError(f"{RAY_MISSING} ({err})") from None
    return ray


def is_uri(path: str) -> bool:
    """s3://bucket/photos, gs://..., file:///...: read through pyarrow's filesystems."""
    return "://" in path


# ----------------------------------------------------------------------------- the actor


class CaptionActor:
    """Caption Ray Data batches: `ds.map_batches(CaptionActor, fn_constructor_kwargs={"model":
    "weights"}, batch_size=32, compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1)`. Loads
    the model once per actor.

    A batch has a `path` column (str, or bytes for file names that are not UTF-8) and,
    optionally, `bytes` (as `ray.data.read_binary_files(..., include_paths=True)` gives); without
    `bytes` each actor reads the files itself (local paths, or URIs via pyarrow). Returns the
    columns `path` and `record`: the JSONL line the plain batch captioner writes for the image
    (bad files are records with an `error`).
    """

    def __init__(
        self,
        model: str | None = None,
        options: DecodeOptions | None = None,
        max_pixels: int | None = None,
        device: str | None = None,
        quantize: bool | None = None,
        revision: str | None = None,
    ):
        from captioner.serving.batch import Summary, _Run
        from captioner.serving.captioner import Captioner

        self.captioner = Captioner.from_pretrained(model, device, quantize=quantize, revision=revision)
        options = options or DecodeOptions(n_best=1)
        settings = BatchSettings() if max_pixels is None else BatchSettings(max_pixels=max_pixels)
        self.run = _Run(  # the plain batch captioner's per-batch code, without focus boxes
            captioner=self.captioner,
            options=options,
            settings=settings,
            alternatives=options.per_image > 1,
            boxes=None,
            summary=Summary(0),
        )

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        from captioner.data.images import ImageFiles, collate_images

        paths = [os.fsdecode(p) if isinstance(p, bytes) else str(p) for p in batch["path"]]
        contents = batch.get("bytes")
        files = ImageFiles(paths, self.captioner.transform, self.run.settings.max_pixels)
        samples = [
            files[i] if contents is None and not is_uri(path) else self._load(i, path, contents)
            for i, path in enumerate(paths)
        ]
        collected = _Collected()
        self.run.caption_batch(collate_images(samples), collected, None)
        lines = [format_line(record, "jsonl").rstrip("\n") for record in collected.records]
        # Arrow strings are UTF-8: a file name's undecodable bytes show as \\udcNN in `path`
        names = [path.encode("utf-8", "backslashreplace").decode() for path in paths]
        return {"path": names, "record": lines}

    def _load(self, index: int, path: str, contents: Any) -> tuple[LoadedImage, torch.Tensor | None]:
        """A file given as bytes, or at a URI: the same item ImageFiles makes of a local file."""
        from captioner.data.images import ImageLoadError, LoadedImage

        item = LoadedImage(index, path)
        try:
            data = bytes(contents[index]) if contents is not None else read_uri(path)
            image = image_from_bytes(path, data, self.run.settings.max_pixels)
            pixels = self.captioner.transform(image)
        except (ImageLoadError, OSError) as err:
            item.error = str(err) if isinstance(err, ImageLoadError) else f"{path}: cannot read ({err})"
            return item, None
        except Exception as err:  # a decoder bug on a hostile file must not end the job
            item.error = f"{path}: unexpected {type(err).__name__} while reading: {err}"
            return item, None
        item.size = image.size
        return item, pixels


def read_uri(uri: str) -> bytes:
    """The bytes of one object at a URI (s3://, gs://, file://...); OSError if unreadable."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.readall()
    except OSError:
        raise
    except Exception as err:  # pyarrow's ArrowInvalid for a bad URI
        raise OSError(str(err)) from err


def image_from_bytes(path: str, data: bytes, max_pixels: int) -> Any:
    """Encoded image bytes -> upright RGB PIL image, with load_image's checks; ImageLoadError
    naming `path`."""
    from PIL import Image

    from captioner.data.images import ImageLoadError, load_image

    if not data:
        raise ImageLoadError(f"{path}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(f"{path}: too many pixels (possible decompression bomb)") from None
    try:
        return load_image(opened, max_pixels)
    except ImageLoadError as err:  # "PIL image (w, h) RGB: why" -> "path: why"
        raise ImageLoadError(f"{path}: {str(err).split(': ', 1)[-1]}") from None


class _Collected(RecordWriter):
    """The RecordWriter that _Run.caption_batch writes to, keeping the records in memory."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)


# ----------------------------------------------------------------------------- sources


def list_sources(sources: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, str]:
    """{file: shard key} of local folders, files and globs (as the plain captioner finds them)
    and of URIs (every image-extension object under the prefix). RayEngineError for a source
    that names nothing, cannot be listed, or when nothing is found."""
    local = [s for s in sources if not is_uri(s)]
    missing = missing_inputs(local)
    if missing:
        raise RayEngineError(f"{missing[0]}: no such file or folder")
    found = find_inputs(local, exclude=exclude) if local else {}
    for uri in (s for s in sources if is_uri(s)):
        found.update(_list_uri(uri))
    if not found:
        raise RayEngineError(f"no image files in {', '.join(sources)}")
    return found


def _list_uri(uri: str) -> dict[str, str]:
    import pyarrow.fs

    scheme = uri.split("://", 1)[0]
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise RayEngineError(f"{uri}: no such file or folder")
        if info.type == pyarrow.fs.FileType.File:
            return {uri: os.path.basename(root)}
        listing = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except RayEngineError:
        raise
    except Exception as err:  # ArrowInvalid (unknown scheme, bad bucket), OSError (no access)
        raise RayEngineError(f"{uri}: cannot list it ({' '.join(str(err).split())})") from None
    found = {}
    for entry in listing:
        relative = os.path.relpath(entry.path, root)
        hidden = any(part.startswith(".") for part in relative.split("/"))
        if entry.type == pyarrow.fs.FileType.File and not hidden and entry.extension.lower() in _EXTENSIONS:
            found[f"{scheme}://{entry.path}"] = relative
    return found


_EXTENSIONS = {extension.lstrip(".") for extension in IMAGE_EXTENSIONS}


# ----------------------------------------------------------------------------- the run


def part_files(out: Path) -> list[Path]:
    """The run outputs in OUT/, oldest first."""
    return sorted(out.glob(PART_PATTERN))


def caption_with_ray(
    sources: Sequence[str],
    out: str | Path,
    ray_options: RayOptions,
    options: DecodeOptions | None = None,
    settings: BatchSettings | None = None,
    *,
    model: str | None = None,
    revision: str | None = None,
    device: str | None = None,
    quantize: bool | None = None,
    shard: tuple[int, int] | None = None,
) -> Summary:
    """Caption the images of `sources` (folders, files, globs, URIs) into a new OUT/part-N.jsonl,
    skipping images captioned in OUT/ before (and failed ones, unless settings.retry_failed).
    One run at a time writes OUT (OutputError otherwise)."""
    settings = settings or BatchSettings()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; --engine ray writes a folder of part files")
    found = list_sources(sources, exclude=[str(out)])
    hub.find_model(model, revision)  # a missing model fails here, not in every actor
    paths = select_shard(found, *shard) if shard else list(found)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output folder {out}: {err}") from err
    try:
        with exclusive_lock(out / LOCK_NAME, wait=False):
            todo, summary = _plan(paths, out, settings.retry_failed)
            if todo:
                _run(todo, out, summary, ray_options, options, settings, model, revision, device, quantize)
    except LockedError as err:
        raise OutputError(f"another captioner run is writing {out} ({err.holder})") from None
    return summary


def _plan(paths: Sequence[str], out: Path, retry_failed: bool) -> tuple[list[str], Summary]:
    """The files still to caption and the summary of what earlier runs did."""
    from captioner.serving.batch import still_to_caption

    done: set[str] = set()
    failed: set[str] = set()
    for part in part_files(out):
        existing = read_output(part, "jsonl", repair=False)
        done |= existing.done()
        failed |= existing.failed()
    return still_to_caption(paths, done, failed - done, retry_failed)


def _run(
    todo: list[str],
    out: Path,
    summary: Summary,
    ray_options: RayOptions,
    options: DecodeOptions | None,
    settings: BatchSettings,
    model: str | None,
    revision: str | None,
    device: str | None,
    quantize: bool | None,
) -> None:
    import time

    start = time.perf_counter()
    ray = connect(ray_options.address)
    ray.data.DataContext.get_current().enable_progress_bars = settings.progress
    blocks = min(MAX_BLOCKS, math.ceil(len(todo) / settings.batch_size))
    dataset = ray.data.from_items([{"path": os.fsencode(p)} for p in todo], override_num_blocks=blocks)
    captions = dataset.map_batches(
        CaptionActor,
        fn_constructor_kwargs=dict(
            model=model,
            options=options,
            max_pixels=settings.max_pixels,
            device=device,
            quantize=quantize,
            revision=revision,
        ),
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ray_options.concurrency),
        num_gpus=ray_options.num_gpus or None,
    )
    part = out / f"part-{len(part_files(out)):05d}.jsonl"
    try:
        with RecordWriter(part, "jsonl") as writer:
            for batch in captions.iter_batches(batch_size=None, batch_format="numpy"):
                _write(batch["record"], writer, summary)
    except ray.exceptions.RayError as err:  # an actor that cannot start, a lost cluster
        message = " ".join(str(err).split())[:500]
        raise RayEngineError(f"the Ray job failed ({type(err).__name__}): {message}") from err
    finally:
        summary.seconds = time.perf_counter() - start


def _write(lines: Sequence[str], writer: RecordWriter, summary: Summary) -> None:
    """Append a batch's records, durably, and count them."""
    for line in lines:
        record = parse_line(str(line), "jsonl")
        writer.write(record)
        if record["error"] is None:
            summary.captioned += 1
        else:
            summary.add_failure(record["error"])
    writer.sync()


def connect(address: str | None) -> Any:
    """Join the Ray cluster at `address` (or $RAY_ADDRESS), or start a local one; a session
    already started in this process (ray.init) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
        raise RayEngineError(
            f"cannot reach the Ray cluster at {where}: {' '.join(str(err).split())}"
        ) from None
    return ray


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """RayEngineError at once if a host:port (or ray://host:port) address takes no connection:
    ray.init would wait for it for many minutes."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # None, "auto", "local": ray.init finds (or starts) the cluster itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayEngineError(f"cannot reach the Ray cluster at {address}: {err}") from None
