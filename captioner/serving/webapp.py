"""The web UI: caption an image and step through where the model looked, word by word.

app.py only parses flags and launches; everything here works on a Captioner, or on the model
process (app_model.ModelProcess) that stands for one while it loads. The model runs once per
photo (on upload, on an example, on "Caption"); the result is kept in gr.State, so moving the
opacity or word sliders only redraws overlays. The events are wired in webapp_events.
"""

from __future__ import annotations

import builtins
import html
import re
import tempfile
import threading
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image

from captioner.model.options import DEFAULT_FOCUS_STRENGTH, DecodeOptions
from captioner.serving import webapp_events as events
from captioner.serving import webapp_layout as layout
from captioner.serving.app_model import Captioned, ModelProcess, UnreadableImage, has_evidence
from captioner.serving.model_card import CARD_PAGE
from captioner.serving.webapp_events import MAX_PIXELS
from captioner.serving.webapp_layout import CSS, MAX_BEAM, MAX_WORDS, TITLE
from captioner.serving.webapp_views import (  # noqa: F401 (the app's views, also as webapp.*)
    DISPLAY_SIZE,
    Shown,
    alternatives_table,
    display_copy,
    evidence_summary,
    opacity_value,
    overlays,
    probability,
    whole_number,
    word_evidence_view,
    word_view,
)

# Neither torch nor the model's modules: with the model in its own process (app_model) this
# process never imports them. captioner.visualize (matplotlib) is imported where it is used.
if TYPE_CHECKING:
    from collections.abc import Callable

    from captioner.serving.captioner import Captioner

MAX_FILE_SIZE = "10mb"  # per upload, enforced by Gradio's upload route

# Example photos shipped inside scikit-image, with the licence its docs give for each.
EXAMPLES = {
    "astronaut": ("astronaut.png", "Eileen Collins, NASA (public domain)"),
    "chelsea": ("chelsea.png", "Chelsea the cat, Stefan van der Walt (CC0)"),
    "coffee": ("coffee.png", "coffee cup, Rachel Michetti (CC0)"),
    "rocket": ("rocket.jpg", "DSCOVR launch, SpaceX (public domain)"),
}


def upload_path(payload: Any) -> tuple[str, str]:
    """Gradio's file payload -> (the uploaded file's path, the name the user gave it), or
    gr.Error("Upload an image first").

    The caption event skips Gradio's own image preprocessing (which would fail on a bad file with
    a generic error), so every upload, good or bad, reaches load_image; so does whatever an API
    client sends in its place ("hello", 5).
    """
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str) or not path:
        raise gr.Error(
            "Upload an image first (drop a file, paste one, or use the webcam).", print_exception=False
        )
    return path, str(payload.get("orig_name") or Path(path).name)


def read_upload(payload: Any) -> Image.Image:
    """Gradio's file payload -> RGB image, or a gr.Error naming the file the user chose."""
    from captioner.data.images import ImageLoadError, load_image

    path, name = upload_path(payload)
    try:
        return load_image(path, MAX_PIXELS)
    except ImageLoadError as err:
        raise unreadable(err, path, name) from err


def unreadable(err: Exception, path: str, name: str) -> gr.Error:
    """ "Could not read this image: holiday.png: ...", with the server's path as the user's name."""
    message = str(err).replace(path, name)
    return gr.Error(
        f"Could not read this image: {html.escape(message)}", title="Not an image", print_exception=False
    )


def run_model(
    captioner: Captioner | ModelProcess,
    payload: Any,
    options: DecodeOptions,
    box: tuple[float, ...] | None,
    strength: float,
) -> tuple[Image.Image, tuple[int, int], Any]:
    """(the photo at display size, its size in pixels, its caption with its evidence if the
    model has any). The model process reads the photo itself; a Captioner in this process gets
    it read here."""
    path, name = upload_path(payload)
    if not isinstance(captioner, ModelProcess):
        picture = read_upload(payload)
        evidence = has_evidence(captioner)
        result = captioner.caption(picture, options, focus=box, focus_strength=strength, evidence=evidence)
        return display_copy(picture), picture.size, Captioned.of(result)
    try:
        return captioner.caption_file(
            path, options, focus=box, focus_strength=strength, max_pixels=MAX_PIXELS
        )
    except UnreadableImage as err:
        raise unreadable(err, path, name) from err


def parse_box(text: Any) -> tuple[float, ...] | None:
    """ "x0, y0, x1, y1" (image pixels) -> four numbers; empty -> no focus."""
    if text is None or not str(text).strip():
        return None
    try:
        box = tuple(float(v) for v in str(text).replace(",", " ").split())
    except ValueError:
        box = ()
    if len(box) != 4:
        raise gr.Error(
            f"focus box must be four numbers x0, y0, x1, y1 (pixels), got {text!r}", print_exception=False
        )
    return box


def check_options(options: DecodeOptions) -> None:
    """ValueError naming the option if the app's sliders cannot show it."""
    if options.beam_size > MAX_BEAM:
        raise ValueError(f"beam_size must be at most {MAX_BEAM} in the app, got {options.beam_size}")
    if options.max_length > MAX_WORDS:
        raise ValueError(f"max_length must be at most {MAX_WORDS} in the app, got {options.max_length}")


