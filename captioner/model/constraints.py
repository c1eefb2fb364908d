"""Which words a caption must contain: the constraints of constrained beam search (Anderson et
al. 2017, "Guided Open Vocabulary Image Captioning with Constrained Beam Search").

A constraint is a set of words, any one of which meets it ("dog" or "dogs" or "puppy"). With C
constraints, beam search runs a finite-state machine over the 2**C subsets of met constraints
and keeps one beam per subset (captioner.model.decoding.beam_search); a caption is only an
answer once every constraint is met. Here the constraints come from the encoder's ImageNet
evidence: the object categories it is confident about (captioner.model.evidence).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from captioner.model.evidence import RELIABILITY_FILE, category_probabilities, imagenet_words

MAX_CONSTRAINTS = 2  # 2**C beams per image: 4 at most
# Forcing a category whose confident evidence named it in fewer of the Flickr8k train photos
# than this (skis fires on any snow: 5%) forces a wrong word more often than a right one.
MIN_PRECISION = 0.5


@dataclass(frozen=True)
class Constraints:
    """Per image, the words its caption must contain: bit c of word_bits[i, w] is set when word
    w meets constraint c of image i."""

    word_bits: torch.Tensor  # (B, V) int64
    counts: tuple[int, ...]  # (B,) constraints per image, each <= MAX_CONSTRAINTS

    @property
    def states(self) -> int:
        """Beams per image in constrained beam search: one per subset of met constraints."""
        return 1 << max(self.counts, default=0)

    @classmethod
    def from_words(cls, word_sets: Sequence[Sequence[Sequence[int]]], vocab_size: int) -> Constraints:
        """[per image: [per constraint: word ids that meet it]] -> Constraints. ValueError for
        more than MAX_CONSTRAINTS constraints, an empty one, or a word id outside the vocabulary."""
        bits = torch.zeros(len(word_sets), vocab_size, dtype=torch.long)
        for i, constraints in enumerate(word_sets):
            if len(constraints) > MAX_CONSTRAINTS:
                raise ValueError(f"constraints: at most {MAX_CONSTRAINTS} per image, got {len(constraints)}")
            for c, words in enumerate(constraints):
                if not words or not all(0 <= w < vocab_size for w in words):
                    raise ValueError(
                        f"constraints: word ids must be a non-empty set in [0, {vocab_size}), got {words!r}"
                    )
                bits[i, list(words)] |= 1 << c
        return cls(bits, tuple(len(c) for c in word_sets))


@functools.cache
def confident_precision() -> Mapping[str, float]:
    """Per category, how often Flickr8k train photos with confident evidence for it (>= 0.3)
    had captions naming it (only categories with enough such photos)."""
    table = json.loads(RELIABILITY_FILE.read_text(encoding="utf-8"))
    return cast(Mapping[str, float], table["confident_precision"])


@functools.lru_cache(maxsize=4)
def category_words(vocabulary: tuple[str, ...]) -> dict[str, list[int]]:
    """Per category ImageNet can see, the vocabulary ids of the words that name it: its most
    frequent word and every word in the frequent half of the vocabulary (vocabularies are sorted
    by training frequency, so "corndogs" or "tricycles" are never forced while "dog", "dogs"
    and "puppy" all meet a dog constraint)."""
    table = imagenet_words()
    seeable = set(table.categories)
    found: dict[str, list[int]] = {}
    for i, word in enumerate(vocabulary):
        category = table.word_category.get(word)
        if category in seeable and (category not in found or i < len(vocabulary) // 2):
            found.setdefault(category, []).append(i)
    return found


def evidence_constraints(
    probabilities: torch.Tensor, vocabulary: Sequence[str], threshold: float
) -> Constraints:
    """ImageNet class probabilities (B, 1000) -> per image, up to MAX_CONSTRAINTS constraints: the
    most probable categories with evidence >= threshold that the vocabulary can name and whose
    confident evidence is trustworthy (confident_precision >= MIN_PRECISION, where measured)."""
    words = category_words(tuple(vocabulary))
    categories = imagenet_words().categories
    precision = confident_precision()
    evidence = category_probabilities(probabilities).cpu()  # (B, C)
    word_sets = []
    for row in evidence:
        ranked = [categories[c] for c in row.argsort(descending=True).tolist() if row[c] >= threshold]
        usable = [c for c in ranked if c in words and precision.get(c, 1.0) >= MIN_PRECISION]
        word_sets.append([words[c] for c in usable[:MAX_CONSTRAINTS]])
    return Constraints.from_words(word_sets, len(vocabulary))
