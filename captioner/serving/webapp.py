"""The web UI: caption an image and step through where the model looked, word by word.

app.py only parses flags and launches; everything here works on an already loaded Captioner.
The model runs once per click on "Caption"; the result is kept in gr.State, so moving the
opacity or word sliders only redraws overlays.
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from captioner.model.options import DEFAULT_FOCUS_STRENGTH, DecodeOptions
from captioner.serving import webapp_layout as layout
from captioner.serving.webapp_layout import CSS, MAX_BEAM, MAX_WORDS, TITLE

# captioner.data.images (torch), .visualize (matplotlib) and the model's modules (timm) are
# imported where they are used: the page is served first, the model loads behind it (cli.run_app).
if TYPE_CHECKING:
    from collections.abc import Callable

    from captioner.model.results import CaptionResult
    from captioner.serving.captioner import Captioner

MAX_FILE_SIZE = "10mb"  # per upload, enforced by Gradio's upload route
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
DISPLAY_SIZE = 512  # overlays are drawn on a copy this big: fast, and every thumbnail alike

# Example photos shipped inside scikit-image, with the licence its docs give for each.
EXAMPLES = {
    "astronaut": ("astronaut.png", "Eileen Collins, NASA (public domain)"),
    "chelsea": ("chelsea.png", "Chelsea the cat, Stefan van der Walt (CC0)"),
    "coffee": ("coffee.png", "coffee cup, Rachel Michetti (CC0)"),
    "rocket": ("rocket.jpg", "DSCOVR launch, SpaceX (public domain)"),
}

API_DESCRIPTION = ("Caption an image. Returns the caption, the n-best alternatives with their scores "
                   "(log-probabilities) and one attention overlay per word, labelled with the word "
                   "and its gate β (0-1: how much the image fed the word).")


@dataclass
class Shown:
    """The last caption run: enough to redraw every overlay without the model."""

    image: Image.Image  # at display size
    words: list[str]
    attention: np.ndarray  # (len(words), h, w)
    score: float
    log_prob: float
    finished: bool  # False if the maximum length cut the caption short
    notes: list[str] = field(default_factory=list)  # e.g. the input is tiny
    gate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (len(words),) beta
    box: tuple[float, float, float, float] | None = None  # the focus box, in display pixels


def display_copy(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """The image scaled (up or down) to `size` px on its long side, so all overlays match."""
    scale = size / max(image.size)
    new_size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
    return image.resize(new_size, Image.Resampling.LANCZOS)


def read_upload(payload: dict[str, Any] | None) -> Image.Image:
    """Gradio's file payload -> RGB image, or a gr.Error naming the file the user chose.

    The caption event skips Gradio's own image preprocessing (which would fail on a bad file with
    a generic error), so every upload, good or bad, reaches load_image.
    """
    if not payload or not payload.get("path"):
        raise gr.Error("Upload an image first (drop a file, paste one, or use the webcam).",
                       print_exception=False)
    from captioner.data.images import ImageLoadError, load_image

    path = payload["path"]
    name = payload.get("orig_name") or Path(path).name
    try:
        return load_image(path, MAX_PIXELS)
    except ImageLoadError as err:
        message = str(err).replace(str(path), name)
        raise gr.Error(f"Could not read this image: {html.escape(message)}", title="Not an image",
                       print_exception=False) from err


def word_label(word: str, gate: float) -> str:
    """A word's panel title: the word and its gate beta, how much the image fed it."""
    return f"{word} · β {gate:.2f}"


def overlay(shown: Shown, alpha: np.ndarray, opacity: float) -> Image.Image:
    """A word's attention over the image, with the focus box (if any) outlined."""
    from captioner.visualize import overlay_attention

    image = overlay_attention(shown.image, alpha, opacity)
    if shown.box is not None:
        width = max(2, round(max(image.size) / 170))
        ImageDraw.Draw(image).rectangle(shown.box, outline=(255, 255, 255), width=width)
    return image


