"""App start-up: seconds from `python app.py` to its page, to the model loaded, to a first caption.

    python scripts/benchmark_app_startup.py                        # 3 starts of app.py, shipped model
    python scripts/benchmark_app_startup.py --runs 5 --model runs/x/best
    python scripts/benchmark_app_startup.py --compare ../old-checkout   # interleaved: this, old, this...

The first caption is asked for as soon as the page answers (the worst case: nothing has warmed up).
Then prints where the time goes, phase by phase, each phase timed alone in one process: what the
app's process does before serving and what its model process does before the first caption (on
the threads the app gives it).
Numbers depend on the machine's load: compare checkouts with --compare, which interleaves their
starts so that both see the same load.
"""

import argparse
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
PHOTO = Path("/tmp/captioner-startup-photo.png")
PHASES = """
import sys, time
t = time.perf_counter()
def mark(label):
    global t
    now = time.perf_counter()
    print(f"{now - t:6.2f} s  {label}", flush=True)
    t = now
print("the app's process, before it serves the page:")
import gradio; mark("import gradio")
from captioner.serving import webapp; mark("import captioner.serving.webapp")
demo = webapp.build_app(None, "", webapp.example_images()); mark("build the UI")
import os
threads = os.environ["OMP_NUM_THREADS"]
print(f"the model process, before the first caption (on {threads} threads, as in the app):")
import torch; mark("import torch")
import timm; mark("import timm (the encoder)")
from captioner.serving.captioner import Captioner; mark("import the rest (nltk, torchvision, ...)")
cap = Captioner.from_pretrained(sys.argv[1] or None, device="cpu")
mark("load the model")
from PIL import Image
photo = Image.open(sys.argv[2]).convert("RGB")
cap.caption(photo); mark("first caption (cold)")
cap.caption(photo); mark("second caption (warm)")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_start(root: Path, model: str | None) -> tuple[float, float | None, float, float]:
    """(seconds to the page, to the app's "model loaded" line if it prints one, to the first
    caption; CPU seconds the app and its model process used, up to their exit right after) for
    one `python app.py` of the checkout `root`. The CPU seconds depend little on the load."""
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    command = [sys.executable, str(root / "app.py"), "--port", str(port), "--device", "cpu"]
    cpu_before = cpu_of_children()
    start = time.perf_counter()
    server = subprocess.Popen(
        command + (["--model", model] if model else []),
        cwd=root,
        env=ENV | {"PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    loaded: list[float] = []

    def watch() -> None:
        for line in server.stdout or []:
            if re.search(r"model loaded", line, re.I) and not loaded:
                loaded.append(time.perf_counter() - start)

    threading.Thread(target=watch, daemon=True).start()
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
        Client(url, verbose=False).predict(handle_file(str(PHOTO)), 1, 20, 0.6, api_name="/caption")
        caption = time.perf_counter() - start
    finally:  # Ctrl-C: the app stops its model process, so that its CPU time is counted too
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return page, (loaded[0] if loaded else None), caption, cpu_of_children() - cpu_before


def cpu_of_children() -> float:
    """User + system CPU seconds of the finished child processes (and theirs), so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report_pairs(runs: dict[Path, list]) -> None:
    """Start by start, this checkout's first caption against the other's, started right after."""
    ours, theirs = (runs[root] for root in runs)
    ratios = [a[2] / b[2] for a, b in zip(ours, theirs, strict=True)]
    print(
        f"first caption, this checkout / the other, start by start: median {statistics.median(ratios):.2f} "
        f"({', '.join(f'{r:.2f}' for r in ratios)})"
    )


def report(name: str, runs: list[tuple[float, float | None, float, float]]) -> None:
    pages, loads, captions, cpus = zip(*runs, strict=True)
    print(f"{name}:")
    print(
        f"  python app.py -> page served:   median {statistics.median(pages):5.2f} s  "
        f"({', '.join(f'{p:.2f}' for p in pages)})"
    )
    if all(load is not None for load in loads):
        print(
            f"  python app.py -> model loaded:  median {statistics.median(loads):5.2f} s  "
            f"({', '.join(f'{x:.2f}' for x in loads)})"
        )
    print(
        f"  python app.py -> first caption: median {statistics.median(captions):5.2f} s  "
        f"({', '.join(f'{c:.2f}' for c in captions)})"
    )
    print(
        f"  CPU time of the app's processes: median {statistics.median(cpus):5.2f} s  "
        f"({', '.join(f'{c:.2f}' for c in cpus)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="starts of each checkout (default: 3)")
    parser.add_argument("--model", "--checkpoint", help="model folder (default: the shipped model)")
    parser.add_argument(
        "--compare",
        metavar="CHECKOUT",
        type=Path,
        help="another checkout of captioner (e.g. the previous version) whose app.py "
        "starts alternate with this one's",
    )
    parser.add_argument(
        "--no-phases", dest="phases", action="store_false", help="skip the phase-by-phase breakdown"
    )
    args = parser.parse_args()
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(PHOTO)
    roots = [ROOT, *([args.compare.resolve()] if args.compare else [])]
    print(f"load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    runs: dict[Path, list] = {root: [] for root in roots}
    for _ in range(args.runs):
        for root in roots:  # interleaved: each checkout sees the same load
            runs[root].append(one_start(root, args.model))
    print(f"load average at the end:   {os.getloadavg()[0]:.2f}")
    for root in roots:
        report(str(root), runs[root])
    if args.compare:
        report_pairs(runs)
    if args.phases:
        from captioner.serving.app_model import default_threads

        print("where the time goes (phase by phase, each alone, in one process):")
        subprocess.run(
            [sys.executable, "-c", PHASES, args.model or "", str(PHOTO)],
            cwd=ROOT,
            check=True,
            env=ENV | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(default_threads())},
        )


if __name__ == "__main__":
    main()