def caption_upload(
    captioner: Captioner | ModelProcess,
    image: Any,
    beam_size: Any = None,
    max_length: Any = None,
    opacity: Any = 0.6,
    focus_box: Any = "",
    focus_strength: Any = None,
    *,
    options: DecodeOptions | None = None,
) -> tuple[str, list[list], list[tuple[Image.Image, str]], Shown]:
    """Run the model once: (caption, n-best table, one attention overlay per word, state).
    The sliders' beam size and maximum length (default: `options`') replace those of `options`.
    With a focus box "x0, y0, x1, y1" (image pixels), the caption (and its evidence) is about
    that region."""
    upload_path(image)  # "Upload an image first" before any other complaint
    options = options or DecodeOptions()
    beam = options.beam_size if beam_size is None else whole_number(beam_size, 1, MAX_BEAM, "beam size")
    length = (
        options.max_length if max_length is None else whole_number(max_length, 1, MAX_WORDS, "maximum length")
    )
    opacity = opacity_value(opacity)
    box = parse_box(focus_box)
    try:
        strength = DEFAULT_FOCUS_STRENGTH if focus_strength is None else float(focus_strength)
        n_best = None if options.n_best is None else min(options.n_best, beam)
        picture, size, result = run_model(
            captioner, image, options.replace(beam_size=beam, max_length=length, n_best=n_best), box, strength
        )
    except gr.Error:  # already worded for the user (and a ValueError too)
        raise
    except (TypeError, ValueError) as err:  # a box outside the image, a strength below 0
        raise gr.Error(html.escape(str(err)), print_exception=False) from err
    shown = Shown(
        picture,
        result.words,
        result.attention,
        result.score,
        result.log_prob,
        result.finished,
        result.notes,
        result.gate,
        evidence=result.evidence,
        word_evidence=result.word_evidence,
        word_categories=result.word_categories,
    )
    if box is not None:
        scale = shown.image.width / size[0]
        x0, y0, x1, y1 = (v * scale for v in box)
        shown.box = (x0, y0, x1, y1)
    return result.text, alternatives_table(result), overlays(shown, opacity), shown


def example_images(folder: Path | None = None) -> list[list[str]]:
    """Write the example photos as small JPEGs (Gradio serves them from there)."""
    folder = folder or Path(tempfile.gettempdir()) / "captioner-examples"
    folder.mkdir(parents=True, exist_ok=True)
    data = resources.files("skimage") / "data"
    paths = []
    for name, (file, _) in EXAMPLES.items():
        path = folder / f"{name}.jpg"
        if not path.is_file():  # PIL alone: the page does not wait for torch (captioner.data.images)
            with resources.as_file(data / file) as source, Image.open(source) as image:
                image.convert("RGB").save(path, quality=90)
        paths.append([str(path)])
    return paths


def build_app(
    captioner: Captioner | ModelProcess,
    about: str | Callable[[], str],
    examples: list[list[str]],
    options: DecodeOptions | None = None,
    card: str | None = None,
) -> gr.Blocks:
    """The UI (webapp_layout.page) wired to the model. `about`: the About panel's Markdown, or a
    function that returns it once the model has loaded; `options`: decoding, the sliders' start;
    `card`: the full model card, served as a page of its own (model_card.CARD_PAGE)."""
    options = options or DecodeOptions()
    credits = "; ".join(credit for _, credit in EXAMPLES.values())
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        shown = gr.State(None, time_to_live=3 * 3600)  # the last result, per browser tab
        page = layout.page(
            examples, credits, about if isinstance(about, str) else "_The model is loading…_", options
        )
        if callable(about):  # a model still loading (cli.run_app): filled in when a page opens
            demo.load(about, None, page.about, api_visibility="private")
        events.wire(
            page,
            shown,
            partial(caption_upload, captioner, options=options),
            partial(model_is_ready, captioner),
        )
    if card is not None:
        with demo.route("Model card", CARD_PAGE, show_in_navbar=False):
            gr.Markdown(f"[← Back to the app](./)\n\n{card}", elem_id="model-card")
    return demo


def model_is_ready(captioner: Any) -> bool:
    """False while a model loading behind the page (app_model.ModelProcess) is not ready."""
    ready = getattr(captioner, "ready", None)
    return not isinstance(ready, threading.Event) or ready.is_set()


def serve(
    demo: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    stop: threading.Event | None = None,
    allowed_paths: list[Path] | None = None,
) -> None:
    """Launch behind Gradio's queue: one model run at a time, so a small CPU box stays responsive.
    Serves until Ctrl-C, or until `stop` is set (even if it was set while the server started).
    `allowed_paths`: files the page shows besides uploads and results (the model card's images).
    OSError if the port is taken."""
    quiet_component_log()
    demo.queue(default_concurrency_limit=1, max_size=32).launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_FILE_SIZE,
        state_session_capacity=256,
        theme=gr.themes.Soft(),
        css=CSS,
        prevent_thread_lock=True,
        allowed_paths=[str(p) for p in allowed_paths or []],
    )
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()


def quiet_component_log() -> None:
    """Gradio prints "id=..., environment=client, type=component, file_name=style.css" for every
    file of a custom component (the region picker) on every page load. Drop those lines, and only
    those, by giving gradio.routes a print of its own."""
    import gradio.routes

    def print_unless_component_file(*args: Any, **kwargs: Any) -> None:
        if not (len(args) == 1 and _COMPONENT_FILE.match(str(args[0]))):
            builtins.print(*args, **kwargs)

    gradio.routes.print = print_unless_component_file  # type: ignore[attr-defined]


_COMPONENT_FILE = re.compile(r"id=\w+, environment=\w+, type=\w+, file_name=")