def overlays(shown: Shown, opacity: float) -> list[tuple[Image.Image, str]]:
    """One (overlay, "word · β") pair per generated word, for the gallery."""
    return [(overlay(shown, alpha, opacity), word_label(word, gate))
            for word, alpha, gate in zip(shown.words, shown.attention, shown.gate, strict=True)]


def probability(log_prob: float) -> float:
    """Three significant digits: a whole caption's probability is often below 0.001."""
    return float(f"{math.exp(log_prob):.3g}")


def alternatives_table(result: CaptionResult) -> list[list]:
    return [[rank, alt.text or "(empty)", round(alt.score, 3), probability(alt.log_prob)]
            for rank, alt in enumerate(result.alternatives, start=1)]


def _int_in_range(value: Any, low: int, high: int, name: str) -> int:
    """The API's number, or a clear error naming the argument and its range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer() or not low <= number <= high:
        raise gr.Error(f"{name} must be a whole number from {low} to {high}, got {value!r}",
                       print_exception=False)
    return int(number)


def _opacity(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise gr.Error(f"opacity must be a number from 0 to 1, got {value!r}", print_exception=False)
    return number


def parse_box(text: Any) -> tuple[float, ...] | None:
    """"x0, y0, x1, y1" (image pixels) -> four numbers; empty -> no focus."""
    if text is None or not str(text).strip():
        return None
    try:
        box = tuple(float(v) for v in str(text).replace(",", " ").split())
    except ValueError:
        box = ()
    if len(box) != 4:
        raise gr.Error(f"focus box must be four numbers x0, y0, x1, y1 (pixels), got {text!r}",
                       print_exception=False)
    return box


def region_box(annotation: dict[str, Any] | None) -> str:
    """The box drawn on the region picker, as "x0, y0, x1, y1", or a clear error."""
    boxes = (annotation or {}).get("boxes") or []
    if not boxes:
        raise gr.Error("Draw a box on the image first (in “Caption a region”).", print_exception=False)
    box = boxes[-1]
    return ", ".join(str(round(float(box[k]))) for k in ("xmin", "ymin", "xmax", "ymax"))


def check_options(options: DecodeOptions) -> None:
    """ValueError naming the option if the app's sliders cannot show it."""
    if options.beam_size > MAX_BEAM:
        raise ValueError(f"beam_size must be at most {MAX_BEAM} in the app, got {options.beam_size}")
    if options.max_length > MAX_WORDS:
        raise ValueError(f"max_length must be at most {MAX_WORDS} in the app, got {options.max_length}")


def caption_upload(captioner: Captioner, image: dict[str, Any] | None, beam_size: Any = None,
                   max_length: Any = None, opacity: Any = 0.6, focus_box: Any = "",
                   focus_strength: Any = None, *, options: DecodeOptions | None = None,
                   ) -> tuple[str, list[list], list[tuple[Image.Image, str]], Shown]:
    """Run the model once: (caption, n-best table, one attention overlay per word, state).
    The sliders' beam size and maximum length (default: `options`') replace those of `options`.
    With a focus box "x0, y0, x1, y1" (image pixels), the caption is about that region."""
    picture = read_upload(image)
    options = options or DecodeOptions()
    beam = options.beam_size if beam_size is None else _int_in_range(beam_size, 1, MAX_BEAM, "beam size")
    length = (options.max_length if max_length is None
              else _int_in_range(max_length, 1, MAX_WORDS, "maximum length"))
    opacity = _opacity(opacity)
    box = parse_box(focus_box)
    try:
        strength = DEFAULT_FOCUS_STRENGTH if focus_strength is None else float(focus_strength)
        n_best = None if options.n_best is None else min(options.n_best, beam)
        result = captioner.caption(picture, options.replace(beam_size=beam, max_length=length, n_best=n_best),
                                   focus=box, focus_strength=strength)
    except (TypeError, ValueError) as err:  # a box outside the image, a strength below 0
        raise gr.Error(html.escape(str(err)), print_exception=False) from err
    shown = Shown(display_copy(picture), result.words, result.attention, result.score,
                  result.log_prob, result.finished, result.notes, result.gate)
    if box is not None:
        scale = shown.image.width / picture.width
        x0, y0, x1, y1 = (v * scale for v in box)
        shown.box = (x0, y0, x1, y1)
    return result.text, alternatives_table(result), overlays(shown, opacity), shown


