"""The web app's page: where each component sits, how it looks, and the sliders' ranges.

captioner.serving.webapp wires these components to the model; nothing here runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr
from gradio.helpers import Examples
from gradio_image_annotation import image_annotator

from captioner.model.options import DEFAULT_FOCUS_STRENGTH, DecodeOptions

TITLE = "captioner — Show, Attend and Tell"
MAX_BEAM, MAX_WORDS = 10, 50  # the sliders' ranges

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
class Page:
    """The components the app's events read and write."""

    image: gr.Image
    beam: gr.Slider
    length: gr.Slider
    button: gr.Button
    picker: Any  # the region picker (gradio_image_annotation)
    strength: gr.Slider
    focus_box: gr.Textbox
    region_button: gr.Button
    whole_image: gr.Textbox  # the API's box argument: none by default
    caption: gr.Textbox
    info: gr.Markdown
    table: gr.Dataframe
    examples: Examples
    big: gr.Image
    words: gr.HighlightedText
    step: gr.Slider
    opacity: gr.Slider
    gallery: gr.Gallery
    about: gr.Markdown


def page(examples: list[list[str]], credits: str, about: str, options: DecodeOptions) -> Page:
    """The UI, inside a gr.Blocks: image and controls left, caption and alternatives right,
    attention below, the model's description last. The sliders start at `options`."""
    gr.Markdown(f"# {TITLE}\nUpload, paste or snap a photo: the model describes it and shows "
                "which part of the image it looked at for every word.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            image, beam, length, button = input_controls(options)
            picker, strength, focus_box, region_button = region_controls()
            whole_image = gr.Textbox("", visible=False)
        with gr.Column(scale=6):
            caption, info, table = caption_view()
            gallery_examples = gr.Examples(examples, inputs=[image], label="Examples (click one)",
                                           examples_per_page=len(examples), elem_id="examples",
                                           api_visibility="private")
            gr.Markdown(f"Example photos from scikit-image: {credits}.", elem_classes="small-print")
    big, words, step, opacity, gallery = attention_view()
    with gr.Accordion("About the model", open=False):
        about_text = gr.Markdown(about, elem_classes="small-print")
    return Page(image, beam, length, button, picker, strength, focus_box, region_button, whole_image,
                caption, info, table, gallery_examples, big, words, step, opacity, gallery, about_text)


def input_controls(options: DecodeOptions) -> tuple[gr.Image, gr.Slider, gr.Slider, gr.Button]:
    """The photo, the beam size and maximum length sliders, and the Caption button."""
    image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                     height=380, elem_id="input-image")
    with gr.Row():
        beam = gr.Slider(1, MAX_BEAM, value=options.beam_size, step=1, label="Beam size",
                         info="1 = greedy; more beams explore more captions")
        length = gr.Slider(min(5, options.max_length), MAX_WORDS, value=options.max_length, step=1,
                           label="Maximum length", info="words")
    button = gr.Button("Caption", variant="primary", size="lg", elem_id="caption-button")
    return image, beam, length, button


def caption_view() -> tuple[gr.Textbox, gr.Markdown, gr.Dataframe]:
    """The caption, the line of details under it, and the table of alternatives."""
    caption = gr.Textbox(label="Caption", lines=2, interactive=False, elem_id="caption",
                         buttons=["copy"], placeholder="The caption appears here")
    info = gr.Markdown(elem_id="caption-details")
    table = gr.Dataframe(headers=["#", "caption", "score", "p"],
                         datatype=["number", "str", "number", "number"],
                         label="Alternatives (beam search n-best, best first)",
                         interactive=False, wrap=True, column_widths=["7%", "51%", "18%", "24%"],
                         elem_id="alternatives")
    return caption, info, table


def region_controls() -> tuple[Any, gr.Slider, gr.Textbox, gr.Button]:
    """"Caption a region": the photo to draw a box on, the focus strength and the button."""
    with gr.Accordion("Caption a region", open=False, elem_id="region"):
        picker = image_annotator(None, single_box=True, image_type="filepath", sources=[],
                                 label_list=["focus"], use_default_label=True,
                                 label="Draw a box around what the caption should be about",
                                 show_label=True, height=380, elem_id="region-picker",
                                 show_download_button=False, show_clear_button=False)
        with gr.Row():
            strength = gr.Slider(0, 12, value=DEFAULT_FOCUS_STRENGTH, step=0.5, label="Focus strength",
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
