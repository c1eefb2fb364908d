"""The app's memory under use: RSS of its page process and of its model process, round by round.

    python scripts/benchmark_app_memory.py                    # shipped model, 6 rounds
    python scripts/benchmark_app_memory.py --same-sessions    # the same 6 clients every round
    python scripts/benchmark_app_memory.py --rounds 10 --model runs/x/best

Starts `python app.py` on a free local port; in each round 6 new clients (browser sessions;
`--same-sessions`: the same 6 every round) at once send 5 requests each over real HTTP
(gradio_client, the app's /caption API): a photo, the same photo focused on a box, a large
photo, a file that is no image and a tiny photo, in a different order per client. Every caption
carries its evidence (always on in the app). After each round (and before the first) it prints
the resident memory (RSS, from /proc) of both processes, their sum and their peaks (VmHWM).
Memory that levels off is bounded; memory that grows by the same amount every round is a leak.
"""

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of a process in MB, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def model_process(pid: int) -> int:
    """The app's model process: its child started by multiprocessing's spawn (not its resource
    tracker)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    sys.exit("the app has no model process")


def wait_until_serving(server: subprocess.Popen, url: str, timeout: float = 300) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            sys.exit(f"app.py exited with code {server.returncode}")
        try:
            direct.open(url, timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"app.py did not answer at {url} in {timeout:.0f} s")
            time.sleep(0.5)


def test_files(folder: Path) -> dict[str, Path]:
    """The requests' files: photos of several sizes (from scikit-image) and a file that is no image."""
    from skimage import data

    files = {
        "photo": (Image.fromarray(data.chelsea()), "chelsea.jpg"),
        "large": (Image.fromarray(data.astronaut()).resize((3000, 3000)), "large.jpg"),
        "tiny": (Image.fromarray(data.coffee()).resize((24, 16)), "tiny.png"),
    }
    paths = {}
    for kind, (image, name) in files.items():
        image.save(folder / name)
        paths[kind] = folder / name
    paths["bad"] = folder / "holiday.jpg"
    paths["bad"].write_bytes(np.random.default_rng(0).bytes(20_000))
    return paths


def request(client: Client, kind: str, files: dict[str, Path]) -> str:
    """One /caption request of a kind: photo, focus, large, bad, tiny. What came back, in a word."""
    path = handle_file(str(files["photo" if kind == "focus" else kind]))
    box = "100, 50, 300, 250" if kind == "focus" else ""
    try:
        caption, _, _ = client.predict(path, 3, 20, 0.6, box, 2.0, api_name="/caption")
    except Exception as err:  # noqa: BLE001 (the bad file's error is expected)
        return f"error: {str(err)[:60]}"
    return "ok" if caption else "empty"


def run_round(clients: list[Client], files: dict[str, Path], seed: int) -> dict[str, int]:
    kinds = ["photo", "focus", "large", "bad", "tiny"]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def client_session(index: int) -> None:
        order = random.Random(seed * 100 + index).sample(kinds, len(kinds))
        client = clients[index]
        for kind in order:
            outcome = f"{kind}: {request(client, kind, files)}"
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=client_session, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument(
        "--same-sessions",
        action="store_true",
        help="the same clients (browser sessions) every round, instead of new ones each round: "
        "tells memory kept per session (gr.State) from memory that grows per request",
    )
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port)]
    command += ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+b") as log:
        files = test_files(Path(tmp))
        server = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(server, url)
            Client(url, verbose=False).predict(
                handle_file(str(files["photo"])), api_name="/caption"
            )  # loaded
            model = model_process(server.pid)
            sessions = "the same sessions" if args.same_sessions else "new sessions each round"
            print(f"{args.clients} clients x 5 requests per round, {sessions}; RSS in MB (peak in brackets)")
            print("round   app process   model process    sum    seconds   outcomes")
            report(0, server.pid, model, 0.0, {})
            for number in range(1, args.rounds + 1):
                start = time.perf_counter()
                if number == 1 or not args.same_sessions:
                    clients = [Client(url, verbose=False) for _ in range(args.clients)]
                outcomes = run_round(clients, files, number)
                report(number, server.pid, model, time.perf_counter() - start, outcomes)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.seek(0)
            text = log.read().decode(errors="replace")
            print(f"tracebacks in the server log: {text.count('Traceback')}")
            if "Traceback" in text:
                print(text[text.rindex("Traceback") :][-3000:])


def report(number: int, app: int, model: int, seconds: float, outcomes: dict[str, int]) -> None:
    (app_rss, app_peak), (model_rss, model_peak) = memory_mb(app), memory_mb(model)
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(outcomes.items())) or "after one caption"
    print(
        f"{number:5d}   {app_rss:5.0f} ({app_peak:4.0f})   {model_rss:5.0f} ({model_peak:4.0f})   "
        f"{app_rss + model_rss:6.0f}   {seconds:6.1f}   {summary}",
        flush=True,
    )


if __name__ == "__main__":
    main()
