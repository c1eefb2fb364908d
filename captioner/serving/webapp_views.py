"""What the app shows of a caption: the overlays, the alternatives table, the details line and
the large view of one word, all redrawn from the kept result (`Shown`) without the model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from captioner.serving.app_model import DISPLAY_SIZE, display_copy  # noqa: F401 (also views')

if TYPE_CHECKING:
    from captioner.model.results import CaptionResult
    from captioner.serving.app_model import Captioned, Seen


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
    evidence: list[Seen] | None = None  # the ImageNet labels the encoder saw (app_model.Seen)
    word_evidence: list[Seen | None] = field(default_factory=list)  # per word
    word_categories: list[str | None] = field(default_factory=list)  # the object each word names


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
    return [
        (overlay(shown, alpha, opacity), word_label(word, gate))
        for word, alpha, gate in zip(shown.words, shown.attention, shown.gate, strict=True)
    ]


def probability(log_prob: float) -> float:
    """Three significant digits: a whole caption's probability is often below 0.001."""
    return float(f"{math.exp(log_prob):.3g}")


def alternatives_table(result: CaptionResult | Captioned) -> list[list]:
    """Rank, caption, score (2 decimals: a phone's column holds "-105.12") and probability."""
    alternatives: list[Any] = list(result.alternatives)
    return [
        [rank, alt.text or "(empty)", round(alt.score, 2), probability(alt.log_prob)]
        for rank, alt in enumerate(alternatives, start=1)
    ]


def whole_number(value: Any, low: int, high: int, name: str) -> int:
    """The API's number, or a clear error naming the argument and its range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer() or not low <= number <= high:
        raise gr.Error(
            f"{name} must be a whole number from {low} to {high}, got {value!r}", print_exception=False
        )
    return int(number)


def opacity_value(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise gr.Error(f"opacity must be a number from 0 to 1, got {value!r}", print_exception=False)
    return number


def details(shown: Shown | None) -> str:
    """The line under the caption: its score, in words a person can read."""
    if shown is None:
        return ""
    parts = [
        f"**score** {shown.score:.3f} (log-probability)",
        f"**p** = {probability(shown.log_prob):g}",
        f"{len(shown.words)} words",
    ]
    if not shown.finished:
        parts.append("⚠️ cut at the maximum length")
    parts += [f"⚠️ {note}" for note in shown.notes]
    return " · ".join(parts)


def word_view(shown: Shown | None, index: Any, opacity: Any) -> tuple[dict, list[tuple[str, str | None]]]:
    """The large overlay for word `index` (1-based) and the caption with that word highlighted."""
    if shown is None or not shown.words:
        return gr.update(value=None, label="Attention for the selected word"), []
    i = whole_number(index, 1, len(shown.words), "word") - 1
    big = overlay(shown, shown.attention[i], opacity_value(opacity))
    label = f"Word {i + 1} of {len(shown.words)}: “{shown.words[i]}” · image gate β = {shown.gate[i]:.2f}"
    # word, space, word, ...: word j is token 2j
    tokens: list[tuple[str, str | None]] = [(" ", None)] * (2 * len(shown.words) - 1)
    tokens[::2] = [(word, "looking at" if j == i else None) for j, word in enumerate(shown.words)]
    return gr.update(value=big, label=label), tokens


def evidence_summary(shown: Shown | None) -> str:
    """Beside the caption: the labels the encoder's ImageNet classifier saw (of the box, when
    focused), and for each object word of the caption whether it saw it."""
    if shown is None:
        return ""
    if shown.evidence is None:
        return "**What the encoder saw**: this model has no ImageNet classifier to ask."
    where = "in the box" if shown.box is not None else "in the photo"
    labels = " · ".join(f"{e.label} {percent(e.probability)}" for e in shown.evidence)
    checked: dict[str, str] = {}
    for i, word in enumerate(shown.words):
        if shown.word_evidence[i] is not None or shown.word_categories[i] is not None:
            checked.setdefault(word, word_verdict(shown, i, short=True))
    words = " · ".join(checked.values()) or "no object words to check"
    return f"**What the encoder saw {where}** (ImageNet): {labels}  \n**The caption's objects**: {words}"


def percent(probability: float) -> str:
    return f"{100 * probability:.0f}%" if probability >= 0.01 else "<1%"


def word_verdict(shown: Shown, i: int, short: bool = False) -> str:
    """Word i against the evidence: seen (✓), not seen (✗), or a word ImageNet cannot check."""
    word, evidence, category = shown.words[i], shown.word_evidence[i], shown.word_categories[i]
    if evidence is None and category is None:
        return f"“{word}”: not an object word"
    if evidence is None and short:
        return f"{word}: no ImageNet class"
    if evidence is None:
        return f"“{word}”: ImageNet has no class for {category}, so no evidence either way"
    mark = "✓" if evidence.seen else "✗"
    if short:
        return f"{mark} {word} {percent(evidence.probability)}"
    what = "seen" if evidence.seen else "not seen"
    return f"{mark} “{word}”: {what}, {percent(evidence.probability)} (most likely: {evidence.label})"


def word_evidence_view(shown: Shown | None, index: Any) -> str:
    """Beside the large overlay: the selected word's evidence."""
    if shown is None or not shown.words or shown.evidence is None:
        return ""
    i = whole_number(index, 1, len(shown.words), "word") - 1
    return "**Evidence**: " + word_verdict(shown, i)


def show_result(state: Shown | None, alpha: float) -> tuple[Any, ...]:
    """After a caption: the details line, the evidence, word 1's view and evidence, and a word
    slider as long as the caption."""
    big_image, tokens = word_view(state, 1, alpha)
    count = len(state.words) if state else 0
    slider = gr.Slider(minimum=1, maximum=max(count, 2), value=1, interactive=count > 1)
    return details(state), evidence_summary(state), big_image, tokens, word_evidence_view(state, 1), slider


def pick_thumbnail(event: gr.SelectData) -> int:
    return event.index + 1


def pick_word(event: gr.SelectData) -> int:
    return event.index // 2 + 1  # tokens alternate word, space
