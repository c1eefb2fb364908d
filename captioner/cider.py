"""CIDEr-D per caption, as the reward for self-critical sequence training (SCST).

pycocoevalcap's Cider derives document frequencies from whatever references it is given, which
for an SCST batch of ~50 images would make every n-gram look rare. Here the frequencies are fixed
once from the whole training corpus, and the formula otherwise follows pycocoevalcap's
CiderScorer exactly (so on the same references the two agree to rounding error).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

NGram = tuple[str, ...]
# Per n-gram order: tf-idf weights, their L2 norm; and the length used by the length penalty.
Vector = tuple[list[dict[NGram, float]], list[float], int]


class CiderD:
    """CIDEr-D scorer with document frequencies from a fixed reference corpus.

    `corpus_references` yields, per training image, its reference captions as token lists.
    Scores are on pycocoevalcap's scale (about 0-10, not multiplied by 100).
    """

    def __init__(
        self,
        corpus_references: Iterable[Sequence[Sequence[str]]],
        n: int = 4,
        sigma: float = 6.0,
    ):
        self.n = n
        self.sigma = sigma
        document_frequency: Counter[NGram] = Counter()
        num_documents = 0
        for refs in corpus_references:  # one document = all references of one image
            document_frequency.update({g for ref in refs for g in self._ngram_counts(ref)})
            num_documents += 1
        if num_documents == 0:
            raise ValueError("corpus_references is empty: need the training references for df")
        self.log_num_documents = math.log(num_documents)
        # An n-gram never seen in the corpus gets df = 1, i.e. idf = log(num_documents).
        self.idf = {g: self.log_num_documents - math.log(c) for g, c in document_frequency.items()}

    def scores(
        self, candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
    ) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against its own tokenised references."""
        if len(candidates) != len(references):
            raise ValueError(
                f"got {len(candidates)} candidates but {len(references)} reference lists"
            )
        # SCST scores several samples per image: vectorise each distinct reference set once.
        ref_vectors: dict[tuple[NGram, ...], list[Vector]] = {}
        out = np.empty(len(candidates), dtype=np.float64)
        for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            if not refs:
                raise ValueError(f"candidate {i} has no references")
            key = tuple(tuple(ref) for ref in refs)
            if key not in ref_vectors:
                ref_vectors[key] = [self._vector(ref) for ref in refs]
            vec = self._vector(candidate)
            out[i] = sum(self._similarity(vec, r) for r in ref_vectors[key]) / len(refs) * 10.0
        return out

    def _ngram_counts(self, tokens: Sequence[str]) -> Counter[NGram]:
        if isinstance(tokens, str):
            raise TypeError(f"captions must be token lists, got the string {tokens!r}")
        tokens = tuple(tokens)
        return Counter(
            tokens[i : i + k] for k in range(1, self.n + 1) for i in range(len(tokens) - k + 1)
        )

    def _vector(self, tokens: Sequence[str]) -> Vector:
        weights: list[dict[NGram, float]] = [{} for _ in range(self.n)]
        length = 0
        for gram, tf in self._ngram_counts(tokens).items():
            weights[len(gram) - 1][gram] = tf * self.idf.get(gram, self.log_num_documents)
            if len(gram) == 2:  # pycocoevalcap measures length in bigrams; kept for parity
                length += tf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        return weights, norms, length

    def _similarity(self, candidate: Vector, reference: Vector) -> float:
        """Mean over n-gram orders of the clipped cosine, times the gaussian length penalty."""
        (cand, cand_norms, cand_len), (ref, ref_norms, ref_len) = candidate, reference
        total = 0.0
        for k in range(self.n):
            if cand_norms[k] and ref_norms[k]:
                r = ref[k]
                dot = sum(min(w, r[g]) * r[g] for g, w in cand[k].items() if g in r)
                total += dot / (cand_norms[k] * ref_norms[k])
        penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * self.sigma**2))
        return total / self.n * penalty
