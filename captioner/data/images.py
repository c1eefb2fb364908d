"""Reading user images safely: every odd format becomes 8-bit RGB, every bad file a clear error."""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from captioner.data.limits import DEFAULT_MAX_PIXELS

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


class ImageLoadError(ValueError):
    """An input that is not a usable image. The message names the input."""


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, np.ndarray):
        return f"numpy array {source.shape} {source.dtype}"
    if isinstance(source, torch.Tensor):
        return f"torch tensor {tuple(source.shape)} {str(source.dtype).removeprefix('torch.')}"
    if isinstance(source, Image.Image):
        return f"PIL image {source.size} {source.mode}"
    return "None" if source is None else f"{type(source).__name__} object"


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    raise ValueError(f"unsupported dtype {array.dtype}")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 array, got {array.shape}")
    if min(array.shape[:2]) == 0:
        raise ValueError("has no pixels")
    # A little below zero is a resize's overshoot and is clipped; clearly negative values mean a
    # normalised tensor, which clipping would silently caption differently. NaN has its own error.
    if np.issubdtype(array.dtype, np.floating) and array.min() < -0.05 * max(1.0, float(array.max())):
        raise ValueError(
            f"has negative values (min {array.min():.3g}): pass pixels in 0..1 or 0..255, "
            "not a normalised tensor (undo the normalisation first)"
        )
    return Image.fromarray(_to_uint8(array))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float greyscale
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha, as RGBa: unpremultiplied, alpha dropped
        image = image.convert("LA").convert("L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def load_photo(name: str | Path) -> Image.Image:
    """A file, or a scikit-image sample photo by name (astronaut, coffee, chelsea, rocket: public
    domain or CC0, shipped with the package, so figures need no download)."""
    if Path(name).is_file():
        return load_image(name)
    from skimage import data

    loader = getattr(data, str(name), None)
    if loader is None:
        raise ImageLoadError(f"{name}: neither a file nor a scikit-image sample photo")
    return load_image(loader())


def _why_missing(path: Path) -> str:
    if not path.is_symlink():
        return "file does not exist"
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself)"
    return "file does not exist (broken link)"


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Path, PIL image, numpy array or torch tensor -> upright 8-bit RGB PIL image.

    Arrays and tensors are (H, W), (H, W, 3|4) or (3|4, H, W): floats in 0..1 (or 0..255 when
    any value is above 1), integers in 0..255 (0..65535 when any is above 255), or booleans.
    Negative floats (a normalised tensor) are refused rather than clipped.

    Raises ImageLoadError naming the input for missing, non-image, truncated, empty or
    oversized (decompression bomb) inputs.
    """
    name = _describe(source)
    try:
        if isinstance(source, torch.Tensor):  # like an array: (3, H, W) or (H, W, 3)
            tensor = source.detach().cpu()
            image = _from_array((tensor.float() if tensor.is_floating_point() else tensor).numpy())
        elif isinstance(source, np.ndarray):
            image = _from_array(source)
        elif isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise ValueError(_why_missing(path))
            if path.is_dir():
                raise ValueError("is a folder, not an image file")
            if path.stat().st_size == 0:
                raise ValueError("file is empty (0 bytes)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(path)
        else:
            raise ValueError(
                "not an image: expected a file path, a PIL image, a numpy array or a torch tensor"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"{width}x{height} pixels exceeds the limit of {max_pixels:,} (possible decompression bomb)"
            )
        if width == 0 or height == 0:
            raise ValueError("has no pixels")
        image.load()  # decode now, so truncated files fail here
        return _to_rgb(_upright(image))
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not a recognised image file") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name}: too many pixels (possible decompression bomb)") from err
    except PermissionError as err:
        raise ImageLoadError(f"{name}: permission denied") from err
    except OSError as err:  # truncated or corrupt data
        raise ImageLoadError(f"{name}: cannot decode image ({err})") from err
    except ValueError as err:
        raise ImageLoadError(f"{name}: {err}") from err
    except Exception as err:  # what else a decoder raises on a hostile file: struct.error, SyntaxError ...
        raise ImageLoadError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from err


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as stored if its metadata cannot be read
    (a photo whose pixels decode is not refused for a malformed EXIF block)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" notes: handled here
            return ImageOps.exif_transpose(image)
    except Exception:  # struct.error, SyntaxError ("not a TIFF file"), TypeError, ...
        return image


# ----------------------------------------------------------------------------- files in workers


@dataclass
class LoadedImage:
    index: int  # position in the ImageFiles list
    path: str
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation
    error: str | None = None  # why the file could not be used; then it has no pixels
    thumbnail: np.ndarray | None = None  # small RGB copy, when asked for (attention grids)


@dataclass
class ImageBatch:
    items: list[LoadedImage]  # every image of the batch, in order, failures included
    pixels: torch.Tensor | None  # (n, 3, S, S) of the items without an error, in order

    def raise_errors(self) -> None:
        """For callers that cannot go on without every image (training, feature caches)."""
        errors = [item.error for item in self.items if item.error]
        if errors:
            listed = "\n  ".join(errors[:10])
            raise ImageLoadError(f"{len(errors)} images could not be read:\n  {listed}")


class ImageFiles(Dataset):
    """Image files -> preprocessed tensors, for a DataLoader's workers.

    The one image-reading dataset of the library (feature extraction, fine-tuning, evaluation,
    the batch captioner): a bad file yields an item with an `error` instead of raising, so a
    batch job can record it and go on, and a training job can list every bad file at once.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        thumbnail_size: int | None = None,
    ):
        self.paths, self.transform = [str(p) for p in paths], transform
        self.max_pixels, self.thumbnail_size = max_pixels, thumbnail_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[LoadedImage, torch.Tensor | None]:
        item = LoadedImage(index, self.paths[index])
        try:
            image = load_image(item.path, self.max_pixels)
            pixels = self.transform(image)
        except ImageLoadError as err:
            item.error = str(err)
            return item, None
        except Exception as err:  # a decoder bug on a hostile file must not end a batch job
            item.error = f"{item.path}: unexpected {type(err).__name__} while reading: {err}"
            return item, None
        item.size = image.size
        if self.thumbnail_size:
            image.thumbnail((self.thumbnail_size, self.thumbnail_size))
            item.thumbnail = np.asarray(image)
        return item, pixels


def collate_images(samples: list[tuple[LoadedImage, torch.Tensor | None]]) -> ImageBatch:
    """Stack the good images; failures travel alongside as metadata only."""
    good = [pixels for _, pixels in samples if pixels is not None]
    return ImageBatch([item for item, _ in samples], torch.stack(good) if good else None)
