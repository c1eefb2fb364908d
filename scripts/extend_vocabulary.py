"""Add words the vocabulary lacks to a model folder by direct transfer (issue #37 (d),
captioner.model.new_words): each new word starts as a copy of a known word (zebra <- horse).

  python scripts/extend_vocabulary.py --model weights --output runs/extended
  python scripts/extend_vocabulary.py --model weights --output runs/extended --words my_words.json
"""

import argparse
import json

import torch

from captioner.model.folder import load_model, save_model
from captioner.model.new_words import NEW_WORDS_FILE, extend_model, load_new_words


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="weights", help="model folder to extend (default: weights)")
    parser.add_argument("--output", required=True, help="where the extended model folder goes")
    parser.add_argument(
        "--words",
        default=str(NEW_WORDS_FILE),
        help="JSON {new word: source word} (default: the shipped table)",
    )
    parser.add_argument(
        "--bias-offset",
        type=float,
        default=0.0,
        help="added to the new words' output bias (0: an exact copy of the source, as in DCC)",
    )
    args = parser.parse_args()
    model, vocab, config = load_model(args.model)
    sources = load_new_words(args.words)
    extended = extend_model(model, vocab, sources, args.bias_offset)
    added = {w: sources[w] for w in extended.words[len(vocab) :]}
    metadata = {
        **config["metadata"],
        "extended_from": args.model,
        "new_words": added,
        "new_words_bias_offset": args.bias_offset,
    }
    save_model(
        args.output,
        model,
        extended,
        metadata=metadata,
        dtype=getattr(torch, config.get("weights_dtype", "float32")),
    )
    print(
        json.dumps(
            {
                "added": len(added),
                "vocabulary": len(extended),
                "new_words": added,
                "new_words_bias_offset": args.bias_offset,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
