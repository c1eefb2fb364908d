"""What a caption is: the result types, and the one path from annotation grids to them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from captioner.model.decoder import Decoder
from captioner.model.decoding import Hypothesis
from captioner.model.evidence import Evidence, evidence_items, word_evidence
from captioner.model.options import DecodeOptions
from captioner.model.steering import steered_beam_search
from captioner.model.vocabulary import Vocabulary


@dataclass
class Alternative:
    text: str
    words: list[str]
    score: float  # ranking score (log-probability, length-normalised if asked)
    log_prob: float


@dataclass
class CaptionResult:
    text: str
    words: list[str]
    score: float
    log_prob: float
    attention: np.ndarray  # (len(words), h, w): where the model looked for each word
    alternatives: list[Alternative] = field(default_factory=list)  # n-best, best first
    finished: bool = True  # False if max_length cut the caption before <end>
    notes: list[str] = field(default_factory=list)  # what makes this caption less trustworthy
    # (len(words),): the gating scalar beta of each word, 0-1 (mean over its channels): how much
    # the image fed that word; low values mark words the language model filled in by itself.
    gate: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    # Only when asked for (caption(..., evidence=True)): what the encoder's ImageNet classifier
    # saw, best first, and for each word the evidence for it (None: a word ImageNet cannot name).
    evidence: list[Evidence] | None = None
    word_evidence: list[Evidence | None] | None = None


@torch.inference_mode()
def caption_features(
    decoder: Decoder,
    vocab: Vocabulary,
    features: torch.Tensor,
    options: DecodeOptions,
    focus: torch.Tensor | None = None,
    evidence: torch.Tensor | None = None,
    report_evidence: bool = True,
) -> list[CaptionResult]:
    """Annotation grids (B, L, D) -> captions: the one path from features to words, shared by
    Captioner, evaluation and validation during training. `focus`: attention bias (B, L).
    `evidence`: ImageNet class probabilities (B, 1000) (captioner.model.evidence), which the
    results then carry and the evidence options (evidence_penalty, person_penalty,
    constrain_evidence; captioner.model.steering) and a decoder with semantic attributes need;
    report_evidence=False: the results do not carry it (a model that reads it was not asked to)."""
    beams = steered_beam_search(decoder, features, options, vocab.words, focus, evidence)
    side = math.isqrt(features.shape[1])  # grids are square
    results = [_result(hypotheses, vocab, (side, side)) for hypotheses in beams]
    if evidence is not None and report_evidence:
        for result, probabilities in zip(results, evidence.cpu(), strict=True):
            result.evidence = evidence_items(probabilities)
            result.word_evidence = word_evidence(result.words, probabilities)
    return results


def _result(hypotheses: list[Hypothesis], vocab: Vocabulary, grid: tuple[int, int]) -> CaptionResult:
    best = hypotheses[0]
    words = vocab.decode(best.tokens)
    attention = best.alphas.float().numpy().reshape(len(best.tokens), *grid)
    alternatives = []
    for h in hypotheses:
        alt_words = vocab.decode(h.tokens)
        alternatives.append(Alternative(" ".join(alt_words), alt_words, h.score, h.log_prob))
    return CaptionResult(
        " ".join(words),
        words,
        best.score,
        best.log_prob,
        attention,
        alternatives,
        best.finished,
        gate=best.gates.float().numpy(),
    )
