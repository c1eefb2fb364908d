"""Does the attention fall on the object a word names, and are the named objects there at all?

  python scripts/evaluate_grounding.py --images ../shared/data/coco-mini/train2017 \\
      --instances ../shared/data/coco-mini/annotations/instances_train2017.json \\
      --output_dir eval/grounding-coco-mini

Captions every image of a COCO instances file with the Captioner API and prints (and writes to
--output_dir as metrics.json) the pointing game and its centre baseline, the attention mass and
its uniform baseline, CHAIR_i and CHAIR_s, all in %, plus the counts; details.jsonl has every
image's caption and object words. Definitions: captioner/evaluation/grounding.py;
the synonym table: captioner/evaluation/coco_objects.py.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from captioner.cli.flags import FlagParser, add_config_arguments, add_quantize_flag, checked_config
from captioner.evaluation.coco_objects import COCO_SYNONYMS
from captioner.evaluation.grounding import evaluate_grounding, plain_metrics, write_report
from captioner.model.options import DecodeOptions
from captioner.serving.captioner import DEFAULT_WEIGHTS, Captioner


def main() -> None:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder holding the instances file's images")
    parser.add_argument("--instances", required=True, help="COCO instances JSON (boxes and masks)")
    parser.add_argument(
        "--model", "--checkpoint", default=str(DEFAULT_WEIGHTS), help="model folder (default: weights/)"
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    add_quantize_flag(parser)
    parser.add_argument(
        "--synonyms",
        help="JSON {category: [words]} for non-COCO categories "
        "(default: captioner.evaluation.coco_objects.COCO_SYNONYMS)",
    )
    parser.add_argument("--output-dir", "--output_dir", help="where metrics.json and details.jsonl go")
    add_config_arguments(parser, DecodeOptions)  # the decoding flags, as `captioner caption` has them
    args = parser.parse_args()
    options = checked_config(parser, DecodeOptions, args)
    synonyms = json.loads(Path(args.synonyms).read_text()) if args.synonyms else COCO_SYNONYMS
    captioner = Captioner.from_pretrained(args.model, device=args.device, quantize=args.quantize)
    report = evaluate_grounding(
        captioner,
        args.images,
        args.instances,
        batch_size=args.batch_size,
        synonyms=synonyms,
        progress=True,
        **dataclasses.asdict(options),
    )
    if report.skipped:
        print(f"skipped {len(report.skipped)} images without instance annotations", file=sys.stderr)
    if args.output_dir:
        write_report(report, args.output_dir)
    print(json.dumps(plain_metrics(report.metrics, digits=2), indent=2))


if __name__ == "__main__":
    main()
