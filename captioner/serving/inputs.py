"""Which files a batch run captions: images found in folders, files and glob patterns, and
the shards that split them across processes and machines. No torch here: the command line checks
its inputs with these before loading anything heavy.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from captioner.serving.records import path_key

# Folder scans take files with these extensions (a bad one becomes an error row), plus files of
# any name whose first bytes are an image signature (a JPEG saved as .dat). HEIC is listed so
# that phone photos Pillow cannot read are reported rather than silently left out.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".avif",
        ".heic",
        ".heif",
        ".ico",
        ".jp2",
        ".j2k",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
    }
)
_SIGNATURES = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",
    b"\xff\x4f\xff\x51",
)
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_ISO_MEDIA_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")

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
    return [
        str(item)
        for item in inputs
        if not os.path.lexists(item)
        and not (glob.has_magic(str(item)) and glob.glob(str(item), recursive=True))
    ]


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
