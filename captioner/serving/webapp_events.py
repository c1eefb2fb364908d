"""The app's events: what an upload, a click or a slider runs, and where its answer goes.

Two kinds. The API's /caption is a hidden button's event: it raises gr.Error, which an API
client receives as an exception. The page's own events never raise: a problem is written as
text in the status line beside what the user pressed (a raised error shows only a red "Error"
pill on the outputs), and the page then scrolls to the answer or the problem, since on a phone
the result sits below the photo.
"""

from __future__ import annotations

import html
import re
import traceback
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from captioner.serving import webapp_layout as layout
from captioner.serving.webapp_views import (
    overlays,
    pick_thumbnail,
    pick_word,
    show_result,
    word_evidence_view,
    word_view,
)

API_DESCRIPTION = (
    "Caption an image. Returns the caption, the n-best alternatives with their scores "
    "(log-probabilities) and one attention overlay per word, labelled with the word "
    "and its gate β (0-1: how much the image fed the word)."
)
MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
LOADING = "⏳ The model is still loading (only after the app starts); the caption follows."
CLEARED: tuple[Any, ...] = ("", [], [], None)  # caption, alternatives, overlays, state: nothing shown
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def wire(page: layout.Page, shown: gr.State, caption: Callable[..., Any], ready: Callable[[], bool]) -> None:
    """Caption a photo on upload, on an example, on "Caption" (the sliders' new settings) and on
    "Caption this region"; clicks on a thumbnail or a word move the word slider, which redraws the
    large view; the opacity slider redraws every overlay."""
    private: dict[str, Any] = dict(api_visibility="private")
    view = [page.big, page.words]
    result = [page.caption, page.table, page.gallery, shown]
    controls = [page.image, page.beam, page.length, page.opacity]
    whole = [*controls, page.whole_image, page.strength]
    page.api_button.click(
        caption, whole, result, api_name="caption", api_description=API_DESCRIPTION, preprocess=False
    )
    then: dict[str, Any] = dict(
        fn=show_result,
        inputs=[shown, page.opacity],
        outputs=[page.info, page.evidence, *view, page.word_evidence, page.step],
        **private,
    )
    photo: dict[str, Any] = dict(
        inputs=whole,
        outputs=[*result, page.status, page.region_status],
        preprocess=False,
        show_progress_on=[page.caption, page.gallery],
        **private,
    )
    to_photo_answer: dict[str, Any] = dict(fn=None, js=layout.scroll_to_answer("status"), **private)
    page.button.click(partial(caption_photo, caption, ready), **photo).then(**then).then(**to_photo_answer)
    # A photo's input can come while its last input is still running: "Paste from clipboard" and
    # "Capture from camera" clear the photo (an input) before the new one arrives, and the default
    # ("once") would drop the new one, leaving a photo without caption. It runs after instead.
    page.image.input(
        partial(caption_photo, caption, ready, on_upload=True), **photo, trigger_mode="always_last"
    ).then(**then).then(**to_photo_answer)
    page.examples.load_input_event.then(partial(caption_photo, caption, ready), **photo).then(**then).then(
        **to_photo_answer
    )
    page.image.change(
        new_photo, page.image, [page.picker, page.focus_box], preprocess=False, queue=False, **private
    )
    to_region_answer: dict[str, Any] = dict(fn=None, js=layout.scroll_to_answer("region-status"), **private)
    page.region_button.click(
        partial(caption_region, caption, ready),
        [page.picker, *controls, page.strength],
        [page.focus_box, *result, page.region_status, page.status],
        preprocess=False,
        show_progress_on=[page.caption, page.gallery],
        **private,
    ).then(**then).then(**to_region_answer)
    page.gallery.select(pick_thumbnail, None, page.step, queue=False, **private)
    page.words.select(pick_word, None, page.step, queue=False, **private)
    page.step.change(word_view, [shown, page.step, page.opacity], view, **private)
    page.step.change(word_evidence_view, [shown, page.step], page.word_evidence, queue=False, **private)
    page.opacity.change(
        lambda s, i, a: (overlays(s, a) if s else [], *word_view(s, i, a)),
        [shown, page.step, page.opacity],
        [page.gallery, *view],
        **private,
    )


def caption_photo(
    caption: Callable[..., Any],
    ready: Callable[[], bool],
    image: Any,
    *settings: Any,
    on_upload: bool = False,
) -> Iterator[tuple[Any, ...]]:
    """The page's caption of the whole photo: (caption, alternatives, overlays, state, status,
    region status). An upload cleared by the user clears the result; a problem clears it too
    and says what went wrong."""
    if on_upload and not image:
        yield (*CLEARED, "", "")
        return
    if not ready():
        yield (*[gr.skip()] * len(CLEARED), LOADING, "")
    try:
        yield (*caption(image, *settings), "", "")
    except Exception as err:  # noqa: BLE001 (shown to the user, never raised at them)
        yield (*CLEARED, problem(err), "")


def caption_region(
    caption: Callable[..., Any],
    ready: Callable[[], bool],
    picker: Any,
    image: Any,
    beam: Any,
    length: Any,
    opacity: Any,
    strength: Any,
) -> Iterator[tuple[Any, ...]]:
    """The page's "Caption this region": (box, caption, alternatives, overlays, state, region
    status, status). Without a box the last result stays and the status says what to do."""
    keep = [gr.skip()] * len(CLEARED)
    try:
        box = region_box(picker)
    except gr.Error as err:
        yield (gr.skip(), *keep, problem(err), "")
        return
    if not ready():
        yield (box, *keep, LOADING, "")
    try:
        yield (box, *caption(image, beam, length, opacity, box, strength), "", "")
    except Exception as err:  # noqa: BLE001
        yield (box, *CLEARED, problem(err), "")


def problem(err: Exception) -> str:
    """The status line for an error: its message as plain text. An error that is no gr.Error is a
    bug: the user gets its one-line message, the server log its traceback."""
    if isinstance(err, gr.Error):
        message = html.unescape(str(err.message))
    else:
        traceback.print_exception(err)
        message = f"Something went wrong: {type(err).__name__}: {err}"
    return "⚠️ " + _MARKDOWN.sub(r"\\\1", message)


def new_photo(payload: Any) -> tuple[dict[str, Any] | None, str]:
    """A new photo (or none): the region picker shows it without a box; the old box is gone."""
    return picker_image(payload), ""


def picker_image(payload: Any) -> dict[str, Any] | None:
    """The region picker's value for a new upload: the image with no box, or None if PIL cannot
    read the file's header or it is too big (the caption then says why)."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, str):
        return None
    try:
        with warnings.catch_warnings(), Image.open(path) as image:  # reads the header only
            warnings.simplefilter("ignore")
            fits = image.width * image.height <= MAX_PIXELS
    except Exception:  # noqa: BLE001 (not an image, in any of PIL's many ways)
        return None
    return {"image": path, "boxes": []} if fits else None


def region_box(annotation: Any) -> str:
    """The box drawn on the region picker, as "x0, y0, x1, y1" image pixels, or a clear error."""
    boxes = annotation.get("boxes") if isinstance(annotation, dict) else None
    if not boxes:
        raise gr.Error(
            "Draw a box on the image first, then press “Caption this region”.", print_exception=False
        )
    box = boxes[-1]  # as the page sends it: in the picker's pixels, `scaleFactor` per image pixel
    scale = float(box.get("scaleFactor") or 1)
    return ", ".join(str(round(float(box[k]) / scale)) for k in ("xmin", "ymin", "xmax", "ymax"))
