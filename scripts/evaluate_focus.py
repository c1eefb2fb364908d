"""Does focusing on a box make the caption name the boxed object? COCO instances as the test.

    python scripts/evaluate_focus.py --images ../shared/data/coco-mini/train2017 \\
        --instances ../shared/data/coco-mini/annotations/instances_train2017.json \\
        --strength 2 4 8 --how both attention start --output_dir eval/focus

For every object whose category covers 5-60% of its image: the rate at which the caption names
its category without focus and with focus on its box (all objects, and those whose category the
vocabulary can name), per steering method and strength; and the evidence of the box (issue
#37): how often the ImageNet classifier's top 5 labels name the object's category, from the
whole photo, pooled over the box (what a focused caption carries), from the crop of the
activations to the box, and from the crop of the photo. Decoding flags (--evidence-penalty ...)
are `captioner caption`'s. Writes metrics.json and trials-*.jsonl.
"""

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from captioner import Captioner
from captioner.cli.flags import FlagParser, Switch, add_config_arguments, checked_config
from captioner.evaluation.focus import HOW, evaluate_focus
from captioner.model.options import DecodeOptions


def main() -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of the instances file's images")
    parser.add_argument("--instances", required=True, help="COCO instances JSON")
    parser.add_argument("--model", "--checkpoint", help="model folder (default: the shipped model)")
    parser.add_argument("--strength", type=float, nargs="+", default=[4.0])
    parser.add_argument(
        "--how",
        choices=HOW,
        nargs="+",
        default=["both"],
        help="steer the attention scores and the initial state, or one of them",
    )
    parser.add_argument("--limit", type=int, help="the first N images only")
    parser.add_argument("--evidence", action=Switch, default=True, help="measure the boxes' evidence")
    add_config_arguments(parser, DecodeOptions)
    parser.add_argument("--output-dir", "--output_dir", type=Path)
    args = parser.parse_args()
    options = checked_config(parser, DecodeOptions, args)
    captioner = Captioner.from_pretrained(args.model)
    settings = [(how, strength) for how in args.how for strength in args.strength]
    reports = evaluate_focus(
        captioner,
        args.images,
        args.instances,
        settings,
        limit=args.limit,
        options=options,
        evidence=args.evidence,
    )
    results = {}
    for (how, strength), report in reports.items():
        key = f"{how}-{strength:g}"
        results[key] = {k: round(v, 2) if isinstance(v, float) else v for k, v in report.summary().items()}
        print(json.dumps({key: results[key]}), flush=True)
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            with open(args.output_dir / f"trials-{key}.jsonl", "w") as f:
                f.writelines(json.dumps(asdict(t)) + "\n" for t in report.trials)
    if args.output_dir:
        (args.output_dir / "metrics.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
