"""`captioner app`: the web UI, served while its model loads beside it.

The page needs gradio; the model needs torch, timm and the model's modules. Both are mostly
imports bound to one core by Python's GIL, so the model loads in a process of its own
(serving.app_model), started before gradio is imported: on a 2-core machine the first caption
comes about as soon as the slower of the two is ready, not after both.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.cli.caption import MODEL_HELP, add_decoding_arguments, add_model_arguments
from captioner.cli.errors import CommandError
from captioner.cli.flags import Switch, add_quantize_flag, checked_config, positive_int
from captioner.model.options import DecodeOptions

if TYPE_CHECKING:
    from captioner.serving.app_model import ModelProcess


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags override environment variables, which override the defaults."""
    env = os.environ.get
    parser.add_argument(
        "--host",
        default=env("CAPTIONER_HOST", "127.0.0.1"),
        help="address to bind; 0.0.0.0 exposes the app to your network ($CAPTIONER_HOST, default 127.0.0.1)",
    )
    parser.add_argument(
        "--port", type=int, default=env("CAPTIONER_PORT", "7860"), help="port ($CAPTIONER_PORT, default 7860)"
    )
    add_model_arguments(
        parser,
        MODEL_HELP.replace(", or $CAPTIONER_WEIGHTS", "; $CAPTIONER_WEIGHTS"),
        default=env("CAPTIONER_WEIGHTS"),
    )
    add_quantize_flag(parser)
    parser.add_argument(
        "--device",
        default=env("CAPTIONER_DEVICE"),
        help="cpu, cuda, cuda:1, ... ($CAPTIONER_DEVICE, default: cuda if available)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads the model runs on ($OMP_NUM_THREADS, default: all cores but "
        "one, which the page keeps; at least 1)",
    )
    parser.add_argument(
        "--share",
        action=Switch,
        default=False,
        help="also serve through a public gradio.live link (default: off)",
    )
    add_decoding_arguments(parser)  # beam size and length: the sliders' starting values
    return parser


def run_app(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Serve the page and load the model side by side. Each is mostly imports bound to one core
    (gradio for the page; torch, timm and the model's modules for the model), so the model loads
    in a process of its own (serving.app_model), started first. A missing model or a busy port
    is refused before anything starts; a model that fails to load stops the app."""
    options: DecodeOptions = checked_config(parser, DecodeOptions, args)
    from captioner.serving import hub

    try:
        folder = hub.find_model(args.model, args.revision)
    except hub.ModelNotFoundError as err:
        raise CommandError(f"cannot start without a model: {err}") from err
    if not folder.exists():
        raise CommandError(
            f"cannot start without a model: {folder} does not exist: pass --model with "
            "a model folder (config.json + model.safetensors) or a Hub repo id"
        )
    check_port(args.host, args.port)
    from captioner.serving.app_model import ModelProcess

    model = ModelProcess(folder, args.device, args.quantize, args.threads)
    model.start()
    try:
        serve_app(model, folder, options, args, parser)
    finally:
        model.stop()
    if model.error is not None:
        raise CommandError(model.error)
    return 0


def serve_app(
    model: ModelProcess,
    folder: Path,
    options: DecodeOptions,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
) -> None:
    """Build the page while the model loads and serve it until Ctrl-C or a failed load."""
    from captioner.serving import model_card, webapp  # imports gradio

    try:
        webapp.check_options(options)
    except ValueError as err:  # "beam_size must be ..." -> "--beam-size must be ..."
        name, _, rest = str(err).partition(" ")
        parser.error(f"--{name.replace('_', '-')} {rest}")
    card = model_card.card_page(folder)
    demo = webapp.build_app(
        model, model.describe, webapp.example_images(), options, card=card[0] if card else None
    )
    threading.Thread(target=preload_photo_modules, name="preload", daemon=True).start()
    threading.Thread(target=announce_model, args=(model,), name="announce", daemon=True).start()
    try:
        webapp.serve(
            demo, args.host, args.port, args.share, stop=model.failed, allowed_paths=card[1] if card else None
        )
    except OSError as err:  # the port was taken after check_port
        raise CommandError(f"cannot serve on {args.host}:{args.port} ({err}): pass another --port") from err


def announce_model(model: ModelProcess) -> None:
    """One line in the log once the app can caption (its page is served before)."""
    model.ready.wait()
    if model.error is None:
        print("* Model loaded: ready to caption", flush=True)


def preload_photo_modules() -> None:
    """The overlays of the first photo need matplotlib (captioner.visualize): import it while the
    model loads rather than once the photo has arrived."""
    import captioner.visualize  # noqa: F401


def check_port(host: str, port: int) -> None:
    """CommandError if the app could not listen on host:port (it is taken, or not this machine's)."""
    import errno
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind(address)
    except OSError as err:
        taken = err.errno == errno.EADDRINUSE
        raise CommandError(
            f"port {port} on {host} is already in use: pass another --port, e.g. --port {port + 1}"
            if taken
            else f"cannot listen on --host {host} --port {port}: {getattr(err, 'strerror', None) or err}"
        ) from err
