"""Where the model looked: smooth attention heat maps over the image, and a grid of all words."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageFilter


def attention_heatmap(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) attention weights -> (H, W) smooth map in [0, 1] for an image of `size` (W, H).

    Bicubic upsampling plus a blur about one grid cell wide, so the map shows regions rather
    than the blocky cells of the feature grid.
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    cell = max(size[0] / alpha.shape[1], size[1] / alpha.shape[0])
    upsampled = Image.fromarray(alpha, mode="F").resize(size, Image.Resampling.BICUBIC)
    heat = np.asarray(upsampled, dtype=np.float32).clip(min=0)
    heat = heat / heat.max() if heat.max() > 0 else heat
    # Pillow only blurs 8-bit images; 256 levels are as many as a colour map shows anyway.
    levels = Image.fromarray((heat * 255).round().astype(np.uint8))
    heat = np.asarray(levels.filter(ImageFilter.GaussianBlur(radius=cell / 3)), dtype=np.float32)
    return heat / heat.max() if heat.max() > 0 else heat


def overlay_attention(
    image: Image.Image, alpha: np.ndarray, opacity: float = 0.6, colormap: str = "jet"
) -> Image.Image:
    """The image with one word's attention drawn over it as a coloured heat map."""
    image = image.convert("RGB")
    heat = attention_heatmap(alpha, image.size)
    colours = colormaps[colormap](heat)[..., :3]  # (H, W, 3) in [0, 1]
    weight = opacity * (0.25 + 0.75 * heat[..., None])  # hot regions show more colour
    blended = np.asarray(image, dtype=np.float32) / 255 * (1 - weight) + colours * weight
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def attention_figure(
    image: Image.Image,
    words: Sequence[str],
    attention: np.ndarray,
    columns: int = 5,
    opacity: float = 0.6,
    title: str | None = None,
) -> Figure:
    """One panel per word: the image with that word's attention, labelled with the word."""
    panels = ["<image>", *words]
    rows = (len(panels) + columns - 1) // columns
    figure = Figure(figsize=(2.6 * columns, 2.8 * rows + (0.4 if title else 0)), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= len(panels):
            continue
        shown = image if i == 0 else overlay_attention(image, attention[i - 1], opacity)
        ax.imshow(shown)
        ax.set_title(panels[i] if i else "input", fontsize=13)
    if title:
        figure.suptitle(title, fontsize=14)
    return figure


def save_attention_grid(
    path: str | Path, image: Image.Image, words: Sequence[str], attention: np.ndarray, **kwargs
) -> Path:
    """Write the attention_figure as a PNG (no window is ever opened)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = attention_figure(image, words, attention, **kwargs)
    figure.savefig(path, format="png", dpi=80)
    return path


def save_focus_figure(
    path: str | Path, image: Image.Image, panels: Sequence[tuple[Sequence[float] | None, str]]
) -> Path:
    """One panel per (box or None, caption): the photo with the box outlined, the caption above."""
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(4.2 * len(panels), 5.2), layout="constrained")
    for ax, (box, caption) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        ax.imshow(image)
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=3))
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="black", linewidth=1))
        ax.set_title(("box: " if box is not None else "whole photo: ") + _wrap(caption), fontsize=10)
        ax.axis("off")
    fig.savefig(path, dpi=90)
    return Path(path)


def _wrap(text: str, width: int = 44) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
