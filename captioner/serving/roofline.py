"""How fast the encoder could be on this CPU: its multiply-adds against the core's best matrix
product, so that `captioner benchmark` can tell a slow runtime from a target the hardware cannot meet.

An EfficientNet's 1x1 convolutions are matrix products and hold ~90% of its multiply-adds; no
runtime runs them faster than one large, cache-friendly product of the same precision on the same
threads. That product's rate on onnxruntime (fp32 MatMul; MatMulInteger of uint8 by int8, the
kernels quantize=True runs) divided into the 1x1 convolutions' multiply-adds is
a floor under the encoder's time; depthwise convolutions and the rest only add to it.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

from captioner.model.onnx_runtime import ort_session

GEMM_SIDE = 2048  # (S x S) @ (S x S): large enough to run at the kernels' best rate
GEMM_RUNS = 5


def conv_macs(module: nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    """Multiply-adds of module's Conv2d layers on `pixels`, by kind: "1x1", "depthwise" and
    "other" (the stem and any k x k dense convolution)."""
    macs = {"1x1": 0.0, "depthwise": 0.0, "other": 0.0}

    def count(layer: nn.Conv2d, _inputs: object, output: torch.Tensor) -> None:
        window = layer.kernel_size[0] * layer.kernel_size[1]
        kind = "depthwise" if layer.groups > 1 else "1x1" if window == 1 else "other"
        macs[kind] += output.numel() * window * layer.in_channels // layer.groups

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            module(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def _matmul_graph(side: int, int8: bool) -> bytes:
    """An ONNX graph of one product of two (side x side) matrices: fp32, or u8 x s8 -> s32."""
    from onnx import TensorProto, ValueInfoProto, helper

    def square(name: str, dtype: int) -> ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, [side, side])

    kinds = (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT,) * 3
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["y"])],
        "matmul",
        [square("a", kinds[0]), square("b", kinds[1])],
        [square("y", kinds[2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_rates(threads: int, side: int = GEMM_SIDE) -> dict[str, float]:
    """This CPU's large-matrix-product rate in GMAC/s on `threads` onnxruntime threads, "fp32" and
    "int8" (uint8 activations x int8 weights): the kernels the encoder's graphs run."""
    rng = np.random.default_rng(0)
    feeds = {
        "fp32": {name: rng.standard_normal((side, side), dtype=np.float32) for name in "ab"},
        "int8": {
            "a": rng.integers(0, 256, (side, side), dtype=np.uint8),
            "b": rng.integers(-127, 128, (side, side), dtype=np.int8),
        },
    }
    rates = {}
    for precision, feed in feeds.items():
        session = ort_session(_matmul_graph(side, precision == "int8"), threads)
        session.run(None, feed)  # warm-up: thread start, buffers
        seconds = []
        for _ in range(GEMM_RUNS):
            start = time.perf_counter()
            session.run(None, feed)
            seconds.append(time.perf_counter() - start)
        rates[precision] = side**3 / statistics.median(seconds) / 1e9
    return rates


def encoder_floors(macs: dict[str, float], rates: dict[str, float]) -> dict[str, float]:
    """Milliseconds the 1x1 convolutions alone need at each precision's rate: no encoder of that
    precision runs faster on this CPU."""
    return {precision: macs["1x1"] / (rate * 1e9) * 1000 for precision, rate in rates.items()}
