"""The same photo captioned three ways: whole, and focused on two boxes (README figure).

  python scripts/focus_example.py --image astronaut --boxes 0,0,256,512 0,256,512,512 \\
      --output weights/focus_example.png

--image is a file or a scikit-image sample photo (astronaut, coffee, chelsea, rocket: public
domain or CC0, shipped with the package). Boxes are x0,y0,x1,y1 in the photo's pixels.
"""

import argparse

from captioner import Captioner
from captioner.data.images import load_photo
from captioner.model.options import DEFAULT_FOCUS_STRENGTH
from captioner.visualize import save_focus_figure


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", "--checkpoint", help="model folder (default: the shipped model)")
    parser.add_argument("--image", default="astronaut")
    parser.add_argument("--boxes", nargs="+", default=["0,0,256,512", "0,256,512,512"])
    parser.add_argument("--strength", type=float, default=DEFAULT_FOCUS_STRENGTH)
    parser.add_argument("--output", default="focus_example.png")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model)
    image = load_photo(args.image)
    boxes = [None, *(tuple(float(v) for v in box.split(",")) for box in args.boxes)]
    results = [captioner.caption(image, focus=box, focus_strength=args.strength) for box in boxes]
    save_focus_figure(args.output, image, [(box, r.text) for box, r in zip(boxes, results, strict=True)])
    for box, result in zip(boxes, results, strict=True):
        print(f"{box or 'whole photo'}: {result.text}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
