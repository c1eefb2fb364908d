"""Steering attention toward a region: "caption this part of the photo".

A box (x0, y0, x1, y1) in the input image's pixels, or a boolean mask of the image's size,
becomes one weight per annotation-grid cell: the share of the cell inside the region. The
encoder squashes the whole image to a square, so cell (i, j) of an h x w grid covers the
image's columns [j W / w, (j + 1) W / w) and rows [i H / h, (i + 1) H / h), whatever the
aspect ratio. Decoding then adds `strength x weight` to the attention scores before the
softmax at every word, and starts the LSTM from the annotations averaged with the same
softmax (instead of the plain mean), so the first words are about the region too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Box = Sequence[float]
Focus = Box | np.ndarray  # a box, or a boolean mask (H, W)
# The default strength: captioner.model.options.DEFAULT_FOCUS_STRENGTH (torch-free, for the flags).


def check_box(box: Box, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box as four floats, or a ValueError saying what is wrong with it."""
    width, height = image_size
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"focus box must be four numbers (x0, y0, x1, y1), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"focus box {box!r} holds NaN or infinite values")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"focus box {box!r} must have x0 < x1 and y0 < y1 (left, top, right, bottom) "
                         "and a non-zero area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"focus box {box!r} reaches outside the {width}x{height} image")
    return x0, y0, x1, y1


def _overlap(low: float, high: float, extent: int, cells: int) -> torch.Tensor:
    """Share of each of `cells` equal cells spanning [0, extent) that lies inside [low, high)."""
    edges = torch.linspace(0, extent, cells + 1, dtype=torch.float64)
    inside = (torch.minimum(edges[1:], torch.tensor(high)) - torch.maximum(edges[:-1], torch.tensor(low)))
    return (inside.clamp(min=0) / (extent / cells)).float()


def focus_weights(focus: Focus, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Region -> (h * w,) weights in [0, 1], row-major like the annotation grid."""
    width, height = image_size
    rows, cols = grid
    if isinstance(focus, np.ndarray) or torch.is_tensor(focus):
        mask = torch.as_tensor(np.asarray(focus))
        if mask.dtype != torch.bool or tuple(mask.shape) != (height, width):
            raise ValueError(f"focus mask must be a boolean array of the image's size ({height}, {width}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if not mask.any():
            raise ValueError("focus mask selects no pixel")
        weights = F.adaptive_avg_pool2d(mask.float()[None, None], (rows, cols))[0, 0]
        return weights.flatten()
    x0, y0, x1, y1 = check_box(focus, image_size)
    return (_overlap(y0, y1, height, rows)[:, None] * _overlap(x0, x1, width, cols)[None, :]).flatten()


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"focus_strength must be a finite number >= 0, got {strength!r}")
    return float(strength)
