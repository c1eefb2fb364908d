"""What a decoding setting costs: single-photo caption() per setting, interleaved photo by photo
(so the machine's load hits every setting alike), 1 thread; prints medians and ratios.

PYTHONPATH=. python scripts/time_decoding.py --images ../shared/data/coco-mini/train2017 --n 20
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from captioner.serving.captioner import Captioner

SETTINGS = {
    "beam 3 (previous default)": {"beam_size": 3, "length_penalty": 0.0},
    "beam 5, lp 1.0 (default)": {},
    "default + (a)+(b)+(f)": {"constrain_evidence": 0.3, "evidence_penalty": 4.0, "person_penalty": 4.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", required=True)
    parser.add_argument("--n", type=int, default=20, help="photos")
    parser.add_argument("--repeats", type=int, default=3, help="times each photo is captioned per setting")
    args = parser.parse_args()
    torch.set_num_threads(1)
    captioner = Captioner.from_pretrained(device="cpu")
    photos = sorted(Path(args.images).glob("*.jpg"))[: args.n]
    for extra in SETTINGS.values():  # warm up; builds the evidence head once
        captioner.caption(photos[0], **extra)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for photo in photos:
            for name, extra in SETTINGS.items():
                start = time.perf_counter()
                captioner.caption(photo, **extra)
                times[name].append(time.perf_counter() - start)
    first = statistics.median(next(iter(times.values())))
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} median {1000 * median:6.0f} ms  x{median / first:.2f}")


if __name__ == "__main__":
    main()
