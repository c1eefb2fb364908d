"""What evidence=True costs: caption() with and without it, interleaved photo by photo, 1 thread.

PYTHONPATH=. python scripts/time_evidence.py --images ../shared/data/coco-mini/train2017 --n 20
(--no-quantize: float32)
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from captioner.cli.flags import add_quantize_flag
from captioner.model.evidence import EVIDENCE_STAGE
from captioner.serving.captioner import Captioner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", required=True)
    parser.add_argument("--n", type=int, default=20, help="photos (each captioned once per setting)")
    add_quantize_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    captioner = Captioner.from_pretrained(device="cpu", quantize=args.quantize)
    photos = sorted(Path(args.images).glob("*.jpg"))[: args.n]
    captioner.caption(photos[0], evidence=True)  # builds the evidence head (once per Captioner)
    settings = {"plain": {}, "evidence": {"evidence": True}, "penalty 4": {"evidence_penalty": 4.0}}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for photo in photos:
        for name, extra in settings.items():
            start = time.perf_counter()
            captioner.caption(photo, **extra)
            times[name].append(time.perf_counter() - start)
    head, stages = captioner.evidence_head(), captioner.model.encoder.stages[:EVIDENCE_STAGE]
    times["ImageNet tail+fc alone"] = []
    with torch.inference_mode():
        for photo in photos:
            stage_input = captioner.preprocess(photo).unsqueeze(0)
            for stage in stages:
                stage_input = stage(stage_input)
            start = time.perf_counter()
            head(stage_input)
            times["ImageNet tail+fc alone"].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} median {1000 * median:7.1f} ms  ({100 * (median / plain - 1):+.1f} % vs plain)")


if __name__ == "__main__":
    main()
