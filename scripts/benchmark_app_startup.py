"""App start-up: seconds from `python app.py` to its page, to the model loaded, to a first caption.

    python scripts/benchmark_app_startup.py               # 3 starts of app.py, shipped model
    python scripts/benchmark_app_startup.py --runs 5 --model runs/x/best

Also prints where an in-process start spends its time (imports, model load, UI build), each
phase timed alone, one after the other. Numbers depend on the machine's load: note `uptime`.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1"}
PHASES = """
import sys, time
t = time.perf_counter()
def mark(label):
    global t
    now = time.perf_counter()
    print(f"{now - t:6.2f} s  {label}", flush=True)
    t = now
import gradio; mark("import gradio")
from captioner.serving import webapp; mark("import captioner.serving.webapp")
import torch; mark("import torch")
import timm; mark("import timm (the encoder)")
from captioner import Captioner; mark("import the rest of captioner.api (torchvision, ...)")
cap = Captioner.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else None, device="cpu")
mark("load the model")
about = webapp.describe_model(cap.path, cap); examples = webapp.example_images()
mark("about panel + examples")
webapp.build_app(cap, about, examples); mark("build the UI")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_start(model: str | None) -> tuple[float, float]:
    """(seconds to the page, seconds to the first caption) for one `python app.py`."""
    from gradio_client import Client, handle_file
    from PIL import Image
    from skimage import data

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--device", "cpu"]
    start = time.perf_counter()
    server = subprocess.Popen(command + (["--model", model] if model else []), cwd=ROOT,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"app.py exited with code {server.returncode}")
            try:
                direct.open(url, timeout=5).close()
                break
            except OSError:
                time.sleep(0.05)
        page = time.perf_counter() - start
        photo = Path("/tmp/captioner-startup-photo.png")
        Image.fromarray(data.astronaut()).save(photo)
        Client(url, verbose=False).predict(handle_file(str(photo)), 1, 20, 0.6, api_name="/caption")
        return page, time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", "--checkpoint", help="model folder (default: the shipped model)")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    pages, captions = zip(*(one_start(args.model) for _ in range(args.runs)), strict=True)
    print(f"python app.py -> page served:   median {statistics.median(pages):.2f} s  "
          f"({', '.join(f'{p:.2f}' for p in pages)})")
    print(f"python app.py -> first caption: median {statistics.median(captions):.2f} s  "
          f"({', '.join(f'{c:.2f}' for c in captions)})")
    print("where an in-process start spends its time (phase by phase):")
    subprocess.run([sys.executable, "-c", PHASES, *([args.model] if args.model else [])],
                   cwd=ROOT, env=ENV | {"PYTHONPATH": str(ROOT)}, check=True)


if __name__ == "__main__":
    main()
