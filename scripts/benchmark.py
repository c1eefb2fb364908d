"""Inference speed: the encoder, the whole Captioner.caption() call and feature extraction.

    python scripts/benchmark.py --checkpoint weights   # the shipped model: the honest numbers
    python scripts/benchmark.py                        # default ModelConfig, random decoder

For each thread count (--threads, default 1 and 2), in one run:
1. the encoder on one photo: timm's unmodified model (`timm.create_model(arch).forward_features`)
   against the project's inference encoder (captioner.fast_encoder), one optimisation at a time,
   with the GFLOP/s each achieves and, for scale, a large fp32 matrix product's GFLOP/s;
2. the full caption() call (image preprocessing, encoder, beam search, attention maps) for 1
   photo and a batch of 32: today's (the plain Encoder, as before the inference encoder) and
   the project's;
3. feature extraction for training (FeatureCache.extract, batch 32, photos loaded in the main
   process): photos/s, plain encoder against inference encoder.
--compile and --int8 add the inference encoder's opt-ins to 1 and 2. `--dev-cider N` instead
scores every encoder option on the first N Flickr8k dev photos (what each costs in CIDEr).
Every comparison interleaves its contenders run by run, so that a change in the machine's load
hits them alike, and reports medians over --runs after --warmup untimed runs.

Without --checkpoint the decoder has random weights (the encoder has its real ImageNet
weights). That is fine for timing only: a random decoder never says <end>, so every caption
runs to --max-length words, while a trained model stops after ~10.
"""

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import timm
import torch
import torchvision
from PIL import Image
from skimage import data
from torch.utils.flop_counter import FlopCounterMode

from captioner import Captioner, CaptionModel, ModelConfig, Vocabulary, api, features
from captioner.data import load_flickr
from captioner.evaluation import score_captions
from captioner.fast_encoder import InferenceEncoder, calibration_photos
from captioner.vocabulary import SPECIAL_TOKENS

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--checkpoint", help="model folder to time (default: random decoder weights)")
parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of the decoder")
parser.add_argument("--compile", action="store_true",
                    help="also time the inference encoder under torch.compile (compiles for minutes)")
parser.add_argument("--int8", action="store_true",
                    help="also time the static int8 encoder (needs torchao; compiles for a minute)")
parser.add_argument("--vocab-size", type=int, default=3000, help="words of the random-decoder vocabulary")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="photos per caption() call")
parser.add_argument("--beam-size", type=int, default=3)
parser.add_argument("--max-length", type=int, default=None,
                    help="words per caption at most (default: 16 random decoder, 20 checkpoint)")
parser.add_argument("--image-size", type=int, default=224, help="side of the test photo in pixels")
parser.add_argument("--runs", type=int, default=7)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to time")
parser.add_argument("--extract-images", type=int, default=64,
                    help="photos per feature-extraction run (Flickr8k dev photos if present; 0: skip)")
parser.add_argument("--extract-runs", type=int, default=3)
parser.add_argument("--dev-cider", type=int, default=0, metavar="N",
                    help="instead of timing: CIDEr of each encoder option on the first N Flickr8k dev photos")
ENCODER_OPTIONS = ["today", "project", "compile", "int8-skimage", "int8-flickr"]
parser.add_argument("--encoders", nargs="+", default=ENCODER_OPTIONS, choices=ENCODER_OPTIONS,
                    help="with --dev-cider: the encoder options to score (the first is the reference)")
parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process time, steadier on a shared machine (sums over threads)")
args = parser.parse_args()
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
encoder = model.encoder
# "Today's" Captioner: the same model with the plain Encoder, the code path before fast_encoder.
todays = Captioner(model, captioner.vocab, device="cpu")
todays.encoder = encoder


def sample_image() -> Image.Image:
    """A real photo (skimage's coffee cup) at --image-size, as a user would pass it."""
    image = Image.fromarray(data.coffee())
    return image.resize((args.image_size, args.image_size), Image.Resampling.BICUBIC)


