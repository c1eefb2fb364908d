"""Attention pictures: smooth heat maps, overlays, and the per-word grid written as a PNG."""

import matplotlib
import numpy as np
import pytest
from PIL import Image

from captioner.visualize import attention_figure, attention_heatmap, overlay_attention, save_attention_grid


def _alpha(h=4, w=4, hot=(1, 2)):
    alpha = np.full((h, w), 0.01, dtype=np.float32)
    alpha[hot] = 1.0
    return alpha / alpha.sum()


def test_heatmap_is_image_sized_normalised_and_smooth():
    alpha = _alpha(hot=(1, 3))
    heat = attention_heatmap(alpha, (300, 200))  # size is (W, H), like PIL
    assert heat.shape == (200, 300) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert len(np.unique(heat.round(3))) > 100  # a smooth surface, not 16 flat blocks
    # one pixel step never jumps by more than a few percent
    assert np.abs(np.diff(heat, axis=0)).max() < 0.1 and np.abs(np.diff(heat, axis=1)).max() < 0.1
    # the hot cell (row 1, column 3) is where the map peaks
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 50 <= y < 100 and x >= 225


def test_heatmap_of_uniform_or_zero_attention():
    assert np.allclose(attention_heatmap(np.full((7, 7), 1 / 49), (64, 64)), 1.0, atol=1e-3)
    assert (attention_heatmap(np.zeros((7, 7)), (64, 48)) == 0).all()


def test_overlay_is_an_rgb_image_of_the_same_size():
    image = Image.new("L", (120, 80), 128)
    overlay = overlay_attention(image, _alpha())
    assert overlay.mode == "RGB" and overlay.size == (120, 80)
    pixels = np.asarray(overlay, dtype=int)
    assert (pixels != 128).any()  # coloured
    # where attention is low the image shows through more than where it is high
    hot, cold = pixels[30, 50], pixels[75, 5]  # cell (1, 2) vs cell (3, 0)
    assert np.abs(hot - 128).sum() > np.abs(cold - 128).sum()
    untouched = overlay_attention(image, _alpha(), opacity=0.0)
    assert (np.asarray(untouched) == 128).all()


def test_attention_grid_is_written_as_png_without_a_window(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    def no_window(*args, **kwargs):
        raise AssertionError("plt.show() must never be called")

    monkeypatch.setattr(plt, "show", no_window)
    backend = matplotlib.get_backend()
    words = ["a", "red", "circle", "on", "the", "left"]
    attention = np.stack([_alpha(hot=(i % 4, (i * 3) % 4)) for i in range(len(words))])
    path = save_attention_grid(
        tmp_path / "out" / "grid.png",
        Image.new("RGB", (96, 64), "grey"),
        words,
        attention,
        title="a red circle on the left",
    )
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.verify()
    with Image.open(path) as png:
        assert png.width > 400 and png.height > 200
    assert matplotlib.get_backend() == backend  # no GUI backend switched on


def test_attention_figure_has_one_panel_per_word_plus_the_image():
    words = ["a", "blue", "square"]
    figure = attention_figure(Image.new("RGB", (32, 32)), words, np.stack([_alpha()] * 3), columns=2)
    titled = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titled == ["input", *words]
    assert len(figure.axes) == 4  # 2 x 2 grid, all used
