"""Decoding that listens to the encoder's ImageNet evidence (issue #37): the decoding options
that use it (DecodeOptions.evidence_penalty, person_penalty, constrain_evidence) turned into
what beam search takes, a per-image word bias and per-image constraints."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captioner.model.constraints import Constraints, evidence_constraints
from captioner.model.decoder import Decoder, reads_attributes
from captioner.model.decoding import Hypothesis, beam_search
from captioner.model.evidence import evidence_bias
from captioner.model.options import DecodeOptions
from captioner.model.person import person_bias


def check_evidence(options: DecodeOptions, evidence: torch.Tensor | None) -> None:
    """ValueError naming the option when a decoding option needs evidence that is missing."""
    if evidence is not None or not options.uses_evidence:
        return
    wanted = [
        name
        for name, on in (
            ("evidence_penalty", options.evidence_penalty),
            ("person_penalty", options.person_penalty),
            ("constrain_evidence", options.constrain_evidence is not None),
        )
        if on
    ]
    raise ValueError(
        f"{wanted[0]} needs each photo's ImageNet evidence: caption photos with a Captioner "
        "(grids alone do not carry it)"
    )


def word_bias(
    evidence: torch.Tensor, vocabulary: Sequence[str], options: DecodeOptions
) -> torch.Tensor | None:
    """The (B, V) log-probability bias of the evidence penalties, or None when both are off."""
    bias = None
    if options.evidence_penalty:
        bias = evidence_bias(evidence, vocabulary, options.evidence_penalty)
    if options.person_penalty:
        person = person_bias(evidence, vocabulary, options.person_penalty)
        bias = person if bias is None else bias + person
    return bias


def steered_beam_search(
    decoder: Decoder,
    features: torch.Tensor,  # (B, L, D)
    options: DecodeOptions,
    vocabulary: Sequence[str],
    focus: torch.Tensor | None = None,  # (B, L)
    evidence: torch.Tensor | None = None,  # (B, 1000) ImageNet class probabilities
) -> list[list[Hypothesis]]:
    """beam_search with the evidence options applied, and the evidence as semantic attributes for
    a decoder that reads them. Constrained images are searched in groups of equal constraint
    count, so that an image with one constraint (2 states) or none (plain search) does not pay
    for the 4 states of an image with two."""
    check_evidence(options, evidence)
    with_attributes = reads_attributes(decoder)
    if with_attributes and evidence is None:
        raise ValueError(
            "evidence: this model reads semantic attributes, each photo's ImageNet evidence: "
            "caption photos with a Captioner (grids alone do not carry it)"
        )
    attributes = evidence.to(features.device) if with_attributes and evidence is not None else None
    if evidence is None or not options.uses_evidence:
        return beam_search(decoder, features, options, focus, attributes=attributes)
    bias = word_bias(evidence, vocabulary, options)
    bias = bias.to(features.device) if bias is not None else None
    if options.constrain_evidence is None:
        return beam_search(decoder, features, options, focus, bias, attributes=attributes)
    constraints = evidence_constraints(evidence, vocabulary, options.constrain_evidence)
    out: list[list[Hypothesis]] = [[] for _ in range(len(features))]
    for count in sorted(set(constraints.counts)):
        rows = [i for i, c in enumerate(constraints.counts) if c == count]
        index = torch.tensor(rows, device=features.device)
        group = Constraints(constraints.word_bits[rows], (count,) * len(rows)) if count else None
        beams = beam_search(
            decoder,
            features[index],
            options,
            focus[index] if focus is not None else None,
            bias[index] if bias is not None else None,
            group,
            attributes[index] if attributes is not None else None,
        )
        for i, hypotheses in zip(rows, beams, strict=True):
            out[i] = hypotheses
    return out
