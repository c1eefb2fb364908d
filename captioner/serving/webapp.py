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
from gradio_image_annotation import image_annotator
from PIL import Image, ImageDraw

from captioner.model.focus import DEFAULT_STRENGTH

# captioner.images (torch), .visualize (matplotlib) and the model's modules (timm) are imported
# where they are used: the page is served first, the model loads behind it (cli.run_app).
if TYPE_CHECKING:
    from collections.abc import Callable

    from captioner.model.results import CaptionResult
from captioner.serving.captioner import Captioner

TITLE = "captioner — Show, Attend and Tell"
MAX_FILE_SIZE = "10mb"  # per upload, enforced by Gradio's upload route
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
DISPLAY_SIZE = 512  # overlays are drawn on a copy this big: fast, and every thumbnail alike
MAX_BEAM, MAX_WORDS = 10, 50

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

CSS = """
#caption textarea { font-size: 1.7rem !important; font-weight: 600; line-height: 1.35; }
#word-caption { font-size: 1.25rem; }
#attention-gallery .grid-wrap { min-height: 0; max-height: none; }
#attention-gallery .thumbnail-item { aspect-ratio: 1 / 1; height: auto; }
#attention-gallery .caption-label { font-size: 0.95rem; max-width: 96%; }
.small-print { font-size: 0.85rem; opacity: 0.8; }
/* On a phone the numbers keep one line (a smaller font, no wrapping) and the caption gives way. */
@media (max-width: 640px) {
  #alternatives { font-size: 0.72rem; }
  #alternatives [data-col="2"] span, #alternatives [data-col="3"] span,
  #alternatives th:nth-child(n+3) span { white-space: nowrap; }
  #alternatives .cell-wrap { padding-left: 2px; padding-right: 2px; }
}
"""


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


def caption_upload(captioner: Captioner, image: dict[str, Any] | None, beam_size: Any = 3,
                   max_length: Any = 20, opacity: Any = 0.6, focus_box: Any = "",
                   focus_strength: Any = None,
                   ) -> tuple[str, list[list], list[tuple[Image.Image, str]], Shown]:
    """Run the model once: (caption, n-best table, one attention overlay per word, state).
    With a focus box "x0, y0, x1, y1" (image pixels), the caption is about that region."""
    picture = read_upload(image)
    beam_size = _int_in_range(beam_size, 1, MAX_BEAM, "beam size")
    max_length = _int_in_range(max_length, 1, MAX_WORDS, "maximum length")
    opacity = _opacity(opacity)
    from captioner.model.focus import DEFAULT_STRENGTH

    box = parse_box(focus_box)
    try:
        strength = DEFAULT_STRENGTH if focus_strength is None else float(focus_strength)
        result = captioner.caption(picture, beam_size=beam_size, max_length=max_length, focus=box,
                                   focus_strength=strength)
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


def describe_model(checkpoint: Path, captioner: Captioner) -> str:
    """Markdown for the About panel: the architecture, the checkpoint's metadata and model card."""
    from captioner.model.folder import read_config

    directory = checkpoint.parent if checkpoint.is_file() else checkpoint
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
        f"**Checkpoint.** `{directory}`",
    ]
    for key, value in config.get("metadata", {}).items():
        items = value if isinstance(value, list) else [value]  # a list: one entry per member
        text = " | ".join(_fmt_dict(v) if isinstance(v, dict) else _fmt(v) for v in items)
        lines.append(f"**{key.replace('_', ' ').capitalize()}.** {text}")
    card = directory / "MODEL_CARD.md"
    lines.append("---\n" + card.read_text(encoding="utf-8") if card.is_file()
                 else "_No model card (MODEL_CARD.md) ships with this checkpoint._")
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


def region_controls() -> tuple[Any, gr.Slider, gr.Textbox, gr.Button]:
    """"Caption a region": the photo to draw a box on, the focus strength and the button."""
    with gr.Accordion("Caption a region", open=False, elem_id="region"):
        picker = image_annotator(None, single_box=True, image_type="filepath", sources=[],
                                 label_list=["focus"], use_default_label=True,
                                 label="Draw a box around what the caption should be about",
                                 show_label=True, height=380, elem_id="region-picker",
                                 show_download_button=False, show_clear_button=False)
        with gr.Row():
            strength = gr.Slider(0, 12, value=DEFAULT_STRENGTH, step=0.5, label="Focus strength",
                                 info="how hard attention is pulled into the box")
            focus_box = gr.Textbox(label="Box (x0, y0, x1, y1), image pixels", interactive=False,
                                   elem_id="focus-box")
        region_button = gr.Button("Caption this region", elem_id="region-button")
    return picker, strength, focus_box, region_button


