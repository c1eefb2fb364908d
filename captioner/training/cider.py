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

    def __init__(self, corpus_references: Iterable[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0):
        self.n = n
        self.sigma = sigma
        document_frequency: Counter[NGram] = Counter()
        num_documents = 0
        for refs in corpus_references:  # one document = all references of one image
            document_frequency.update(
                {g for ref in refs for counts in self._ngram_counts(ref) for g in counts}
            )
            num_documents += 1
        if num_documents == 0:
            raise ValueError("corpus_references is empty: need the training references for df")
        self.log_num_documents = math.log(num_documents)
        # Unseen n-grams count as df = 1, i.e. idf = log(num_documents); n-grams seen in a single
        # image get that same value, so only the (far fewer) n-grams with df > 1 are stored.
        self.idf = {g: self.log_num_documents - math.log(c) for g, c in document_frequency.items() if c > 1}

    def scores(
        self, candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
    ) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against its own tokenised references."""
        if len(candidates) != len(references):
            raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
        # SCST repeats each image's references for every sample (and samples often repeat):
        # vectorise each distinct caption once per call.
        vectors: dict[tuple[str, ...], Vector] = {}
        out = np.empty(len(candidates), dtype=np.float64)
        for i, (candidate, refs) in enumerate(zip(candidates, references, strict=True)):
            if not refs:
                raise ValueError(f"candidate {i} has no references")
            vec = self._vector(candidate, vectors)
            total = sum(self._similarity(vec, self._vector(ref, vectors)) for ref in refs)
            out[i] = total / len(refs) * 10.0
        return out

    def _ngram_counts(self, tokens: Sequence[str]) -> list[Counter[NGram]]:
        """Counts of the 1..n-grams of a caption, one Counter per order."""
        if isinstance(tokens, str):
            raise TypeError(f"captions must be token lists, got the string {tokens!r}")
        tokens = list(tokens)
        return [Counter(zip(*(tokens[j:] for j in range(k)), strict=False)) for k in range(1, self.n + 1)]

    def _vector(self, tokens: Sequence[str], cache: dict[tuple[str, ...], Vector]) -> Vector:
        key = tuple(tokens)
        if key not in cache:
            idf, unseen = self.idf, self.log_num_documents
            weights = [
                {g: tf * idf.get(g, unseen) for g, tf in counts.items()}
                for counts in self._ngram_counts(tokens)
            ]
            norms = [math.hypot(*order.values()) for order in weights]
            # pycocoevalcap measures caption length in bigrams (a quirk kept for parity).
            length = max(len(key) - 1, 0) if self.n >= 2 else 0
            cache[key] = weights, norms, length
        return cache[key]

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
