"""Photos/s, start-up and peak memory of `captioner caption`: the plain batch captioner against
--engine ray with 1 and 2 CPU actors (a local Ray started by the command).

Each configuration runs as its own command over the folder: its wall time (photos/s over the
whole run), the time from its start to its first record on disk (start-up: Python, the model,
Ray and its actors, plus at least the first batch; Ray hands the driver finished batches in
bursts, so for Ray this bounds start-up from above), and its peak memory, the largest sum of
the resident memory of the command's process tree (driver, Ray's services and actors,
data-loading workers), sampled every 0.2 s. The configurations are interleaved over --rounds,
so a change in the machine's load hits them alike; the table gives the medians.

    python scripts/benchmark_ray.py PHOTOS --model weights
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def records_in(output: Path) -> int:
    """Records written so far: the output file, or the part files of a Ray output folder."""
    files = sorted(output.glob("part-*.jsonl")) if output.is_dir() else [output]
    count = 0
    for file in files:
        try:
            count += file.read_bytes().count(b"\n")
        except OSError:
            continue  # not there yet
    return count


def run(command: list[str], output: Path) -> tuple[float, float, int]:
    """(wall seconds, seconds to the first record, peak RSS bytes of the process tree) of one
    command, which must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, first = 0, None
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        if first is None and records_in(output):
            first = time.perf_counter() - start
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output_text = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{output_text[-2000:]}")
    return wall, wall if first is None else first, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", type=Path, help="a folder of photos (e.g. 100 Flickr8k dev photos)")
    parser.add_argument("--model", help="model folder (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, interleaved")
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if not p.name.startswith("."))
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per process, Ray's actors included
    os.environ.pop("RAY_ADDRESS", None)  # each command starts its own local Ray
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.rounds):
            for name, flags in CONFIGS.items():
                command = [sys.executable, "-m", "captioner", "caption", str(args.photos), "--no-progress"]
                command += ["--batch-size", str(args.batch_size), *flags]
                command += ["--model", args.model] if args.model else []
                output = Path(tmp, f"{repeat}-{name.replace(' ', '_').replace(',', '')}")
                results[name].append(run([*command, "-o", str(output)], output))
                wall, startup, peak = results[name][-1]
                print(f"{name}: {wall:.1f} s, first record after {startup:.1f} s", flush=True)
    load = os.getloadavg()
    machine = f"load average {load[0]:.1f} at the end, on {os.cpu_count()} cores"
    print(f"\n{len(photos)} photos, batch size {args.batch_size}, {args.rounds} rounds, {machine}")
    print("medians of the rounds")
    print("| configuration | whole run | photos/s | first record after | peak RSS |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        wall, startup, peak = (statistics.median(values) for values in zip(*runs, strict=True))
        rate = len(photos) / wall
        print(f"| {name} | {wall:.1f} s | {rate:.2f} | {startup:.1f} s | {peak / 2**30:.2f} GB |")


if __name__ == "__main__":
    main()