def interleaved(calls: dict, runs: int | None = None) -> tuple[dict[str, float], dict]:
    """Median milliseconds of each named call (fn, args), runs interleaved; and each one's last result."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for fn, fn_args in list(calls.values()) * args.warmup:
        fn(*fn_args)
    times, results = {name: [] for name in calls}, {}
    for _ in range(runs or args.runs):
        for name, (fn, fn_args) in calls.items():
            t0 = clock()
            results[name] = fn(*fn_args)
            times[name].append(clock() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}, results


def unmodified_backbone() -> torch.nn.Module:
    """The backbone as its library builds it, with the encoder's weights: the reference."""
    if encoder.spec.source == "timm":
        net = timm.create_model(encoder.spec.arch, pretrained=False, num_classes=0)
        net.load_state_dict(encoder.body.state_dict())
        return net.eval()
    net = getattr(torchvision.models, encoder.spec.arch)(weights=None)
    net.load_state_dict(encoder.body.state_dict(), strict=False)
    return torch.nn.Sequential(*list(net.children())[:-2]).eval()


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matrix product, about the best the CPU does at this precision."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter  # as the encoder's
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds = []
    for _ in range(runs):
        t0 = clock()
        a @ b
        seconds.append(clock() - t0)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def extraction_paths(folder: Path) -> list[str]:
    if FLICKR.is_dir():
        files = sorted((FLICKR / "images").glob("*.jpg"))
        return [str(p) for p in files[: args.extract_images]]
    photo = sample_image()
    for i in range(args.extract_images):
        photo.rotate(i).save(folder / f"photo_{i:04d}.jpg")
    return [str(folder / f"photo_{i:04d}.jpg") for i in range(args.extract_images)]


def extract(paths: list[str], fast: bool) -> float:
    """Photos/s of one FeatureCache.extract into a fresh folder; fast=False: today's plain path."""
    with tempfile.TemporaryDirectory() as cache_dir:
        original = features.InferenceEncoder
        if not fast:
            features.InferenceEncoder = lambda plain: plain
        try:
            cache = features.FeatureCache(cache_dir, encoder, paths)
            return cache.extract(batch_size=32, num_workers=0, progress=False)["images_per_second"]
        finally:
            features.InferenceEncoder = original


def dev_cider() -> None:
    """Caption the first --dev-cider Flickr8k dev photos with each encoder option and score them."""
    images = load_flickr(FLICKR)["val"][: args.dev_cider]
    references = {i.image_id: i.captions for i in images}
    pixels = torch.stack([captioner.preprocess(i.path) for i in images])
    train_photos = load_flickr(FLICKR)["train"][:32]
    options = {
        "today": ("today (plain Encoder)", lambda: encoder),
        "project": ("project (fp32)", lambda: captioner.encoder),
        "compile": ("project + torch.compile", lambda: InferenceEncoder(encoder, compile=True)),
        "int8-skimage": ("int8, calibrated on 10 scikit-image photos", lambda: InferenceEncoder(
            encoder, int8_calibration=calibration_photos(encoder.transform))),
        "int8-flickr": ("int8, calibrated on 32 Flickr8k train photos", lambda: InferenceEncoder(
            encoder, int8_calibration=torch.stack([captioner.preprocess(i.path) for i in train_photos]))),
    }
    print(f"{len(images)} Flickr8k dev photos, beam {args.beam_size}, {torch.get_num_threads()} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'encoder':<46} {'CIDEr':>6} {'BLEU-4':>7} {'same captions':>14} {'encoder s':>10}")
    plain = None
    for name, build in (options[key] for key in args.encoders):
        captioner.encoder = build()
        with torch.inference_mode():
            captioner.encoder(pixels[:1])  # compiles, if it does, for each batch size to come
            captioner.encoder(pixels[: api.CPU_ENCODER_BATCH])
            t0 = time.perf_counter()
            for part in pixels.split(api.CPU_ENCODER_BATCH):
                captioner.encoder(part)
            seconds = time.perf_counter() - t0
        texts = [r.text for batch in pixels.split(32)
                 for r in captioner.caption_tensors(batch, args.beam_size)]
        plain = plain or texts
        scores = score_captions(dict(zip(references, texts, strict=True)), references, meteor=False)
        same = sum(a == b for a, b in zip(texts, plain, strict=True))
        print(f"{name:<46} {scores['CIDEr']:>6.2f} {scores['BLEU-4']:>7.2f} {same:>9}/{len(texts)} "
              f"{seconds:>10.1f}")


if args.dev_cider:
    if args.threads:
        torch.set_num_threads(args.threads[0])
    dev_cider()
    raise SystemExit
image = sample_image()
pixels = captioner.preprocess(image)[None]  # (1, 3, S, S)
c = model.config
reference = unmodified_backbone()
with FlopCounterMode(display=False) as flop_counter:
    reference.forward_features(pixels) if encoder.spec.source == "timm" else reference(pixels)
