"""Inference speed: the encoder alone vs the whole Captioner.caption() call.

The full call is what a user pays for: image loading and preprocessing, the encoder, beam
search and the attention maps. Medians over --runs timed runs (encoder and full call take
turns), after --warmup untimed ones.

    python scripts/benchmark.py                        # default ModelConfig, random decoder
    python scripts/benchmark.py --checkpoint weights   # a trained model: the honest numbers

Without --checkpoint the decoder has random weights (the encoder has its real ImageNet
weights). That is fine for timing only: a random decoder never says <end>, so every caption
runs to --max-length words, while a trained model stops after ~10.
"""

import argparse
import os
import statistics
import time

import torch
from PIL import Image

from captioner import Captioner, CaptionModel, ModelConfig, Vocabulary, api
from captioner.vocabulary import SPECIAL_TOKENS

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--checkpoint", help="model folder to time (default: random decoder weights)")
parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of the decoder")
parser.add_argument("--vocab-size", type=int, default=3000, help="words of the random-decoder vocabulary")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
parser.add_argument("--beam-size", type=int, default=3)
parser.add_argument("--max-length", type=int, default=None,
                    help="words per caption at most (default: 16 random decoder, 20 checkpoint)")
parser.add_argument("--image-size", type=int, default=224, help="side of the test image in pixels")
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
parser.add_argument("--encoder-batch", type=int, default=None,
                    help=f"images per encoder forward on the CPU (default {api.CPU_ENCODER_BATCH})")
parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process time, steadier on a shared machine (sums over threads)")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
if args.encoder_batch:
    api.CPU_ENCODER_BATCH = args.encoder_batch
torch.manual_seed(0)

if args.checkpoint:
    captioner = Captioner.from_pretrained(args.checkpoint, device="cpu", quantize=args.quantize)
    what = f"checkpoint {args.checkpoint}" + (" (int8 decoder)" if args.quantize else "")
    max_length = args.max_length or 20
else:
    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(args.vocab_size - len(SPECIAL_TOKENS)))])
    captioner = Captioner(CaptionModel(ModelConfig(), len(vocab)), vocab, device="cpu",
                          quantize=args.quantize)
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


def interleaved(*calls):
    """Median milliseconds of each call (fn, args, kwargs), runs interleaved so that a change in
    the machine's load hits all of them alike; plus each call's last result."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for fn, fn_args, fn_kwargs in calls * args.warmup:
        fn(*fn_args, **fn_kwargs)
    times, results = [[] for _ in calls], [None] * len(calls)
    for _ in range(args.runs):
        for i, (fn, fn_args, fn_kwargs) in enumerate(calls):
            t0 = clock()
            results[i] = fn(*fn_args, **fn_kwargs)
            times[i].append(clock() - t0)
    return [1000 * statistics.median(t) for t in times], results


@torch.inference_mode()
def encode(pixels: torch.Tensor) -> torch.Tensor:
    """The encoder alone, run as Captioner runs it on a CPU: a few images at a time."""
    return torch.cat([model.encoder(part) for part in pixels.split(api.CPU_ENCODER_BATCH)])


image = sample_image()
pixels = captioner.preprocess(image)
c = model.config
print(f"model: {what}")
print(f"  {c.backbone} at {c.image_size}px, {c.grid_size}x{c.grid_size} grid, {c.attention} attention, "
      f"hidden {c.hidden_dim}, vocabulary {len(captioner.vocab)}, encoder batch {api.CPU_ENCODER_BATCH}")
print(f"  beam {args.beam_size}, max_length {max_length}, torch threads {torch.get_num_threads()}, "
      f"{args.clock} clock, median of {args.runs} interleaved runs after {args.warmup} warm-up")
print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a busy machine inflates times)")
print()
print(f"{'batch':>5} {'encoder ms':>11} {'full ms':>9} {'full ms/image':>14} {'words/image':>12} "
      f"{'full/encoder':>13}")
options = dict(beam_size=args.beam_size, max_length=max_length)
for batch in args.batch_sizes:
    batch_pixels = pixels.expand(batch, *pixels.shape).contiguous()
    (encoder_ms, full_ms), (_, results) = interleaved(
        (encode, (batch_pixels,), {}),
        (captioner.caption, ([image] * batch,), {"batch_size": batch, **options}),
    )
    words = statistics.mean(len(r.words) for r in results)
    print(f"{batch:>5} {encoder_ms:>11.1f} {full_ms:>9.1f} {full_ms / batch:>14.1f} {words:>12.1f} "
          f"{full_ms / encoder_ms:>13.2f}")
if args.checkpoint:
    print(f"\ncaption: {captioner.caption(image, **options).text!r}")