def details(shown: Shown | None) -> str:
    """The line under the caption: its score, in words a person can read."""
    if shown is None:
        return ""
    parts = [f"**score** {shown.score:.3f} (log-probability)",
             f"**p** = {probability(shown.log_prob):g}", f"{len(shown.words)} words"]
    if not shown.finished:
        parts.append("⚠️ cut at the maximum length")
    parts += [f"⚠️ {note}" for note in shown.notes]
    return " · ".join(parts)


def word_view(shown: Shown | None, index: Any, opacity: Any) -> tuple[dict, list[tuple[str, str | None]]]:
    """The large overlay for word `index` (1-based) and the caption with that word highlighted."""
    if shown is None or not shown.words:
        return gr.update(value=None, label="Attention for the selected word"), []
    i = _int_in_range(index, 1, len(shown.words), "word") - 1
    big = overlay(shown, shown.attention[i], _opacity(opacity))
    label = (f"Word {i + 1} of {len(shown.words)}: “{shown.words[i]}” · image gate β = "
             f"{shown.gate[i]:.2f}")
    # word, space, word, ...: word j is token 2j
    tokens: list[tuple[str, str | None]] = [(" ", None)] * (2 * len(shown.words) - 1)
    tokens[::2] = [(word, "looking at" if j == i else None) for j, word in enumerate(shown.words)]
    return gr.update(value=big, label=label), tokens


def describe_model(folder: Path, captioner: Captioner) -> str:
    """Markdown for the About panel: the architecture, the model folder's metadata and model card."""
    from captioner.model.folder import read_config

    directory = folder.parent if folder.is_file() else folder
    config = read_config(directory)
    model = config["model"]
    params = sum(p.numel() for p in captioner.model.parameters())
    grid = "×".join(map(str, captioner.grid_shape))
    decoders = config.get("ensemble_size", model.get("decoders", 1))
    decoder = ("an LSTM decoder" if decoders == 1 else
               f"{decoders} LSTM decoders, trained apart, that average their word log-probabilities, each")
    lines = [
        f"**Model.** Show, Attend and Tell: a `{model['backbone']}` CNN sees the image at "
        f"{model['image_size']} px as a {grid} grid of regions; {decoder} with "
        f"{model['attention']} attention weighs those regions afresh before each word. "
        f"{params / 1e6:.1f} M parameters, {len(captioner.vocab.words):,}-word vocabulary.",
        f"**Model folder.** `{directory}`",
    ]
    for key, value in config.get("metadata", {}).items():
        items = value if isinstance(value, list) else [value]  # a list: one entry per member
        text = " | ".join(_fmt_dict(v) if isinstance(v, dict) else _fmt(v) for v in items)
        lines.append(f"**{key.replace('_', ' ').capitalize()}.** {text}")
    card = directory / "MODEL_CARD.md"
    lines.append("---\n" + card.read_text(encoding="utf-8") if card.is_file()
                 else "_No model card (MODEL_CARD.md) ships with this model._")
    return "\n\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_dict(value: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())


def example_images(folder: Path | None = None) -> list[list[str]]:
    """Write the example photos as small JPEGs (Gradio serves them from there)."""
    folder = folder or Path(tempfile.gettempdir()) / "captioner-examples"
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("skimage") / "data"
    paths = []
    for name, (file, _) in EXAMPLES.items():
        path = folder / f"{name}.jpg"
        if not path.is_file():
            from captioner.data.images import load_image

            with resources.as_file(data / file) as source:
                load_image(source).save(path, quality=90)
        paths.append([str(path)])
    return paths