encoder_gflop = flop_counter.get_total_flops() / 1e9
variants = {
    "+ batch norm folded": InferenceEncoder(encoder, static_padding=False, channels_last=False,
                                            matmul_pointwise=False, fuse=False),
    "+ static padding": InferenceEncoder(encoder, channels_last=False, matmul_pointwise=False,
                                         fuse=False),
    "+ channels_last": InferenceEncoder(encoder, matmul_pointwise=False, fuse=False),
    "+ 1x1 convs as matmuls": InferenceEncoder(encoder, fuse=False),
    "+ oneDNN conv+ReLU6 fused (project)": captioner.encoder,
}
opt_ins = {}  # name -> encoder, timed alone and inside caption()
if args.compile:
    opt_ins["opt-in: torch.compile (inductor)"] = InferenceEncoder(encoder, compile=True)
if args.int8:
    opt_ins["opt-in: int8 (torchao, skimage calib.)"] = InferenceEncoder(
        encoder, int8_calibration=calibration_photos(encoder.transform))
captioners = {"today (plain Encoder)": todays, "project": captioner}
for name, fast_encoder in opt_ins.items():
    captioners[f"project, {name[8:]}"] = Captioner(model, captioner.vocab, device="cpu")
    captioners[f"project, {name[8:]}"].encoder = fast_encoder

print(f"model: {what}")
print(f"  {c.backbone} at {c.image_size}px, {c.grid_size}x{c.grid_size} grid, {c.attention} attention, "
      f"hidden {c.hidden_dim}, vocabulary {len(captioner.vocab)}, encoder batch {api.CPU_ENCODER_BATCH}")
print(f"  beam {args.beam_size}, max_length {max_length}, {args.clock} clock, median of {args.runs} "
      f"interleaved runs after {args.warmup} warm-up; encoder {encoder_gflop:.2f} GFLOP per photo")
print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start "
      "(a busy machine inflates times)")
torch_threads = torch.get_num_threads()
options = dict(beam_size=args.beam_size, max_length=max_length)
for threads in args.threads:
    torch.set_num_threads(threads)
    print(f"\n=== {threads} thread(s), load average {os.getloadavg()[0]:.1f} ===")
    forward = reference.forward_features if encoder.spec.source == "timm" else reference
    calls = {f"{encoder.spec.arch} unmodified": (forward, (pixels,)),
             "project Encoder (today)": (encoder, (pixels,)),
             **{name: (module, (pixels,)) for name, module in {**variants, **opt_ins}.items()}}
    with torch.inference_mode():
        ms, _ = interleaved(calls)
    base = ms[f"{encoder.spec.arch} unmodified"]
    matmul = matmul_gflops()
    print(f"encoder, 1 photo at {c.image_size}px {'ms':>20}  x unmodified  GFLOP/s  % of matmul")
    for name, value in ms.items():
        gflops = encoder_gflop / value * 1000
        share = 100 * gflops / matmul
        print(f"  {name:<38} {value:>6.1f} {value / base:>8.2f} {gflops:>11.1f} {share:>8.0f}%")
    print(f"  fp32 2048x2048 matmul: {matmul:.1f} GFLOP/s")

    print(f"caption(), beam {args.beam_size}, attention maps {'photos':>12} {'ms':>8} {'x today':>8} "
          f"{'ms/photo':>9} {'words':>6}")
    for batch in args.batch_sizes:
        photos = image if batch == 1 else [image] * batch
        ms, results = interleaved(
            {name: (partial(each.caption, batch_size=batch, **options), (photos,))
             for name, each in captioners.items()},
            runs=args.runs if batch == 1 else max(3, args.runs // 2))
        for name, value in ms.items():
            result = results[name] if batch == 1 else results[name][0]
            print(f"  {name:<44} {batch:>6} {value:>8.1f} {value / ms['today (plain Encoder)']:>8.2f} "
                  f"{value / batch:>9.1f} {len(result.words):>6}")

    if args.extract_images:
        with tempfile.TemporaryDirectory() as folder:
            paths = extraction_paths(Path(folder))
            rates = {"today": [], "project": []}
            for _ in range(args.extract_runs):
                rates["today"].append(extract(paths, fast=False))
                rates["project"].append(extract(paths, fast=True))
        today, project = (statistics.median(rates[k]) for k in ("today", "project"))
        source = "Flickr8k" if FLICKR.is_dir() else "generated"
        print(f"feature extraction, {len(paths)} {source} photos, batch 32 (median of {args.extract_runs}): "
              f"today {today:.1f} photos/s, project {project:.1f} photos/s ({project / today:.2f}x)")
torch.set_num_threads(torch_threads)
if args.checkpoint:
    print(f"\ncaption: {captioner.caption(image, beam_size=args.beam_size, max_length=max_length).text!r}")
