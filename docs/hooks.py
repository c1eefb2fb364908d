"""MkDocs hook: the model card lives beside the model (weights/MODEL_CARD.md, which the Hub and
the installed package carry too); publish it, and the images it shows, as the site's
`model-card` page, so there is one copy and its relative image links resolve."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
PAGE = "model-card.md"


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, PAGE, abs_src_path=str(WEIGHTS / "MODEL_CARD.md")))
    for image in sorted(WEIGHTS.glob("*.png")):
        files.append(File.generated(config, image.name, abs_src_path=str(image)))
    return files