def show_result(state: Shown | None, alpha: float):
    """After a caption: the details line, word 1's view, and a word slider as long as the caption."""
    big_image, tokens = word_view(state, 1, alpha)
    count = len(state.words) if state else 0
    slider = gr.Slider(minimum=1, maximum=max(count, 2), value=1, interactive=count > 1)
    return details(state), big_image, tokens, slider


def pick_thumbnail(event: gr.SelectData) -> int:
    return event.index + 1


def pick_word(event: gr.SelectData) -> int:
    return event.index // 2 + 1  # tokens alternate word, space


def build_app(captioner: Captioner, about: str | Callable[[], str], examples: list[list[str]],
              options: DecodeOptions | None = None) -> gr.Blocks:
    """The UI (webapp_layout.page) wired to the model. `about`: the About panel's Markdown, or a
    function that returns it once the model has loaded; `options`: decoding, the sliders' start."""
    options = options or DecodeOptions()
    credits = "; ".join(credit for _, credit in EXAMPLES.values())
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        shown = gr.State(None, time_to_live=3 * 3600)  # the last result, per browser tab
        page = layout.page(examples, credits, about if isinstance(about, str) else "_The model is loading…_",
                           options)
        if callable(about):  # a model still loading (cli.run_app): filled in when a page opens
            demo.load(about, None, page.about, api_visibility="private")
        wire(page, shown, partial(caption_upload, captioner, options=options))
    return demo


def wire(page: layout.Page, shown: gr.State, caption: Callable[..., Any]) -> None:
    """The events: Caption (also the API's /caption), an example, a region; then clicks on a
    thumbnail or a word move the word slider, which redraws the large view."""
    view = [page.big, page.words]
    run: dict[str, Any] = dict(fn=caption, outputs=[page.caption, page.table, page.gallery, shown],
                               preprocess=False, show_progress_on=[page.caption, page.gallery])
    controls = [page.image, page.beam, page.length, page.opacity]
    whole, region = [*controls, page.whole_image, page.strength], [*controls, page.focus_box, page.strength]
    then: dict[str, Any] = dict(fn=show_result, inputs=[shown, page.opacity],
                                outputs=[page.info, *view, page.step], api_visibility="private")
    page.button.click(api_name="caption", api_description=API_DESCRIPTION, inputs=whole,
                      **run).success(**then)
    page.examples.load_input_event.then(api_visibility="private", inputs=whole, **run).success(**then)
    page.image.change(lambda path: ({"image": path, "boxes": []} if path else None, ""), page.image,
                      [page.picker, page.focus_box], api_visibility="private", queue=False)
    page.region_button.click(region_box, page.picker, page.focus_box, api_visibility="private", queue=False
                             ).success(api_visibility="private", inputs=region, **run).success(**then)
    page.gallery.select(pick_thumbnail, None, page.step, api_visibility="private", queue=False)
    page.words.select(pick_word, None, page.step, api_visibility="private", queue=False)
    page.step.change(word_view, [shown, page.step, page.opacity], view, api_visibility="private")
    page.opacity.change(lambda s, i, a: (overlays(s, a) if s else [], *word_view(s, i, a)),
                        [shown, page.step, page.opacity], [page.gallery, *view], api_visibility="private")


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          stop: threading.Event | None = None) -> None:
    """Launch behind Gradio's queue: one model run at a time, so a small CPU box stays responsive.
    Serves until Ctrl-C, or until `stop` is set (even if it was set while the server started)."""
    demo.queue(default_concurrency_limit=1, max_size=32).launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
        state_session_capacity=256, theme=gr.themes.Soft(), css=CSS, prevent_thread_lock=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
