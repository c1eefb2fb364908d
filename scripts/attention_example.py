"""Caption one photo and write its attention grid (the README's and model card's figure).

  python scripts/attention_example.py --image astronaut --output weights/example_attention.png

--image is a file path or the name of a scikit-image sample photo (astronaut, coffee, chelsea,
rocket, ...: public domain or CC0, shipped with the package, so no download is needed).
"""

import argparse

from captioner import Captioner
from captioner.data.images import load_photo
from captioner.serving.captioner import DEFAULT_WEIGHTS
from captioner.visualize import save_attention_grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", "--checkpoint", default=str(DEFAULT_WEIGHTS), help="model folder")
    parser.add_argument("--image", default="astronaut")
    parser.add_argument("--output", default="attention.png")
    parser.add_argument("--beam-size", "--beam_size", type=int, default=3)
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model)
    image = load_photo(args.image)
    result = captioner.caption(image, beam_size=args.beam_size)
    save_attention_grid(
        args.output, image, result.words, result.attention, title=f'"{result.text}" (beam {args.beam_size})'
    )
    print(f"{result.text}\nwrote {args.output}")


if __name__ == "__main__":
    main()
