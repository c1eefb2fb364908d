"""The captioner web UI: `python app.py`, then open http://127.0.0.1:7860.

Flags override environment variables, which override the defaults (the model in weights/).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from captioner import Captioner, CheckpointError, ModelNotFoundError
from captioner.api import DEFAULT_WEIGHTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Caption images and see where the model looked.")
    parser.add_argument("--host", default=env("CAPTIONER_HOST", "127.0.0.1"),
                        help="address to bind; 0.0.0.0 exposes the app to your network ($CAPTIONER_HOST)")
    parser.add_argument("--port", type=int, default=env("CAPTIONER_PORT", "7860"),
                        help="port ($CAPTIONER_PORT, default 7860)")
    parser.add_argument("--checkpoint", type=Path, default=env("CAPTIONER_WEIGHTS") or DEFAULT_WEIGHTS,
                        help="model folder ($CAPTIONER_WEIGHTS, default: the shipped weights/)")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 decoder on CPU: faster captions, slightly different scores")
    parser.add_argument("--device", default=env("CAPTIONER_DEVICE"),
                        help="cpu, cuda, cuda:1, ... ($CAPTIONER_DEVICE, default: cuda if available)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device:
        try:
            torch.zeros(1, device=args.device)
        except (RuntimeError, AssertionError) as err:
            sys.exit(f"app.py: device {args.device!r} is not usable here: {err}")
    try:
        captioner = Captioner.from_pretrained(args.checkpoint, device=args.device, quantize=args.quantize)
    except (ModelNotFoundError, CheckpointError) as err:
        sys.exit(f"app.py: cannot start without a model: {err}")
    from captioner import webapp  # imports gradio: only worth it once there is a model

    about = webapp.describe_model(args.checkpoint, captioner)
    demo = webapp.build_app(captioner, about, webapp.example_images())
    webapp.serve(demo, args.host, args.port, args.share)


if __name__ == "__main__":
    main()
