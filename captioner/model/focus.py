"""Steering attention toward a region: "caption this part of the photo".

A box (x0, y0, x1, y1) in the input image's pixels, or a boolean mask of the image's size,
becomes one weight per annotation-grid cell: the share of the cell inside the region. The
encoder squashes the whole image to a square, so cell (i, j) of an h x w grid covers the
image's columns [j W / w, (j + 1) W / w) and rows [i H / h, (i + 1) H / h), whatever the
aspect ratio. Decoding then adds `strength x weight` to the attention scores before the
softmax at every word, and starts the LSTM from the annotations averaged with the same
softmax (instead of the plain mean), so the first words are about the region too.

With evidence asked for (captioner.model.evidence), a focused caption's evidence is the box's:
the untuned ImageNet tail's output averaged over the region's cells, with the same weights,
instead of over the whole photo (`region_evidence`).
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from captioner.model.evidence import ImageNetEvidence
from captioner.model.options import check_focus_strength

Box = Sequence[float]
Focus = Box | np.ndarray | torch.Tensor  # a box (also a 1-D array or tensor), or a boolean mask (H, W)
# The default strength: captioner.model.options.DEFAULT_FOCUS_STRENGTH (torch-free, for the flags).
check_strength = check_focus_strength  # 0 <= strength <= MAX_FOCUS_STRENGTH, or a ValueError

_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxtuple = 6
_SHORT.maxstring = _SHORT.maxother = 40


def short_repr(value: object) -> str:
    """repr cut to a line: error messages quote the input, not 300 KB of it."""
    return _SHORT.repr(value)


def as_box(box: object) -> tuple[float, float, float, float]:
    """Four numbers (a sequence, or a 1-D numpy array or tensor) -> floats, or a ValueError: a
    string such as "0099" is not a box."""
    if isinstance(box, (np.ndarray, torch.Tensor)) and box.ndim == 1:
        box = box.tolist()
    values = list(box) if isinstance(box, Sequence) and not isinstance(box, (str, bytes)) else []
    numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)
    if len(values) != 4 or not numeric:
        raise ValueError(f"focus box must be four numbers (x0, y0, x1, y1), got {short_repr(box)}")
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


def check_box(box: object, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box as four floats, or a ValueError saying what is wrong with it."""
    width, height = image_size
    x0, y0, x1, y1 = as_box(box)
    box = short_repr(box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"focus box {box} holds NaN or infinite values")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"focus box {box} must have x0 < x1 and y0 < y1 (left, top, right, bottom) and a non-zero area"
        )
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(f"focus box {box} reaches outside the {width}x{height} image")
    return x0, y0, x1, y1


def _overlap(low: float, high: float, extent: int, cells: int) -> torch.Tensor:
    """Share of each of `cells` equal cells spanning [0, extent) that lies inside [low, high)."""
    edges = torch.linspace(0, extent, cells + 1, dtype=torch.float64)
    inside = torch.minimum(edges[1:], torch.tensor(high)) - torch.maximum(edges[:-1], torch.tensor(low))
    return (inside.clamp(min=0) / (extent / cells)).float()


def _as_mask(focus: object) -> torch.Tensor | None:
    """A mask as a tensor: an array or tensor of 2 or more dimensions, or a list of rows. None
    for anything else (a box)."""
    if isinstance(focus, torch.Tensor):
        return focus.detach().cpu() if focus.ndim != 1 else None
    if isinstance(focus, np.ndarray):
        return torch.as_tensor(focus) if focus.ndim != 1 else None
    if isinstance(focus, (list, tuple)) and focus and isinstance(focus[0], (list, tuple, np.ndarray)):
        try:
            return torch.as_tensor(np.asarray(focus))
        except ValueError:
            raise ValueError(f"focus mask rows differ in length ({len(focus)} rows)") from None
    return None


def focus_weights(focus: Focus, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Region -> (h * w,) weights in [0, 1], row-major like the annotation grid."""
    width, height = image_size
    rows, cols = grid
    mask = _as_mask(focus)
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (height, width):
            raise ValueError(
                f"focus mask must be a boolean array of the image's size ({height}, {width}), "
                f"got {str(mask.dtype).removeprefix('torch.')} {tuple(mask.shape)}"
            )
        if not mask.any():
            raise ValueError("focus mask selects no pixel")
        weights = F.adaptive_avg_pool2d(mask.float()[None, None], (rows, cols))[0, 0]
        return weights.flatten()
    x0, y0, x1, y1 = check_box(focus, image_size)
    return (_overlap(y0, y1, height, rows)[:, None] * _overlap(x0, x1, width, cols)[None, :]).flatten()


def region_evidence(
    head: ImageNetEvidence, stage_input: torch.Tensor, focus: torch.Tensor | None
) -> torch.Tensor:
    """ImageNet probabilities (B, 1000) of each photo's focus region: the untuned tail's output
    (B, C, h, w) on the activations entering its stage (B, C', h, w), pooled with the focus
    bias (B, L) (strength x the share of each annotation-grid cell inside the region) as weights
    instead of the plain mean. A photo without a region (a row of zeros) gets the whole photo's.
    Pooling the tail's output of the whole photo, not rerunning it on a crop, keeps the cost of a
    box at one weighted mean; scripts/evaluate_focus.py compares the two and a crop of the photo."""
    if focus is None:
        return head(stage_input)
    out = head.tail(stage_input).float()  # (B, C, h, w)
    side = math.isqrt(focus.shape[1])  # annotation grids are square
    cells = focus.float().clamp(min=0).view(-1, 1, side, side).to(out.device)
    weights = F.adaptive_avg_pool2d(cells, out.shape[-2:]).flatten(1)  # (B, h * w)
    weights[weights.sum(dim=1) <= 0] = 1.0  # no region: the whole photo
    weights = weights / weights.sum(dim=1, keepdim=True)
    pooled = torch.einsum("bcl,bl->bc", out.flatten(2), weights)  # (B, C)
    return torch.softmax(head.classifier(pooled).float() / head.temperature, dim=-1)
