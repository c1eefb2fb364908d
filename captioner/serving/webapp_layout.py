"""The web app's page: where each component sits, how it looks, and the sliders' ranges.

captioner.serving.webapp wires these components to the model; nothing here runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio import data_classes
from gradio.helpers import Examples
from gradio_image_annotation import image_annotator
from pydantic import model_validator

from captioner.model.options import DEFAULT_FOCUS_STRENGTH, DecodeOptions

TITLE = "captioner — Show, Attend and Tell"
MAX_BEAM, MAX_WORDS = 10, 50  # the sliders' ranges
OVERLAYS = "jpeg"  # the overlays' file format: 14 of them encode in 0.02 s, against 0.4 s as WebP

CSS = """
#caption textarea { font-size: 1.7rem !important; font-weight: 600; line-height: 1.35; }
#word-caption { font-size: 1.25rem; }
.status p { font-weight: 600; margin: 0; }
/* Every word's thumbnail on screen: as many columns as fit, 108 px or more (92 on a phone: 3). */
#attention-gallery .grid-wrap { min-height: 0; max-height: none; }
#attention-gallery .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(108px, 1fr)) !important; }
#attention-gallery .thumbnail-item { aspect-ratio: 1 / 1; height: auto; }
#attention-gallery .caption-label { font-size: 0.9rem; max-width: 96%; white-space: normal;
  overflow: visible; text-overflow: clip; line-height: 1.2; }
/* Labels wrap rather than end in "..." ("image gate β = 0.42" must stay readable). */
#word-overlay label[data-testid="block-label"] {
  white-space: normal; height: auto; max-width: calc(100% - 96px); }
.small-print { font-size: 0.85rem; opacity: 0.8; }
/* The model card's page is reached from the About panel's link: no bar of pages ("Home"). */
.nav-holder { display: none !important; }
/* On a phone the numbers keep one line (a smaller font, no wrapping) and the caption gives way. */
@media (max-width: 640px) {
  #attention-gallery .grid-container {
    grid-template-columns: repeat(auto-fill, minmax(92px, 1fr)) !important; }
  #alternatives [role=gridcell] span, #alternatives th span { font-size: 12px; }
  #alternatives [data-col="2"] span, #alternatives [data-col="3"] span,
  #alternatives th:nth-child(n+3) span { white-space: nowrap; }
  #alternatives .cell-wrap { padding-left: 2px; padding-right: 2px; }
}
"""


def scroll_to_answer(status_id: str) -> str:
    """JavaScript run after a caption: bring the problem (the status line `status_id`, if it says
    anything) or else the caption into view, unless it is already in view."""
    return f"""() => {{
  const status = document.querySelector("#{status_id}");
  const target = status && status.innerText.trim() ? status : document.querySelector("#caption");
  if (!target) return;
  const box = target.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) target.scrollIntoView({{block: "start"}});
}}"""


class ImageData(data_classes.ImageData):
    """Gradio's image payload, except that an API client's non-file ("hello", 5) is read as no
    image at all: the caption then says "Upload an image first" instead of failing validation
    with a generic error and a traceback in the server log."""

    @model_validator(mode="before")
    @classmethod
    def no_file_is_no_image(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("path", ""), (str, type(None))):
            return value
        return value if isinstance(value, data_classes.ImageData) else {}


@dataclass
class Page:
    """The components the app's events read and write."""

    image: gr.Image
    beam: gr.Slider
    length: gr.Slider
    button: gr.Button
    status: gr.Markdown  # what went wrong (or is slow) with the last caption of the photo
    picker: Any  # the region picker (gradio_image_annotation)
    strength: gr.Slider
    focus_box: gr.Textbox
    region_button: gr.Button
    region_status: gr.Markdown
    whole_image: gr.Textbox  # the API's box argument: none by default
    caption: gr.Textbox
    info: gr.Markdown
    evidence: gr.Markdown  # what the encoder's ImageNet classifier saw, beside the caption
    table: gr.Dataframe
    examples: Examples
    big: gr.Image
    words: gr.HighlightedText
    word_evidence: gr.Markdown  # the selected word's evidence, beside its overlay
    step: gr.Slider
    opacity: gr.Slider
    gallery: gr.Gallery
    about: gr.Markdown
    api_button: gr.Button  # the API's /caption: never shown


