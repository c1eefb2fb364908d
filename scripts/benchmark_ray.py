"""Photos/s, start-up and peak memory of `captioner caption`: the plain batch captioner against
--engine ray with 1 and 2 CPU actors (a local Ray started by the command).

Each configuration runs as its own command, first on one photo (its start-up: Python, the model,
Ray and its actors) and then on every photo of the folder; photos/s is the extra photos over the
extra wall time, peak memory the largest sum of the resident memory of the command's process
tree (driver, Ray's services and actors, data-loading workers), sampled every 0.2 s. The
configurations are interleaved, so a change in the machine's load hits them alike.

    python scripts/benchmark_ray.py PHOTOS --model weights
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "plain batch captioner": [],
    "ray, 1 CPU actor": ["--engine", "ray", "--concurrency", "1"],
    "ray, 2 CPU actors": ["--engine", "ray", "--concurrency", "2"],
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: the parent's pid
        rss[pid] = int(fields[21]) * PAGE  # resident pages
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the process tree) of one command, which must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-2000:]}")
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of photos (e.g. 100 Flickr8k dev photos)")
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if not p.name.startswith("."))
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per process, Ray's actors included
    os.environ.pop("RAY_ADDRESS", None)  # each command starts its own local Ray
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp, "one")
        one.mkdir()
        (one / photos[0].name).symlink_to(photos[0].resolve())
        results = {}
        for name, flags in CONFIGS.items():
            base = [sys.executable, "-m", "captioner", "caption", "--no-progress"]
            base += ["--batch-size", str(args.batch_size)] + (["--model", args.model] if args.model else [])
            key = name.replace(" ", "_").replace(",", "")
            startup, _ = run([*base, str(one), "-o", f"{tmp}/{key}-one", *flags])
            wall, peak = run([*base, str(args.photos), "-o", f"{tmp}/{key}-all", *flags])
            results[name] = (startup, wall, peak)
            print(f"{name}: {len(photos)} photos in {wall:.1f} s, 1 photo in {startup:.1f} s", flush=True)
    load = os.getloadavg()
    machine = f"load average {load[0]:.1f} on {os.cpu_count()} cores"
    print(f"\n{len(photos)} photos, batch size {args.batch_size}, {machine}")
    print("| configuration | start-up (1 photo) | photos/s after start-up | whole run | peak RSS |")
    print("|---|---|---|---|---|")
    for name, (startup, wall, peak) in results.items():
        rate = (len(photos) - 1) / max(wall - startup, 1e-9)
        print(f"| {name} | {startup:.1f} s | {rate:.2f} | {wall:.1f} s | {peak / 2**30:.2f} GB |")


if __name__ == "__main__":
    main()
