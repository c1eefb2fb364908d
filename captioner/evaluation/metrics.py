"""Standard COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE).

Scores come from pycocoevalcap, the reference implementation behind published numbers, and are
reported on the usual 0-100 scale. Output files are written atomically so an interrupted run
never leaves a truncated results JSON behind.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.data.datasets import ImageCaptions
from captioner.data.feature_cache import FeatureCache
from captioner.data.images import ImageFiles, collate_images
from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel
from captioner.model.decoder import Decoder
from captioner.model.onnx_encoder import runtime_encoder
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.model.vocabulary import Vocabulary, tokenize

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
NO_JAVA_WARNING = (
    "Java not found: METEOR and the PTB tokenizer need Java; "
    "reporting BLEU/ROUGE-L/CIDEr with a simple lowercase tokenizer"
)


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    meteor: bool = True,
    spice: bool = False,
) -> dict[str, float]:
    """Corpus-level metrics of one predicted caption per image against its references.

    Keys are METRICS (METEOR only when Java is available and `meteor` is set, plus SPICE when
    asked). Both sides are PTB-tokenised, as in the official COCO evaluation.
    """
    _check_inputs(predictions, references)
    ids = list(references)
    has_java = shutil.which("java") is not None
    if not has_java:
        if spice:
            raise RuntimeError("SPICE needs Java, which was not found on PATH")
        warnings.warn(NO_JAVA_WARNING, stacklevel=2)

    gts = _tokenize({i: list(references[i]) for i in ids}, has_java)
    res = _tokenize({i: [predictions[i]] for i in ids}, has_java)

    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = 100 * value
    if meteor and has_java:
        scores["METEOR"] = 100 * _meteor(gts, res)
    scores["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
    if spice:
        scores["SPICE"] = 100 * _spice(gts, res)
    return {name: float(value) for name, value in scores.items()}


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> None:
    if not references:
        raise ValueError("no references to score against")
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    for problem, ids in (("missing for", missing), ("given for unknown", extra)):
        if ids:
            raise ValueError(
                f"predictions {problem} {len(ids)} image ids: {', '.join(map(str, ids[:10]))}"
                + (" ..." if len(ids) > 10 else "")
            )
    for i in references:
        if isinstance(references[i], str) or not references[i]:
            raise ValueError(f"references for image {i!r} must be a non-empty list of strings")
        if not isinstance(predictions[i], str):
            raise ValueError(f"prediction for image {i!r} must be a string")


def _tokenize(captions: dict[str, list[str]], has_java: bool) -> dict[str, list[str]]:
    """PTB tokenisation (lowercase, punctuation dropped); plain Python without Java."""
    if not has_java:
        return {i: [" ".join(tokenize(c)) for c in caps] for i, caps in captions.items()}
    # The PTB tokenizer works line by line: any line break inside a caption would shift every
    # following caption onto the wrong image, so normalise all whitespace first.
    tokenized = PTBTokenizer().tokenize(
        {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    )
    if any(len(tokenized.get(i, ())) != len(caps) for i, caps in captions.items()):
        raise RuntimeError("the PTB tokenizer (Java) failed; see its error output above")
    return tokenized


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Run METEOR, always shutting its Java subprocess down (pycocoevalcap only does in __del__)."""
    scorer = Meteor()
    process = scorer.meteor_p
    try:
        return scorer.compute_score(gts, res)[0]
    except (ValueError, BrokenPipeError) as e:
        process.kill()
        error = process.stderr.read().decode(errors="replace").strip()
        raise RuntimeError(f"METEOR (Java) failed: {error[-500:] or e}") from e
    finally:
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    try:
        return Spice().compute_score(gts, res)[0]
    except Exception as e:
        raise RuntimeError(
            "SPICE failed; it downloads Stanford CoreNLP models on first use and needs "
            f"Java 8 and about 8 GB of RAM ({e})"
        ) from e


