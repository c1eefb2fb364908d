"""Inference speed: the encoder alone vs the whole Captioner.caption() call.

The full call is what a user pays for: image loading and preprocessing, the encoder, beam
search and the attention maps. Medians over --runs timed runs, after --warmup untimed ones.

    python scripts/benchmark.py                        # default ModelConfig, random decoder
    python scripts/benchmark.py --checkpoint weights   # a trained model: the honest numbers

Without --checkpoint the decoder has random weights (the encoder has its real ImageNet
weights). That is fine for timing only: a random decoder never says <end>, so every caption
runs to --max-length words, while a trained model stops after ~10.
"""

import argparse
import statistics
import time

import torch
from PIL import Image

from captioner import Captioner, CaptionModel, ModelConfig, Vocabulary
from captioner.vocabulary import SPECIAL_TOKENS

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--checkpoint", help="model folder to time (default: random decoder weights)")
parser.add_argument("--vocab-size", type=int, default=3000, help="words of the random-decoder vocabulary")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
parser.add_argument("--beam-size", type=int, default=3)
parser.add_argument("--max-length", type=int, default=None,
                    help="words per caption at most (default: 16 random decoder, 20 checkpoint)")
parser.add_argument("--image-size", type=int, default=224, help="side of the test image in pixels")
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)

if args.checkpoint:
    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu")
    what = f"checkpoint {args.checkpoint}"
    max_length = args.max_length or 20
else:
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))])
    captioner = Captioner(CaptionModel(ModelConfig(), len(vocab)), vocab, device="cpu")
    what = "default ModelConfig, RANDOM decoder weights: timing only, captions are meaningless"
    max_length = args.max_length or 16
model = captioner.model.eval()


def sample_image() -> Image.Image:
    """A real photo (skimage's coffee cup) at --image-size, as a user would pass it."""
    try:
        from skimage import data

        image = Image.fromarray(data.coffee())
    except ImportError:
        image = Image.effect_mandelbrot((512, 512), (-2.0, -1.25, 0.75, 1.25), 100).convert("RGB")
    return image.resize((args.image_size, args.image_size), Image.Resampling.BICUBIC)


def timed(fn, *fn_args, **fn_kwargs):
    """(median milliseconds, last result) of fn(*fn_args, **fn_kwargs)."""
    for _ in range(args.warmup):
        fn(*fn_args, **fn_kwargs)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = fn(*fn_args, **fn_kwargs)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), out


image = sample_image()
pixels = captioner.preprocess(image)
c = model.config
print(f"model: {what}")
print(f"  {c.backbone} at {c.image_size}px, {c.grid_size}x{c.grid_size} grid, {c.attention} attention, "
      f"hidden {c.hidden_dim}, vocabulary {len(captioner.vocab)}")
print(f"  beam {args.beam_size}, max_length {max_length}, torch threads {torch.get_num_threads()}, "
      f"median of {args.runs} runs after {args.warmup} warm-up")
print()
print(f"{'batch':>5} {'encoder ms':>11} {'full ms':>9} {'full ms/image':>14} {'words/image':>12} "
      f"{'full/encoder':>13}")
options = dict(beam_size=args.beam_size, max_length=max_length)
for batch in args.batch_sizes:
    with torch.inference_mode():
        encoder_ms, _ = timed(model.encoder, pixels.expand(batch, *pixels.shape).contiguous())
    full_ms, results = timed(captioner.caption, [image] * batch, batch_size=batch, **options)
    words = statistics.mean(len(r.words) for r in results)
    print(f"{batch:>5} {encoder_ms:>11.1f} {full_ms:>9.1f} {full_ms / batch:>14.1f} {words:>12.1f} "
          f"{full_ms / encoder_ms:>13.2f}")
if args.checkpoint:
    print(f"\ncaption: {captioner.caption(image, **options).text!r}")
