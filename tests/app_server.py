"""Run app.py in a subprocess on a free local port, for the HTTP and browser tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
START_TIMEOUT = 180  # seconds; start-up is a few seconds on an idle machine, much more on a busy one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoint: Path, log_path: Path | None = None) -> Iterator[str]:
    """Start `python app.py --checkpoint ... --port N`, wait until it serves its page, yield its URL.
    The server's output (stdout and stderr) goes to `log_path` if given."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    with open(log_path, "w+b") if log_path else tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--port", str(port)],
            cwd=ROOT,
            env=os.environ | OFFLINE_ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"app.py exited with code {server.returncode}:\n{log.read().decode()}")
                try:
                    direct.open(url, timeout=5).close()
                    break
                except OSError as err:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"app.py did not answer at {url} in {START_TIMEOUT} s") from err
                    time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
