"""load_image: every odd but valid input becomes upright 8-bit RGB, every bad one a clear error."""

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner import ImageLoadError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _pixel(image, xy):
    return image.getpixel(xy)


def _close(colour, expected, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(colour, expected, strict=True))


# ----------------------------------------------------------------------------- valid inputs


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 30), RED)
    image.paste(BLUE, (30, 0, 60, 30))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the camera was held sideways
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (30, 60) and loaded.mode == "RGB"
    assert _close(_pixel(loaded, (15, 5)), RED) and _close(_pixel(loaded, (15, 55)), BLUE)


def test_grayscale(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 6), 77).save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 6) and _pixel(loaded, (0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent
    image.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    path = tmp_path / "alpha.png"
    image.save(path)
    for source in (path, image):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        assert _pixel(loaded, (0, 0)) == RED and _pixel(loaded, (1, 0)) == WHITE
        assert _close(_pixel(loaded, (2, 0)), (127, 127, 127), tol=2)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))  # 0: black, 1: green
    image.putpixel((3, 3), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)  # black is transparent
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert _pixel(loaded, (0, 0)) == WHITE and _pixel(loaded, (3, 3)) == (0, 200, 0)


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.gif"
    Image.new("RGB", (5, 5), (10, 20, 200)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert _close(_pixel(load_image(path), (2, 2)), (10, 20, 200), tol=20)


def test_16_bit_png(tmp_path):
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert [_pixel(loaded, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # red ink
    assert Image.open(path).mode == "CMYK"
    loaded = load_image(path)
    assert loaded.mode == "RGB" and _close(_pixel(loaded, (8, 8)), RED, tol=20)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((4, 6, 3), (255, 0, 0), dtype=np.uint8), RED),
        (np.full((4, 6, 3), (65535, 0, 0), dtype=np.uint16), RED),
        (np.full((4, 6, 3), (1.0, 0.0, 0.0), dtype=np.float32), RED),
        (np.full((4, 6, 3), (255.0, 0.0, 0.0), dtype=np.float64), RED),  # floats in 0..255
        (np.full((4, 6), 0.5), (128, 128, 128)),  # H x W grayscale
        (np.full((4, 6, 1), 200, dtype=np.uint8), (200, 200, 200)),
        (np.full((4, 6, 4), (0, 0, 255, 0), dtype=np.uint8), WHITE),  # transparent: white
        (np.full((4, 6, 4), (0, 0, 255, 255), dtype=np.uint8), BLUE),
        (np.full((3, 4, 6), 255, dtype=np.uint8), WHITE),  # channels first
        (np.ones((4, 6), dtype=bool), WHITE),
    ],
)
def test_numpy_arrays(array, expected):
    loaded = load_image(array)
    assert loaded.mode == "RGB" and loaded.size == (6, 4)
    assert _close(_pixel(loaded, (0, 0)), expected, tol=1)


def test_pil_images_of_any_mode():
    for mode in ("1", "L", "LA", "P", "I", "F", "I;16", "CMYK", "YCbCr", "RGB", "RGBA"):
        loaded = load_image(Image.new(mode, (3, 2)))
        assert loaded.mode == "RGB" and loaded.size == (3, 2), mode


def test_premultiplied_la_loads_like_rgba():
    """Mode La (grey, premultiplied alpha) is read as its RGBa twin is: unpremultiplied, alpha
    dropped (Pillow converts La to nothing but LA)."""
    grey = Image.merge("LA", (Image.linear_gradient("L").resize((8, 8)), Image.new("L", (8, 8), 160)))
    rgba = Image.merge("RGBA", (*[grey.getchannel("L")] * 3, grey.getchannel("A")))
    from_la = np.asarray(load_image(grey.convert("La")), dtype=int)
    from_rgba = np.asarray(load_image(rgba.convert("RGBa")), dtype=int)
    assert from_la.shape == (8, 8, 3) and np.abs(from_la - from_rgba).max() <= 1


def _exif_tiff_start(exif: bytes) -> int:
    return max(exif.find(b"MM\x00*"), exif.find(b"II*\x00"))


