"""How many of the labels the encoder's ImageNet classifier is confident about can a vocabulary
name (issue #37 (d)): a label of a COCO category is nameable when one of the category's names
(captioner.evaluation.coco_objects) is made of vocabulary words; a label of no category when
one of its caption words (captioner.model.evidence) is in the vocabulary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from captioner.evaluation.coco_objects import COCO_SYNONYMS
from captioner.model.evidence import ImageNetClass, imagenet_words


def is_nameable(
    label: ImageNetClass, vocabulary: set[str], synonyms: Mapping[str, Sequence[str]] = COCO_SYNONYMS
) -> bool:
    if label.coco is not None:
        return any(all(w in vocabulary for w in name.split()) for name in synonyms.get(label.coco, ()))
    return any(w in vocabulary for w in label.words)


def count_nameable(
    probabilities: torch.Tensor, vocabulary: Sequence[str], threshold: float = 0.3
) -> dict[str, object]:
    """Photos' ImageNet probabilities (N, 1000) -> the confident labels (probability >= threshold),
    how many the vocabulary can name, and the labels it cannot ({label: count})."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    classes, words = imagenet_words().classes, set(vocabulary)
    photos, indices = torch.nonzero(probabilities >= threshold, as_tuple=True)
    unnamed: dict[str, int] = {}
    named = 0
    for index in indices.tolist():
        if is_nameable(classes[index], words):
            named += 1
        else:
            unnamed[classes[index].label] = unnamed.get(classes[index].label, 0) + 1
    return {
        "photos": probabilities.shape[0],
        "photos_with_confident_labels": len(set(photos.tolist())),
        "confident_labels": len(indices),
        "nameable": named,
        "unnameable": dict(sorted(unnamed.items(), key=lambda kv: -kv[1])),
    }
