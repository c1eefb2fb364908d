"""captioner: Show, Attend and Tell image captioning."""

from .api import Alternative, Captioner, CaptionResult, ModelNotFoundError
from .checkpoint import CheckpointError, load_model, save_model
from .images import ImageLoadError, load_image
from .model import CaptionModel, ModelConfig
from .vocabulary import Vocabulary

__all__ = [
    "Alternative", "CaptionModel", "CaptionResult", "Captioner", "CheckpointError",
    "ImageLoadError", "ModelConfig", "ModelNotFoundError", "Vocabulary", "load_image",
    "load_model", "save_model",
]
__version__ = "0.1.0"
