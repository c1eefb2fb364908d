"""captioner: Show, Attend and Tell image captioning.

The public names load their module on first use, so `import captioner` (and the `captioner`
command's --help) stays fast: torch is imported when a model is, gradio and matplotlib only by
the app and the attention figures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioner.data.images import ImageLoadError, load_image
    from captioner.model.caption_model import CaptionModel
    from captioner.model.config import ModelConfig
    from captioner.model.folder import CheckpointError, load_model, save_model
    from captioner.model.options import DecodeOptions
    from captioner.model.results import Alternative, CaptionResult
    from captioner.model.vocabulary import Vocabulary
    from captioner.serving.captioner import Captioner
    from captioner.serving.hub import ModelNotFoundError

_EXPORTS = {
    "Alternative": "model.results",
    "CaptionResult": "model.results",
    "Captioner": "serving.captioner",
    "DecodeOptions": "model.options",
    "CheckpointError": "model.folder",
    "load_model": "model.folder",
    "save_model": "model.folder",
    "ModelNotFoundError": "serving.hub",
    "ImageLoadError": "data.images",
    "load_image": "data.images",
    "CaptionModel": "model.caption_model",
    "ModelConfig": "model.config",
    "Vocabulary": "model.vocabulary",
}
__all__ = [
    "Alternative",
    "CaptionModel",
    "CaptionResult",
    "Captioner",
    "CheckpointError",
    "DecodeOptions",
    "ImageLoadError",
    "ModelConfig",
    "ModelNotFoundError",
    "Vocabulary",
    "load_image",
    "load_model",
    "save_model",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'captioner' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
