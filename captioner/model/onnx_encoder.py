"""The encoder on ONNX Runtime: what runs it on a CPU.

`runtime_encoder(encoder)` is what inference calls: on a CPU an OnnxEncoder, elsewhere (CUDA) the
plain eager Encoder. An OnnxEncoder computes exactly Encoder.forward(images) (pixels (B, 3, S, S) ->
grid (B, L, D), any B), or with until_stage=K the activations entering stage K (a stage cache's
rows), with onnxruntime: it folds the batch norms, plans the memory and picks blocked convolution
kernels itself, ~2x faster than eager PyTorch on a CPU (docs/benchmarks.md).

Where the .onnx lives: made on first use (the legacy TorchScript exporter, ~1 s for the shipped
encoder) and cached by a digest of the weights (captioner.model.onnx_runtime); later loads read
it (~0.1 s). (The int8 graph of quantize=True is the exception: it needs calibration photos, so
it is made once into the model folder; captioner.model.quantize.)
"""

from __future__ import annotations

import copy
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import Conv2dSame, get_same_padding
from torch import nn
from torchvision import transforms

from captioner.model.encoder import Encoder, build_transform
from captioner.model.onnx_runtime import load_or_export, ort_session, weights_digest

INPUT, OUTPUT = "pixels", "grid"
OPSET = 17
EXPORT_FORMAT = 2  # bump when the exported graph changes for the same weights


def _exported_module(encoder: Encoder, until_stage: int | None) -> nn.Module:
    """What the graph computes: the whole Encoder, or its stages before until_stage."""
    if until_stage is None:
        return encoder
    encoder.check_stage(until_stage)
    return nn.Sequential(*encoder.stages[:until_stage])


def graph_name(encoder: Encoder, until_stage: int | None = None) -> str:
    """The cache file's name: what the graph computes, and a digest of everything that changes it
    (weights and batch-norm statistics, sizes, the exporter's version and settings)."""
    what = f"{encoder.grid_size}x{encoder.grid_size}" if until_stage is None else f"stage{until_stage}"
    digest = weights_digest(
        _exported_module(encoder, until_stage), EXPORT_FORMAT, OPSET, encoder.image_size, what
    )
    return f"{encoder.backbone_name}-{encoder.image_size}px-{what}-{digest}.onnx"


def _with_static_padding(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """Replace timm's TF "same" convolutions (Conv2dSame), which compute their padding from the
    input's size at run time, by a constant ZeroPad2d and a plain Conv2d. The image size is fixed,
    so nothing changes but the graph: the legacy exporter wrote each run-time pad as Shape and Pad
    nodes that onnxruntime can neither fold nor run in its blocked layout (~15 % of the shipped
    encoder's time, docs/benchmarks.md); a constant pad it folds into the convolution."""
    input_sizes: dict[nn.Module, torch.Size] = {}

    def record_size(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        input_sizes[layer] = inputs[0].shape[-2:]

    same = [layer for layer in module.modules() if isinstance(layer, Conv2dSame)]
    hooks = [layer.register_forward_pre_hook(record_size) for layer in same]
    with torch.no_grad():
        module(example)
    for hook in hooks:
        hook.remove()
    for parent in list(module.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, Conv2dSame) and layer in input_sizes:
                setattr(parent, name, _constant_padding(layer, input_sizes[layer]))
    return module


def _constant_padding(layer: nn.Conv2d, input_size: torch.Size) -> nn.Sequential:
    """The Conv2dSame `layer` for inputs of `input_size` (H, W): its TF "same" pads, then a Conv2d."""
    pad_h, pad_w = (
        get_same_padding(input_size[axis], layer.kernel_size[axis], layer.stride[axis], layer.dilation[axis])
        for axis in (0, 1)
    )
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        kernel_size=(layer.kernel_size[0], layer.kernel_size[1]),
        stride=(layer.stride[0], layer.stride[1]),
        padding=0,
        dilation=(layer.dilation[0], layer.dilation[1]),
        groups=layer.groups,
        bias=layer.bias is not None,
    )
    conv.load_state_dict(layer.state_dict())
    return nn.Sequential(nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)), conv)


