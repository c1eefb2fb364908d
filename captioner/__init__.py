"""captioner: Show, Attend and Tell image captioning.

The public names load their module on first use, so `import captioner` (and the `captioner`
command's --help) stays fast: torch is imported when a model is, gradio and matplotlib only by
the app and the attention figures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Alternative, Captioner, CaptionResult
    from .checkpoint import CheckpointError, load_model, save_model
    from .hub import ModelNotFoundError
    from .images import ImageLoadError, load_image
    from .model import CaptionModel, ModelConfig
    from .vocabulary import Vocabulary

_EXPORTS = {
    "Alternative": "api", "CaptionResult": "api", "Captioner": "api",
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "save_model": "checkpoint",
    "ModelNotFoundError": "hub",
    "ImageLoadError": "images", "load_image": "images",
    "CaptionModel": "model", "ModelConfig": "model",
    "Vocabulary": "vocabulary",
}
__all__ = [
    "Alternative", "CaptionModel", "CaptionResult", "Captioner", "CheckpointError",
    "ImageLoadError", "ModelConfig", "ModelNotFoundError", "Vocabulary", "load_image",
    "load_model", "save_model",
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
