"""The decoder's step on ONNX Runtime: what writes the words on a CPU.

Beam search calls `decoder.step` once per word for a few rows (beams x images). In eager PyTorch
such a step is ~40 small ops, each with its own dispatch, and matrix products of a few rows, which
re-pack every weight matrix on each call: 7 ms a step for 5 beams of the shipped model on one core.
onnxruntime packs the weights once, fuses the element-wise ops and runs the same step in ~2.5 ms
(docs/benchmarks.md). `runtime_decoder(decoder)` is what inference calls: on a CPU an OnnxDecoder
for a soft-attention AttentionDecoder; otherwise (CUDA, hard attention, an ensemble, an int8
decoder) the decoder itself. Only `step` moves: `prepare` and `init_state` run once per image in
torch (with quantize=True, in torch's int8 copy of the decoder), and beam search
(captioner.model.decoding) is the same one.

The graph is exported from the weights on first use (the legacy TorchScript exporter, ~0.3 s) and
cached by their digest like the encoder's (captioner.model.onnx_runtime). quantize=True makes its
int8 twin from it with onnxruntime's dynamic quantization (int8 weights, activations quantized per
call: no calibration needed, so it too is made on first use); the per-image projections of the
grid (prepare: 196 x 1280 -> 512, then the attention's keys) run in torch's dynamic int8 layers,
2.4 ms against 4.2 on one core; where the step cannot move, those layers do everything
(quantize_decoder).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from captioner.model.attention import HardAttention
from captioner.model.decoder import AttentionDecoder, State
from captioner.model.onnx_runtime import load_or_export, ort_session, weights_digest

DecoderModule = TypeVar("DecoderModule", bound=nn.Module)
INPUTS = ("annotations", "keys", "words", "h", "c", "focus")
OUTPUTS = ("logits", "next_h", "next_c", "alpha", "gate")
OPSET = 17
EXPORT_FORMAT = 3  # bump when the exported graph changes for the same weights


class _Step(nn.Module):
    """AttentionDecoder.step with flat tensor inputs and outputs, as the exporter wants them."""

    def __init__(self, decoder: AttentionDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, annotations, keys, words, h, c, focus):
        logits, (h, c), alpha, gate = self.decoder.step(annotations, keys, words, (h, c), focus)
        return logits, h, c, alpha, gate


def supported(decoder: nn.Module) -> bool:
    """Whether the step exports as is: a float AttentionDecoder with soft attention (hard
    attention's sampled cells, ensembles and int8 layers stay in torch)."""
    return (
        isinstance(decoder, AttentionDecoder)
        and not isinstance(decoder.attention, HardAttention)
        and type(decoder.lstm) is nn.LSTMCell
        and all(p.dtype == torch.float32 for p in decoder.parameters())
    )


def export_step(decoder: AttentionDecoder) -> bytes:
    """decoder.step as an ONNX model, rows and cells dynamic. Exported without gradients, so the
    graph holds the decoder's word tables (AttentionDecoder._word_tables) as constants."""
    module = _Step(copy.deepcopy(decoder).cpu().float().eval())  # export must not touch the live decoder
    images, rows, cells = 2, 4, 4  # two rows (beams) per image
    annotations = torch.zeros(images, cells, _annotation_dim(decoder))
    with torch.inference_mode(False), torch.no_grad():
        keys = module.decoder.attention.prepare(annotations)
        hidden = torch.zeros(rows, decoder.lstm.hidden_size)
        example = (
            annotations,
            keys,
            torch.zeros(rows, dtype=torch.long),
            hidden,
            hidden,
            torch.zeros(rows, cells),
        )
        dynamic = {name: {0: "rows"} for name in INPUTS + OUTPUTS}
        for name in ("focus", "alpha"):
            dynamic[name] = {0: "rows", 1: "cells"}
        for name in ("annotations", "keys"):
            dynamic[name] = {0: "images", 1: "cells"}
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            path = Path(folder) / "step.onnx"
            torch.onnx.export(
                module,
                example,
                path,
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_axes=dynamic,
            )
            return path.read_bytes()


def quantize_step(graph: bytes) -> bytes:
    """The step's int8 twin: onnxruntime's dynamic quantization of its weight products (int8
    weights, per tensor; activations quantized at run time). Only products whose second operand
    is the weight: the attention's scores (v^T E^T, the weight first) stay fp32, since quantizing
    the (R, L, A) energy at every step would cost more than the int8 product saves."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "step.onnx", Path(folder) / "step_int8.onnx"
        source.write_bytes(graph)
        logging.disable(logging.WARNING)  # its advice to pre-process, meant for convolution graphs
        try:
            quantize_dynamic(
                source, target, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True}
            )
        finally:
            logging.disable(logging.NOTSET)
        return target.read_bytes()


def quantize_decoder(decoder: DecoderModule) -> DecoderModule:
    """torch's dynamic int8 quantization of the decoder's Linear and LSTM layers: quantize=True
    where the step does not run on onnxruntime. A copy of the same class: only its nn.Linear and
    LSTMCell submodules are swapped (exactly those types: the attention's EnergyScore stays float)."""
    with warnings.catch_warnings():  # torch.ao's eager quantization API announces its successor
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            decoder, {torch.nn.Linear, torch.nn.LSTMCell}, dtype=torch.qint8
        )


def _annotation_dim(decoder: AttentionDecoder) -> int:
    """A, the size of the annotation vectors step() attends over."""
    return decoder.lstm.input_size - decoder.embedding.weight.shape[1]


def graph_name(decoder: AttentionDecoder, quantize: bool = False) -> str:
    precision = "int8" if quantize else "fp32"
    digest = weights_digest(decoder, EXPORT_FORMAT, OPSET, type(decoder.attention).__name__)
    return f"decoder-step-{len(decoder.embedding.weight)}words-{precision}-{digest}.onnx"


class OnnxDecoder:
    """The Decoder protocol (captioner.model.decoder) of an AttentionDecoder with `step` on
    onnxruntime: the same logits, state, alpha and gate within float32 rounding (quantize=True:
    its int8 twin, approximately the same).

    The graph is made from the decoder's weights at the first step (or prepare_graph()): build a
    new OnnxDecoder after changing them. threads: intra-op threads (default
    $CAPTIONER_ORT_THREADS, else torch's thread count); cache: the folder holding onnx/ (default:
    the user's cache).
    """

    def __init__(
        self,
        decoder: AttentionDecoder,
        threads: int | None = None,
        cache: str | Path | None = None,
        quantize: bool = False,
    ):
        if not supported(decoder):
            attention = type(getattr(decoder, "attention", None)).__name__
            raise ValueError(
                "OnnxDecoder runs a float AttentionDecoder with soft attention, not "
                f"{type(decoder).__name__} with {attention}"
            )
        self.decoder = decoder
        self.threads, self.quantize = threads, quantize
        self.cache = Path(cache) if cache is not None else None
        self.origin: str | None = None  # "cache", "exported" or "memory" once prepared
        self._session: Any = None
        self._per_image: Any = None  # what runs prepare and init_state: the decoder or its int8 copy
        self._lock = threading.Lock()

    def prepare_graph(self) -> OnnxDecoder:
        """Load (or export) the graph and open the session now rather than at the first step."""
        with self._lock:
            if self._session is None:
                model, self.origin = load_or_export(
                    graph_name(self.decoder, self.quantize), self._export, self.cache
                )
                self._session = ort_session(model, self.threads)
                self._per_image = quantize_decoder(self.decoder) if self.quantize else self.decoder
        return self

    def _export(self) -> bytes:
        graph = export_step(self.decoder)
        return quantize_step(graph) if self.quantize else graph

    @property
    def reads_attributes(self) -> bool:
        return self.decoder.reads_attributes

    def prepare(
        self, features: torch.Tensor, attributes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare_graph()._per_image.prepare(features, attributes)

    def init_state(self, features: torch.Tensor, focus: torch.Tensor | None = None) -> State:
        return self.prepare_graph()._per_image.init_state(features, focus)

    def step(self, features, keys, words, state: State, focus=None):
        """AttentionDecoder.step, the same arguments: logits (R, V), the new state, alpha (R, L)
        and the gate (R,)."""
        if self._session is None:
            self.prepare_graph()
        if focus is None:
            focus = features.new_zeros(len(words), features.shape[1])
        inputs = (features, keys, words, *state, focus)
        feed = {name: _array(t) for name, t in zip(INPUTS, inputs, strict=True)}
        logits, h, c, alpha, gate = (torch.from_numpy(a) for a in self._session.run(list(OUTPUTS), feed))
        return logits, (h, c), alpha, gate


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def runtime_decoder(decoder: nn.Module, quantize: bool = False, threads: int | None = None) -> Any:
    """What inference decodes with: on a CPU an OnnxDecoder for a supported decoder (int8 with
    quantize), else the decoder itself (quantize: its torch int8 copy); elsewhere (CUDA) the
    decoder itself."""
    if next(decoder.parameters()).device.type != "cpu":
        return decoder
    if supported(decoder):
        return OnnxDecoder(decoder, threads, quantize=quantize)  # type: ignore[arg-type]  # supported() checked it
    return quantize_decoder(decoder) if quantize else decoder