def export_onnx(encoder: Encoder, until_stage: int | None = None, static_padding: bool = False) -> bytes:
    """The encoder (or its stages before until_stage) as an ONNX model, batch axis dynamic.

    The legacy TorchScript exporter by default (~1 s for the shipped encoder), with timm's TF
    "same" padding made constant first. static_padding=True: torch.export instead (12-15 s),
    which writes the padding into the convolutions itself: the int8 quantizer
    (captioner.model.quantize) starts from that one (from the legacy graph, with its Pad nodes,
    the same calibration gave grids further from fp32: median cosine 0.92 against 0.97)."""
    module = copy.deepcopy(_exported_module(encoder, until_stage)).cpu().float().eval()
    example = torch.zeros(2, 3, encoder.image_size, encoder.image_size)
    if not static_padding:
        module = _with_static_padding(module, example)
    with (
        tempfile.TemporaryDirectory() as folder,
        torch.inference_mode(False),
        torch.no_grad(),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        path = Path(folder) / "encoder.onnx"
        names: dict[str, Any] = {"input_names": [INPUT], "output_names": [OUTPUT]}
        if static_padding:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=18,
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
                **names,
            )
            assert program is not None  # dynamo=True always returns the program
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                module,
                (example,),
                path,
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                **names,
            )
        return path.read_bytes()


class OnnxEncoder(nn.Module):
    """Encoder.forward(images) on ONNX Runtime (CPU): the same inputs and (B, L, D) grids as torch
    tensors; with until_stage=K the (B, C, H, W) activations entering stage K instead.
    graph: an .onnx file (or its bytes) to run instead (the int8 graph of captioner.model.quantize),
    whose output `stage_output`, if named, with_stage_input() also returns.

    The graph is made from the encoder's weights at the first call (or prepare()): build a new
    OnnxEncoder after changing them. threads: intra-op threads (default $CAPTIONER_ORT_THREADS, else
    torch's thread count). cache: the folder holding onnx/ (default cache_dir()).
    """

    def __init__(
        self,
        encoder: Encoder,
        until_stage: int | None = None,
        threads: int | None = None,
        cache: str | Path | None = None,
        graph: Path | bytes | None = None,
        stage_output: str | None = None,
    ):
        super().__init__()
        if until_stage is not None:
            encoder.check_stage(until_stage)
        self._encoder = [encoder]  # in a list: not a submodule (no parameters of its own here)
        self.until_stage, self.threads = until_stage, threads
        self.cache = Path(cache) if cache is not None else None
        self.graph, self.stage_output = graph, stage_output
        self.backbone_name, self.image_size = encoder.backbone_name, encoder.image_size
        self.grid_size, self.feature_dim = encoder.grid_size, encoder.feature_dim
        self.origin: str | None = None  # "cache", "exported", "memory" or "file" once prepared
        self._session: Any = None
        self._lock = threading.Lock()
        self.eval()

    @property
    def transform(self) -> transforms.Compose:
        return build_transform(self.backbone_name, self.image_size)

    def prepare(self) -> OnnxEncoder:
        """Load (or export) the graph and open the session now rather than at the first call."""
        with self._lock:
            if self._session is None:
                model, self.origin = (
                    (self.graph, "file")
                    if self.graph is not None
                    else load_or_export(
                        graph_name(self._encoder[0], self.until_stage),
                        lambda: export_onnx(self._encoder[0], self.until_stage),
                        self.cache,
                    )
                )
                self._session = ort_session(model, self.threads)
        return self

    def metadata(self) -> dict[str, str]:
        """The graph's custom metadata (the int8 graph records the weights it was made from)."""
        return dict(self.prepare()._session.get_modelmeta().custom_metadata_map)

    def train(self, mode: bool = True) -> OnnxEncoder:
        if mode:
            raise RuntimeError("OnnxEncoder is for inference only: train the Encoder it was built from")
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (grid,) = self._run(images, [OUTPUT])
        return grid

    def with_stage_input(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid and the graph's `stage_output`, the activations entering a stage (B, C, H, W),
        from one pass (what the evidence needs: captioner.model.evidence)."""
        if self.stage_output is None:
            raise ValueError("this OnnxEncoder was made without a stage_output")
        grid, stage_input = self._run(images, [OUTPUT, self.stage_output])
        return grid, stage_input

    def _run(self, images: torch.Tensor, outputs: list[str]) -> list[torch.Tensor]:
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"OnnxEncoder expects images (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if self._session is None:
            self.prepare()
        pixels = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        return [torch.from_numpy(out) for out in self._session.run(outputs, {INPUT: pixels})]


def runtime_encoder(encoder: Encoder, until_stage: int | None = None) -> nn.Module:
    """What inference runs for `encoder`: OnnxEncoder on a CPU, the eager Encoder (or its stages
    before until_stage) on another device. Either maps pixels to what Encoder.forward returns (or
    the activations entering stage until_stage)."""
    if next(encoder.parameters()).device.type == "cpu":
        return OnnxEncoder(encoder, until_stage)
    return _exported_module(encoder, until_stage).eval()
