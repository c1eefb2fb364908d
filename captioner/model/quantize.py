"""The int8 encoder: `quantize=True` on a CPU runs a statically quantized ONNX graph of the encoder.

The recipe keeps the most of the captions of those tried for issue #36 (docs/benchmarks.md): the
graph from torch.export (the one the shipped graph was calibrated from; before the legacy export
made timm's padding constant, its run-time padding came out of the quantizer as a 13x13 grid),
QDQ format, per-channel symmetric int8 weights (per-tensor kept 25 of 100 captions), uint8
activations from min-max ranges over photos like the ones to caption, read CALIBRATION_CHUNK at
a time (bounded memory), and the first convolution kept in fp32: on AVX2 CPUs its pixels x large
batch-norm-folded weights saturate the int8 kernels' 16-bit sums and some photos lose their grid.
With the int8 decoder (step and per-image projections) it scores the Flickr8k dev split about as
float32 does (CIDEr 59.40 against 59.54), so it is the CPU default where a model folder has the graph.

Calibration needs photos, which a user of quantize=True may not have: the graph is made once (by
`captioner export SRC DST --quantize --calibration-images DIR`) into the model folder as
encoder_int8.onnx, stamped with a digest of the encoder's weights, and only read afterwards (a
read-only install works). The shipped model carries one calibrated on Flickr8k training photos.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from captioner.files import atomic_write
from captioner.model.encoder import Encoder
from captioner.model.onnx_encoder import INPUT, OnnxEncoder, export_onnx
from captioner.model.onnx_runtime import hash_tensors

INT8_FILE = "encoder_int8.onnx"
DIGEST_KEY = "captioner.encoder_digest"  # the graph's metadata: which weights it was made from
CALIBRATION_CHUNK = 8  # photos the calibrator holds at once (~0.3 GB of activations each at 448 px)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Int8EncoderError(ValueError):
    """quantize=True without a usable int8 graph: none in the model folder, or one made from
    other weights. The message says how to make it."""


def encoder_digest(encoder: Encoder) -> str:
    """sha256 of what the graph computes: backbone, sizes and every weight and statistic."""
    digest = hashlib.sha256(f"{encoder.backbone_name}:{encoder.image_size}:{encoder.grid_size}".encode())
    hash_tensors(digest, encoder)
    return digest.hexdigest()


def calibration_photos(folder: str | Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"calibration images: {folder} is not a folder")
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise ValueError(f"calibration images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return photos


Preprocess = Callable[[Path], torch.Tensor]  # a photo file -> pixels (3, S, S), as caption() sees it


class PhotoReader:
    """onnxruntime's calibration data reader over photo files, one preprocessed photo at a time,
    within the range the calibrator asks for (it calibrates CALIBRATION_CHUNK photos per pass)."""

    def __init__(self, photos: Sequence[Path], preprocess: Preprocess):
        self.photos, self.preprocess = list(photos), preprocess
        self.set_range(0, len(self.photos))

    def __len__(self) -> int:
        return len(self.photos)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, min(end_index, len(self.photos))

    def get_next(self) -> dict[str, Any] | None:
        if self.next >= self.end:
            return None
        pixels = self.preprocess(self.photos[self.next])  # (3, S, S)
        self.next += 1
        return {INPUT: pixels.unsqueeze(0).numpy()}

    def rewind(self) -> None:
        self.set_range(0, len(self.photos))


def quantize_encoder(
    encoder: Encoder, photos: Sequence[Path], preprocess: Preprocess, target: str | Path
) -> Path:
    """Write the int8 graph of `encoder` to `target` (atomically), calibrated on `photos` read by
    `preprocess`: the more and the more like the photos to caption, the better (256 Flickr8k
    photos: ~5 min)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not photos:
        raise ValueError("quantize_encoder: no calibration photos")
    target = Path(target)
    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        fp32.write_bytes(export_onnx(encoder, static_padding=True))
        graph = onnx.load(str(fp32)).graph
        first_layers = [node.name for node in graph.node if INPUT in node.input]  # kept fp32
        chunk = CALIBRATION_CHUNK if len(photos) % CALIBRATION_CHUNK == 0 else len(photos)
        logging.disable(logging.WARNING)  # its advice to pre-process: this graph is already folded
        try:
            quantize_static(
                str(fp32),
                str(int8),
                PhotoReader(photos, preprocess),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=first_layers,
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": False,
                    "CalibStridedMinMax": chunk,
                },
            )
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(int8))
        onnx.helper.set_model_props(
            model, {DIGEST_KEY: encoder_digest(encoder), "captioner.calibration_photos": str(len(photos))}
        )
        atomic_write(target, lambda tmp: onnx.save(model, tmp))
    return target


def stage_input_name(graph: Any, stage: int) -> str | None:
    """The tensor entering `stage` (an EfficientNet's block group stage - 1) in an exported graph:
    the activation input of the first convolution whose weight belongs to that group."""
    prefix = f"body.blocks.{stage - 1}."
    for node in graph.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1].startswith(prefix):
            return str(node.input[0])
    return None


def _with_stage_output(path: Path, stage: int) -> tuple[bytes, str] | None:
    """The graph with the activations entering `stage` as a second output, or None if not found."""
    import onnx

    model = onnx.load(str(path))
    name = stage_input_name(model, stage)
    if name is None:
        return None
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString(), name


def int8_encoder(
    encoder: Encoder, folder: str | Path | None, threads: int | None = None, stage_output: int | None = None
) -> OnnxEncoder:
    """The int8 graph in the model folder, checked to be made from `encoder`'s weights. With
    `stage_output` K, its with_stage_input() also returns the activations entering stage K (if
    the graph has that stage's block group), so that the evidence comes from the same pass."""
    path = Path(folder) / INT8_FILE if folder is not None else None
    if path is None or not path.is_file():
        where = f"the model folder {folder}" if folder is not None else "a model folder (this model has none)"
        raise Int8EncoderError(
            f"quantize=True needs the int8 encoder {INT8_FILE} in {where}: make it once with "
            f"`captioner export MODEL_FOLDER TARGET_FOLDER --quantize --calibration-images PHOTO_FOLDER` "
            "(a few hundred photos like the ones to caption)"
        )
    graph = _with_stage_output(path, stage_output) if stage_output is not None else None
    if graph is None:
        runner = OnnxEncoder(encoder, graph=path, threads=threads).prepare()
    else:
        runner = OnnxEncoder(encoder, graph=graph[0], threads=threads, stage_output=graph[1]).prepare()
    if runner.metadata().get(DIGEST_KEY) != encoder_digest(encoder):
        raise Int8EncoderError(
            f"{path} was made from other encoder weights than this model's: make it again with "
            "`captioner export ... --quantize --calibration-images PHOTO_FOLDER`"
        )
    return runner


def copy_int8_encoder(encoder: Encoder, source: str | Path | None, target: str | Path) -> bool:
    """Copy the model folder's int8 graph into `target` (a saved copy of the model) if it was made
    from `encoder`'s weights; False when there is none to copy."""
    try:
        int8_encoder(encoder, source)
    except Int8EncoderError:
        return False
    data = (Path(source) / INT8_FILE).read_bytes()  # type: ignore[arg-type]  # int8_encoder checked it
    atomic_write(Path(target) / INT8_FILE, lambda tmp: Path(tmp).write_bytes(data))
    return True
