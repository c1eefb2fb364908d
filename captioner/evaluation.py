"""Standard COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, optional SPICE).

Scores come from pycocoevalcap, the reference implementation behind published numbers, and are
reported on the usual 0-100 scale. Output files are written atomically so an interrupted run
never leaves a truncated results JSON behind.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.vocabulary import tokenize

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
    return PTBTokenizer().tokenize(
        {i: [{"caption": " ".join(c.split())} for c in caps] for i, caps in captions.items()}
    )


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
