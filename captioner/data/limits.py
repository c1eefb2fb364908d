"""Limits on the images the library reads, torch-free so that the command line can show them."""

from __future__ import annotations

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger files are treated as decompression bombs