def write_coco_results(path: str | Path, predictions: Sequence[Mapping[str, Any]]) -> None:
    """Write the official COCO results list `[{"image_id": ..., "caption": ...}]`."""
    rows = []
    for k, p in enumerate(predictions):
        if "image_id" not in p or not isinstance(p.get("caption"), str):
            raise ValueError(f"predictions[{k}] needs an 'image_id' and a string 'caption': {p!r}")
        rows.append({"image_id": p["image_id"], "caption": p["caption"]})
    _write_json_atomic(Path(path), rows)


def write_metrics(path: str | Path, metrics: Mapping[str, float]) -> None:
    """Write metrics as a small JSON object (e.g. for results tables and CI)."""
    _write_json_atomic(Path(path), {name: float(value) for name, value in metrics.items()})


def _write_json_atomic(path: Path, data: object) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- a whole split


def image_grids(
    model: CaptionModel,
    images: Sequence[ImageCaptions],
    batch_size: int = 32,
    num_workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    encoder: torch.nn.Module | None = None,
) -> Iterator[torch.Tensor]:
    """The annotation grids (B, L, D) of `images`, batch by batch, in order: from the photos
    (through `encoder`, default the model's on the runtime Captioner uses, e.g. a Captioner's
    int8 one), or with `cache_dir` from (and into) the feature cache, which only a model whose
    encoder is the frozen ImageNet backbone may use."""
    device = next(model.decoder.parameters()).device
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, model.encoder, [i.path for i in images])
        cache.extract(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
        for start in range(0, len(images), batch_size):
            yield cache.batch(range(start, min(start + batch_size, len(images)))).to(device)
        return
    loader = DataLoader(
        ImageFiles([i.path for i in images], model.encoder.transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
    )
    encoder = encoder or runtime_encoder(model.encoder)  # what Captioner runs: the same grids, faster
    for batch in loader:
        batch.raise_errors()  # a score over fewer images than asked for would mislead
        yield encoder(batch.pixels.to(device))


@torch.inference_mode()
def caption_split(
    model: CaptionModel,
    vocab: Vocabulary,
    images: Sequence[ImageCaptions],
    options: DecodeOptions | None = None,
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    encoder: torch.nn.Module | None = None,
    decoder: Decoder | None = None,
) -> list[str]:
    """Real beam-search captions (by `options`, default DecodeOptions()) for every image, in
    order (see image_grids for `cache_dir` and `encoder`); `decoder`: what decodes (default the
    model's decoder in torch; a Captioner's `decoder` runs it as the Captioner does)."""
    options = (options or DecodeOptions()).replace(n_best=1)
    model.eval()
    captions: list[str] = []
    bar = tqdm(total=len(images), desc="captioning", unit="img", disable=not progress)
    for features in image_grids(model, images, batch_size, num_workers, cache_dir, progress, encoder):
        results = caption_features(decoder or model.decoder, vocab, features, options)
        captions += [r.text for r in results]
        bar.update(len(results))
    bar.close()
    return captions


def evaluate_model(
    model: CaptionModel,
    vocab: Vocabulary,
    images: Sequence[ImageCaptions],
    output_dir: str | Path | None = None,
    options: DecodeOptions | None = None,
    *,
    meteor: bool = True,
    spice: bool = False,
    **split_settings: Any,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Caption a split, score it, and (optionally) write results.json + metrics.json.

    Results use the official COCO format: the numeric COCO id when there is one.
    """
    captions = caption_split(model, vocab, images, options, **split_settings)
    predictions = {item.image_id: c for item, c in zip(images, captions, strict=True)}
    metrics = score_captions(
        predictions, {i.image_id: i.captions for i in images}, meteor=meteor, spice=spice
    )
    results = [
        {"image_id": i.coco_id if i.coco_id is not None else i.image_id, "caption": c}
        for i, c in zip(images, captions, strict=True)
    ]
    if output_dir is not None:
        write_coco_results(Path(output_dir) / "results.json", results)
        write_metrics(Path(output_dir) / "metrics.json", metrics)
    return metrics, results