def attention_view() -> tuple[gr.Image, gr.HighlightedText, gr.Slider, gr.Slider, gr.Gallery]:
    """"Where the model looked": the selected word's overlay, the words, and every word's overlay."""
    gr.Markdown("## Where the model looked")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            big = gr.Image(label="Attention for the selected word", interactive=False, height=420,
                           elem_id="word-overlay", buttons=["download", "fullscreen"])
        with gr.Column(scale=3):
            words = gr.HighlightedText(label="Caption, word by word (click a word)", show_legend=False,
                                       show_inline_category=False, elem_id="word-caption",
                                       color_map={"looking at": "#f59e0b"})
            step = gr.Slider(1, 2, value=1, step=1, label="Word", interactive=False, elem_id="word-slider")
            opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity")
            gr.Markdown("**Every word's attention**: click one to enlarge it. Red marks where the "
                        "model looked most when it chose the word, blue where it looked least. "
                        "**β** (0-1) is how much of the image the model let into that word; "
                        "a word with a lower β than its neighbours came more from the "
                        "language model. It is the model's own weighting, not a check: an "
                        "object it invents can have as high a β as one it sees.")
            gallery = gr.Gallery(label="Attention per word", show_label=False, columns=5,
                                 object_fit="contain", allow_preview=False, elem_id="attention-gallery")
    return big, words, step, opacity, gallery


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


def build_app(captioner: Captioner, about: str | Callable[[], str], examples: list[list[str]]) -> gr.Blocks:
    """The UI: image and controls left, caption and alternatives right, attention below."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nUpload, paste or snap a photo: the model describes it and shows "
                    "which part of the image it looked at for every word.")
        shown = gr.State(None, time_to_live=3 * 3600)  # the last result, per browser tab
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                 height=380, elem_id="input-image")
                with gr.Row():
                    beam = gr.Slider(1, MAX_BEAM, value=3, step=1, label="Beam size",
                                     info="1 = greedy; more beams explore more captions")
                    length = gr.Slider(5, MAX_WORDS, value=20, step=1, label="Maximum length",
                                       info="words")
                button = gr.Button("Caption", variant="primary", size="lg", elem_id="caption-button")
                picker, strength, focus_box, region_button = region_controls()
                whole_image = gr.Textbox("", visible=False)  # the API's box argument: none by default
            with gr.Column(scale=6):
                caption = gr.Textbox(label="Caption", lines=2, interactive=False, elem_id="caption",
                                     buttons=["copy"], placeholder="The caption appears here")
                info = gr.Markdown(elem_id="caption-details")
                table = gr.Dataframe(headers=["#", "caption", "score", "p"],
                                     datatype=["number", "str", "number", "number"],
                                     label="Alternatives (beam search n-best, best first)",
                                     interactive=False, wrap=True, column_widths=["7%", "51%", "18%", "24%"],
                                     elem_id="alternatives")
                gallery_examples = gr.Examples(examples, inputs=[image], label="Examples (click one)",
                                               examples_per_page=len(examples), elem_id="examples",
                                               api_visibility="private")
                gr.Markdown("Example photos from scikit-image: "
                            + "; ".join(credit for _, credit in EXAMPLES.values()) + ".",
                            elem_classes="small-print")
        big, words, step, opacity, gallery = attention_view()
        with gr.Accordion("About the model", open=False):
            about_text = gr.Markdown(about if isinstance(about, str) else "_The model is loading…_",
                                     elem_classes="small-print")
        if callable(about):  # a model still loading (cli.run_app): filled in when a page opens
            demo.load(about, None, about_text, api_visibility="private")

        view = [big, words]
        run: dict[str, Any] = dict(fn=partial(caption_upload, captioner),
                                   outputs=[caption, table, gallery, shown],
                                   preprocess=False, show_progress_on=[caption, gallery])
        whole, region = [image, beam, length, opacity, whole_image, strength], [
            image, beam, length, opacity, focus_box, strength]
        then: dict[str, Any] = dict(fn=show_result, inputs=[shown, opacity], outputs=[info, *view, step],
                                    api_visibility="private")
        button.click(api_name="caption", api_description=API_DESCRIPTION, inputs=whole, **run).success(**then)
        gallery_examples.load_input_event.then(api_visibility="private", inputs=whole, **run).success(**then)
        image.change(lambda path: ({"image": path, "boxes": []} if path else None, ""), image,
                     [picker, focus_box], api_visibility="private", queue=False)
        region_button.click(region_box, picker, focus_box, api_visibility="private", queue=False).success(
            api_visibility="private", inputs=region, **run).success(**then)
        # Clicking a thumbnail or a word moves the word slider; the slider redraws the large view.
        gallery.select(pick_thumbnail, None, step, api_visibility="private", queue=False)
        words.select(pick_word, None, step, api_visibility="private", queue=False)
        step.change(word_view, [shown, step, opacity], view, api_visibility="private")
        opacity.change(lambda s, i, a: (overlays(s, a) if s else [], *word_view(s, i, a)),
                       [shown, step, opacity], [gallery, *view], api_visibility="private")
    return demo


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
