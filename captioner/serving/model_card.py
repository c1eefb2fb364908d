"""What the app says about its model: a short summary (the architecture, the training data, the
scores) and the full model card for a page of its own.

The summary reads the model folder's MODEL_CARD.md and the loaded config.json, never the machine
it was trained on: the scores are the card's (the README quotes the same table), the data its
"Data" section. No torch and no gradio here: the app's model process writes the summary as soon
as the model has loaded (captioner.serving.app_model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.serving.hub import CARD_FILE

SCORES = ("BLEU-4", "METEOR", "CIDEr")  # what the summary quotes, in this order
CARD_PAGE = "model-card"  # the app's page with the full card
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s:]+)\)")  # ![alt](file.png): local images, not URLs


@dataclass(frozen=True)
class ModelFacts:
    """What the summary needs from a loaded model (picklable: it crosses to the app's process)."""

    config: dict[str, Any]  # the model folder's config.json
    parameters: int
    grid: tuple[int, int]
    words: int  # vocabulary entries

    @classmethod
    def of(cls, captioner: Any) -> ModelFacts:
        """From a loaded Captioner."""
        config = captioner.config if isinstance(getattr(captioner, "config", None), dict) else {}
        return cls(
            config,
            sum(p.numel() for p in captioner.model.parameters()),
            tuple(captioner.grid_shape),
            len(captioner.vocab.words),
        )


def describe_model(folder: Path, facts: ModelFacts | Any) -> str:
    """Markdown for the About panel: what the model is, what it learnt from, how well it scores,
    and a link to the full card. `facts`: a ModelFacts or a loaded Captioner."""
    facts = facts if isinstance(facts, ModelFacts) else ModelFacts.of(facts)
    directory = folder.parent if folder.is_file() else folder
    card = directory / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else None
    config = facts.config or read_config(directory)
    metadata = _dict(config.get("metadata"))
    lines = [architecture(config, facts)]
    data = (section_paragraph(text, "Data") if text else None) or trained_on(metadata)
    if data:
        lines.append(f"**Training data.** {data}")
    scores = card_scores(text) if text else None
    if scores is None:
        scores = logged_scores(metadata)
    if scores is not None:
        where, values = scores
        lines.append(f"**Scores** ({where}): " + " · ".join(f"{k} {v}" for k, v in values.items()))
    lines.append(
        f"[Read the full model card]({CARD_PAGE}): how it was made and what it gets wrong."
        if text
        else "_No model card (MODEL_CARD.md) ships with this model._"
    )
    return "\n\n".join(lines)


def architecture(config: dict[str, Any], facts: ModelFacts) -> str:
    model = _dict(config.get("model"))
    size = config.get("ensemble_size", model.get("decoders", 1))
    decoder = (
        "an LSTM decoder"
        if size == 1
        else f"{size} LSTM decoders, trained apart, that average their word log-probabilities, each"
    )
    return (
        f"**Model.** Show, Attend and Tell: a `{model.get('backbone', '?')}` CNN sees the photo at "
        f"{model.get('image_size', '?')} px as a {'×'.join(map(str, facts.grid))} grid of regions; "
        f"{decoder} with {model.get('attention', 'soft')} attention weighs those regions afresh "
        f"before each word. {facts.parameters / 1e6:.1f} M parameters, {facts.words:,}-word vocabulary."
    )


def card_scores(card: str) -> tuple[str, dict[str, str]] | None:
    """The default decoding's scores in the card's scores table, as written there, with what they
    were measured on (the heading's parenthesis): ("Flickr8k dev split, ...", {"BLEU-4": "23.79", ...})."""
    heading = ""
    lines = card.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        header = _cells(line)
        if not all(name in header for name in SCORES) or i + 1 >= len(lines):
            continue
        for row in lines[i + 2 :]:
            cells = _cells(row)
            if not cells:
                break
            if "default" in cells[0] and len(cells) == len(header):
                found = re.search(r"\((.*)\)", heading)
                where = f"{found.group(1) if found else heading or 'the card'}; default decoding"
                return where, {name: cells[header.index(name)] for name in SCORES}
    return None


def logged_scores(metadata: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
    """Without a card: the validation scores training logged when it saved this model."""
    scores = _dict(metadata.get("val_scores"))
    values = {
        name: f"{scores[name]:.2f}"
        for name in SCORES
        if isinstance(scores.get(name), (int, float)) and not isinstance(scores.get(name), bool)
    }
    return ("validation split, as logged in training", values) if values else None


def section_paragraph(card: str, title: str) -> str | None:
    """The first paragraph of the card's section `title` ("## Data ..."), on one line."""
    found = re.search(rf"^##\s+{re.escape(title)}\b.*?\n\s*\n(.+?)(?:\n\s*\n|\Z)", card, re.M | re.S)
    return " ".join(found.group(1).split()) if found else None


def trained_on(metadata: dict[str, Any]) -> str | None:
    """Without a card: the metadata's own words, else the dataset's kind (never its paths)."""
    if isinstance(metadata.get("trained_on"), str):
        return metadata["trained_on"]
    data = _dict(_dict(metadata.get("train_config")).get("data"))
    return f"a dataset in the `{data['kind']}` layout" if isinstance(data.get("kind"), str) else None


def card_page(folder: Path) -> tuple[str, list[Path]] | None:
    """The full model card for the app's card page, with its local images pointed at Gradio's file
    route, and those image files (the only ones the app may serve); None without a card."""
    directory = folder.parent if folder.is_file() else folder
    card = directory / CARD_FILE
    if not card.is_file():
        return None
    images: list[Path] = []

    def link(match: re.Match[str]) -> str:
        path = (directory / match.group(2)).resolve()
        if not path.is_file() or not path.is_relative_to(directory.resolve()):
            return f"*({match.group(1)}: {match.group(2)} is not in the model folder)*"
        images.append(path)
        return f"![{match.group(1)}](gradio_api/file={path})"

    return _IMAGE.sub(link, card.read_text(encoding="utf-8")), images


def _cells(line: str) -> list[str]:
    """A Markdown table row -> its cells without emphasis; [] if it is no row."""
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return []
    return [cell.strip().strip("*").strip() for cell in line[1:-1].split("|")]


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else {}: a model folder's config is read, not trusted."""
    return value if isinstance(value, dict) else {}


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a model folder as a dict ({} if it cannot be read)."""
    try:
        return _dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}