def page(examples: list[list[str]], credits: str, about: str, options: DecodeOptions) -> Page:
    """The UI, inside a gr.Blocks: image and controls left, caption and alternatives right,
    attention below, the model's description last. The sliders start at `options`."""
    gr.Markdown(
        f"# {TITLE}\nUpload, paste or snap a photo: the model describes it and shows "
        "which part of the image it looked at for every word."
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            image, beam, length, button = input_controls(options)
            status = gr.Markdown(elem_id="status", elem_classes="status")
            picker, strength, focus_box, region_button, region_status = region_controls()
            whole_image = gr.Textbox("", visible=False)
            api_button = gr.Button(visible=False)
        with gr.Column(scale=6):
            caption, info, evidence, table = caption_view()
            gallery_examples = gr.Examples(
                examples,
                inputs=[image],
                label="Examples (click one)",
                examples_per_page=len(examples),
                elem_id="examples",
                api_visibility="private",
            )
            gr.Markdown(f"Example photos from scikit-image: {credits}.", elem_classes="small-print")
    big, words, word_evidence, step, opacity, gallery = attention_view()
    with gr.Accordion("About the model", open=False):
        about_text = gr.Markdown(about, elem_classes="small-print", elem_id="about")
    return Page(
        image,
        beam,
        length,
        button,
        status,
        picker,
        strength,
        focus_box,
        region_button,
        region_status,
        whole_image,
        caption,
        info,
        evidence,
        table,
        gallery_examples,
        big,
        words,
        word_evidence,
        step,
        opacity,
        gallery,
        about_text,
        api_button,
    )


def input_controls(options: DecodeOptions) -> tuple[gr.Image, gr.Slider, gr.Slider, gr.Button]:
    """The photo, the beam size and maximum length sliders, and the Caption button."""
    image = gr.Image(
        label="Image",
        type="filepath",
        sources=["upload", "webcam", "clipboard"],
        height=380,
        elem_id="input-image",
    )
    # the forgiving ImageData above; on the instance, since a subclass of a Gradio component
    # would make Gradio write a .pyi file beside this module
    image.data_model = ImageData
    with gr.Row():
        beam = gr.Slider(
            1,
            MAX_BEAM,
            value=options.beam_size,
            step=1,
            label="Beam size",
            info="1 = greedy; more beams explore more captions",
        )
        length = gr.Slider(
            min(5, options.max_length),
            MAX_WORDS,
            value=options.max_length,
            step=1,
            label="Maximum length",
            info="words",
        )
    button = gr.Button("Caption", variant="primary", size="lg", elem_id="caption-button")
    return image, beam, length, button


def caption_view() -> tuple[gr.Textbox, gr.Markdown, gr.Markdown, gr.Dataframe]:
    """The caption, the line of details under it, the evidence, and the table of alternatives."""
    caption = gr.Textbox(
        label="Caption",
        lines=2,
        interactive=False,
        elem_id="caption",
        buttons=["copy"],
        placeholder="The caption appears here",
    )
    info = gr.Markdown(elem_id="caption-details")
    evidence = gr.Markdown(elem_id="evidence", elem_classes="small-print")
    table = gr.Dataframe(
        headers=["#", "caption", "score", "p"],
        datatype=["number", "str", "number", "number"],
        label="Alternatives (beam search n-best, best first)",
        interactive=False,
        wrap=True,
        column_widths=["7%", "51%", "18%", "24%"],
        elem_id="alternatives",
    )
    return caption, info, evidence, table


def region_controls() -> tuple[Any, gr.Slider, gr.Textbox, gr.Button, gr.Markdown]:
    """ "Caption a region": the photo to draw a box on, the focus strength and the button."""
    with gr.Accordion("Caption a region", open=False, elem_id="region"):
        picker = image_annotator(
            None,
            single_box=True,
            image_type="filepath",
            sources=[],
            label_list=["focus"],
            use_default_label=True,
            label="Draw a box around what the caption should be about",
            show_label=True,
            height=380,
            elem_id="region-picker",
            show_download_button=False,
            show_clear_button=False,
        )
        with gr.Row():
            strength = gr.Slider(
                0,
                12,
                value=DEFAULT_FOCUS_STRENGTH,
                step=0.5,
                label="Focus strength",
                info="how hard attention is pulled into the box",
            )
            focus_box = gr.Textbox(
                label="Box (x0, y0, x1, y1), image pixels", interactive=False, elem_id="focus-box"
            )
        region_button = gr.Button("Caption this region", elem_id="region-button")
        region_status = gr.Markdown(elem_id="region-status", elem_classes="status")
    return picker, strength, focus_box, region_button, region_status


def attention_view() -> tuple[gr.Image, gr.HighlightedText, gr.Markdown, gr.Slider, gr.Slider, gr.Gallery]:
    """ "Where the model looked": the selected word's overlay, the words, and every word's overlay."""
    gr.Markdown("## Where the model looked")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            big = gr.Image(
                label="Attention for the selected word",
                interactive=False,
                height=420,
                elem_id="word-overlay",
                buttons=["download", "fullscreen"],
                format=OVERLAYS,
            )
        with gr.Column(scale=3):
            words = gr.HighlightedText(
                label="Caption, word by word (click a word)",
                show_legend=False,
                show_inline_category=False,
                elem_id="word-caption",
                color_map={"looking at": "#f59e0b"},
            )
            word_evidence = gr.Markdown(elem_id="word-evidence")
            step = gr.Slider(1, 2, value=1, step=1, label="Word", interactive=False, elem_id="word-slider")
            opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Overlay opacity")
            gr.Markdown(
                "**Every word's attention**: click one to enlarge it. Red marks where the "
                "model looked most when it chose the word, blue where it looked least. "
                "**β** (0-1) is how much of the image the model let into that word; "
                "a word with a lower β than its neighbours came more from the "
                "language model. It is the model's own weighting, not a check: an "
                "object it invents can have as high a β as one it sees."
            )
            gallery = gr.Gallery(
                label="Attention per word",
                show_label=False,
                columns=5,  # CSS: as fit
                object_fit="contain",
                allow_preview=False,
                elem_id="attention-gallery",
                format=OVERLAYS,
            )
    return big, words, word_evidence, step, opacity, gallery
