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
import json
import sys
from pathlib import Path

from captioner.evaluation.coco_objects import COCO_SYNONYMS
from captioner.evaluation.grounding import evaluate_grounding, plain_metrics, write_report
from captioner.model.options import DecodeOptions
from captioner.serving.captioner import DEFAULT_WEIGHTS, Captioner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", required=True, help="folder holding the instances file's images")
    parser.add_argument("--instances", required=True, help="COCO instances JSON (boxes and masks)")
    parser.add_argument(
        "--model", "--checkpoint", default=str(DEFAULT_WEIGHTS), help="model folder (default: weights/)"
    )
    default = DecodeOptions()
    parser.add_argument("--beam-size", "--beam_size", type=int, default=default.beam_size, help="1 = greedy")
    parser.add_argument("--length-penalty", "--length_penalty", type=float, default=default.length_penalty)
    parser.add_argument(
        "--evidence-penalty",
        "--evidence_penalty",
        type=float,
        default=0.0,
        help="lower object words the ImageNet evidence does not support (0: off)",
    )
    parser.add_argument(
        "--person-penalty", type=float, default=0.0, help="lower person words where the detector sees none"
    )
    parser.add_argument(
        "--constrain-evidence", type=float, help="force the words of categories with evidence >= this"
    )
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--quantize", action="store_true", help="the int8 encoder and decoder (CPU)")
    parser.add_argument(
        "--synonyms",
        help="JSON {category: [words]} for non-COCO categories "
        "(default: captioner.evaluation.coco_objects.COCO_SYNONYMS)",
    )
    parser.add_argument("--output-dir", "--output_dir", help="where metrics.json and details.jsonl go")
    args = parser.parse_args()
    synonyms = json.loads(Path(args.synonyms).read_text()) if args.synonyms else COCO_SYNONYMS
    captioner = Captioner.from_pretrained(args.model, device=args.device, quantize=args.quantize)
    report = evaluate_grounding(
        captioner,
        args.images,
        args.instances,
        beam_size=args.beam_size,
        batch_size=args.batch_size,
        synonyms=synonyms,
        progress=True,
        length_penalty=args.length_penalty,
        evidence_penalty=args.evidence_penalty,
        person_penalty=args.person_penalty,
        constrain_evidence=args.constrain_evidence,
    )
    if report.skipped:
        print(f"skipped {len(report.skipped)} images without instance annotations", file=sys.stderr)
    if args.output_dir:
        write_report(report, args.output_dir)
    print(json.dumps(plain_metrics(report.metrics, digits=2), indent=2))


if __name__ == "__main__":
    main()
