"""Score a trained model on a dataset split with beam search and the standard COCO metrics.

  python scripts/evaluate.py --checkpoint weights --data.kind flickr \\
      --data.root ../shared/data/flickr8k --split val --beam_size 3 --output_dir eval/f8k-val

Writes results.json (official COCO results format) and metrics.json into --output_dir.
"""

import argparse
import json

from captioner.api import DEFAULT_WEIGHTS, default_device, quantize_decoder
from captioner.attention import HardAttention, set_hard_decoding
from captioner.checkpoint import load_model
from captioner.configs import add_config_arguments, parse_bool
from captioner.data import DataConfig, load_dataset
from captioner.decoding import NO_REPEAT_NGRAM_SIZE
from captioner.evaluation import evaluate_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_WEIGHTS),
                        help="model folder (default: weights/)")
    parser.add_argument("--split", default="val", help="train, val or test")
    parser.add_argument("--beam_size", type=int, default=3, help="1 = greedy")
    parser.add_argument("--max_length", type=int, default=20)
    parser.add_argument("--length_penalty", type=float, default=0.0)
    parser.add_argument("--no_repeat_ngram_size", type=int, default=NO_REPEAT_NGRAM_SIZE,
                        help="no caption repeats a phrase of N words (0: repeats allowed)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--cache_dir", help="reuse/extract the frozen encoder's feature cache here")
    parser.add_argument("--max_images", type=int, help="score only the first N images of the split")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--quantize", action="store_true", help="score the int8 decoder (CPU)")
    parser.add_argument("--hard_decoding", choices=HardAttention.DECODING_MODES,
                        help="hard-attention models: each word's context from the argmax cell (their "
                             "default) or the expectation over cells")
    parser.add_argument("--meteor", type=parse_bool, default=True)
    parser.add_argument("--spice", type=parse_bool, default=False, help="needs a one-off download")
    parser.add_argument("--output_dir", help="where results.json and metrics.json go")
    add_config_arguments(parser, DataConfig, prefix="data.")
    args = parser.parse_args()
    data_cfg = DataConfig(**{k[5:]: v for k, v in vars(args).items() if k.startswith("data.")})
    images = load_dataset(data_cfg)[args.split][: args.max_images]
    model, vocab, _ = load_model(args.checkpoint, args.device or default_device())
    if args.hard_decoding:
        try:
            set_hard_decoding(model, args.hard_decoding)
        except ValueError as err:
            parser.error(f"--hard_decoding: {err}")
    if args.quantize:
        model.decoder = quantize_decoder(model.decoder)
    metrics, _ = evaluate_model(
        model, vocab, images, args.output_dir, meteor=args.meteor, spice=args.spice,
        beam_size=args.beam_size, max_length=args.max_length, length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_dir=args.cache_dir)
    summary = {"checkpoint": args.checkpoint, "split": args.split, "images": len(images),
               "beam_size": args.beam_size, "length_penalty": args.length_penalty,
               "no_repeat_ngram_size": args.no_repeat_ngram_size, "hard_decoding": args.hard_decoding,
               **{k: round(v, 2) for k, v in metrics.items()}}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