@pytest.mark.parametrize(
    "fmt, damage",
    [("JPEG", "entry"), ("PNG", "entry"), ("WEBP", "entry"), ("PNG", "tiff header"), ("WEBP", "tiff header")],
)
def test_a_photo_with_malformed_exif_is_read_unrotated(tmp_path, fmt, damage):
    """Its pixels decode; only the orientation cannot be read (Pillow raised struct.error, or
    SyntaxError 'not a TIFF file', from exif_transpose): the photo is used as stored."""
    image = Image.new("RGB", (60, 30), RED)
    image.paste(BLUE, (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"  # the orientation would rotate it, if it could be read
    raw = bytearray(exif.tobytes())
    start = _exif_tiff_start(bytes(raw))
    if damage == "tiff header":
        raw[start : start + 2] = b"XX"
    else:
        raw[start + 11] = 0  # the first entry (Make, text) becomes ImageWidth, which is a number
    path = tmp_path / f"odd.{fmt.lower()}"
    image.save(path, fmt, exif=bytes(raw), **({"quality": 95} if fmt != "PNG" else {}))
    loaded = load_image(path)
    assert loaded.size == (60, 30)  # unrotated
    assert _close(_pixel(loaded, (5, 15)), RED) and _close(_pixel(loaded, (55, 15)), BLUE)


def _seed_files() -> dict[str, bytes]:
    """Small files of each format, with EXIF where the format has it."""
    image = Image.new("RGB", (24, 16), (200, 30, 30))
    image.paste(BLUE, (0, 3, 12, 6))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    files = {}
    for fmt, options in [
        ("JPEG", {"exif": exif}),
        ("PNG", {"exif": exif}),
        ("WEBP", {"exif": exif}),
        ("GIF", {}),
        ("TIFF", {}),
        ("BMP", {}),
    ]:
        buffer = io.BytesIO()
        (image.convert("P") if fmt == "GIF" else image).save(buffer, fmt, **options)
        files[fmt] = buffer.getvalue()
    return files


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    """A few bytes changed (half the time inside the EXIF block), cut short, or bytes inserted
    or deleted."""
    data = bytearray(data)
    start = _exif_tiff_start(bytes(data))
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            inside_exif = start >= 0 and rng.random() < 0.5
            at = start + rng.randrange(min(40, len(data) - start)) if inside_exif else None
            at = rng.randrange(len(data)) if at is None else at
            data[at] = rng.randrange(256)
    elif kind == 1:
        data = data[: rng.randrange(1, len(data))]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]
    return bytes(data)


def test_corrupted_files_load_or_raise_image_load_error(tmp_path):
    """Fuzzing, bounded: 6 formats x 60 corrupted copies (fixed seed), each read in a fraction of
    a second. Every one is either an RGB image or an ImageLoadError naming the file, never
    another exception (a red-team run of 253,000 found struct.error, SyntaxError, TypeError)."""
    rng = random.Random(33)
    outcomes: dict[str, int] = {"loaded": 0, "refused": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on the damage it works around
        for fmt, data in _seed_files().items():
            for case in range(60):
                path = tmp_path / f"case{case}.{fmt.lower()}"
                path.write_bytes(_corrupt(data, rng))
                try:
                    loaded = load_image(path)
                except ImageLoadError as err:
                    assert str(path) in str(err)
                    outcomes["refused"] += 1
                else:
                    assert loaded.mode == "RGB" and min(loaded.size) > 0
                    outcomes["loaded"] += 1
    assert outcomes["loaded"] > 30 and outcomes["refused"] > 30, outcomes


# ----------------------------------------------------------------------------- bad inputs


def _assert_error(source, *fragments, **kwargs):
    with pytest.raises(ImageLoadError) as err:
        load_image(source, **kwargs)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_text_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 20)
    _assert_error(path, "notes.jpg", "not a recognised image")


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:2000])
    _assert_error(path, "cut.jpg")


def test_empty_missing_and_folder(tmp_path):
    empty = tmp_path / "empty.png"
    empty.touch()
    _assert_error(empty, "empty.png", "empty")
    _assert_error(tmp_path / "missing.jpg", "missing.jpg", "does not exist")
    _assert_error(str(tmp_path / "missing.jpg"), "missing.jpg")
    _assert_error(tmp_path, str(tmp_path), "folder")


def test_decompression_bomb_by_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    _assert_error(path, "big.png", "decompression bomb", max_pixels=50_000)
    _assert_error(np.zeros((300, 200, 3), np.uint8), "decompression bomb", max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height: a few bytes that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(9000, 9000), (100_000, 100_000)])
def test_decompression_bomb_by_header(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(width, height))
    assert path.stat().st_size < 100
    _assert_error(path, "bomb.png", "decompression bomb")


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((5, 6, 2), np.uint8), "expected an H x W"),
        (np.zeros((0, 6, 3), np.uint8), "no pixels"),
        (np.full((4, 6), np.nan), "NaN"),
        (np.zeros((2, 4, 6, 3), np.uint8), "expected an H x W"),
    ],
)
def test_bad_arrays(array, fragment):
    _assert_error(array, "numpy array", fragment)


def test_unsupported_type():
    _assert_error(12345, "int object: not an image: expected a file path, a PIL image, a numpy array")
    _assert_error(None, "None: not an image")


def test_torch_tensors_are_read_like_arrays():
    import torch

    hwc = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    from_array = np.asarray(load_image(hwc))
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(hwc))), from_array)
    assert np.array_equal(np.asarray(load_image(torch.from_numpy(hwc).permute(2, 0, 1))), from_array)
    assert load_image(torch.zeros(3, 8, 5, dtype=torch.bfloat16)).size == (5, 8)
    _assert_error(torch.zeros(2, 2, 2, 2), "torch tensor (2, 2, 2, 2) float32", "expected an H x W")


def test_symlink_loop_is_named_as_such(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    _assert_error(loop, "symbolic link loop")
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "gone.jpg")
    _assert_error(broken, "broken link")
