"""What the serving tools can be told besides the decoding options, as plain dataclasses.

No torch here: `captioner caption` builds its flags from these fields without loading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from captioner.data.limits import DEFAULT_MAX_PIXELS
from captioner.model.options import DEFAULT_FOCUS_STRENGTH, check_focus_strength, check_whole_number

DEFAULT_NUM_WORKERS = min(2, os.cpu_count() or 1)

# The encoders `captioner benchmark --dev-cider` can score (captioner.serving.benchmark).
ENCODER_OPTIONS = ("torch", "onnx", "int8")


@dataclass(frozen=True)
class BatchSettings:
    """How `caption_files` runs; every field is a flag of `captioner caption`."""

    batch_size: int = 32
    """Images captioned together."""
    num_workers: int | None = None
    """Processes decoding images while the model runs; 0: decode in the main process (none: 2,
    or 1 on a 1-core machine)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Larger images are refused as possible decompression bombs."""
    retry_failed: bool = False
    """Retry images that failed in an earlier run (their rows are replaced)."""
    save_attention: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Write a PNG of each image's per-word attention into this folder (slow)."""
    progress: bool = True
    """Show a progress bar."""
    focus_strength: float = DEFAULT_FOCUS_STRENGTH
    """How hard attention is pulled into a --focus-json box (0 to 10000)."""

    def __post_init__(self) -> None:
        check_whole_number("batch_size", self.batch_size, 1)
        if self.num_workers is not None:
            check_whole_number("num_workers", self.num_workers, 0)
        check_whole_number("max_pixels", self.max_pixels, 1)
        check_focus_strength(self.focus_strength)  # before any work: one bad value fails no image

    @property
    def workers(self) -> int:
        """num_workers, with none resolved to this machine's default."""
        return DEFAULT_NUM_WORKERS if self.num_workers is None else self.num_workers
