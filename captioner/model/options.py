"""How a caption is searched for: one dataclass that the API, batch captioner, app, evaluation and
command line share, so each option has one name, one default and one check.

No torch here: the command line builds its decoding flags from these fields without loading it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

# What the user-facing layers (Captioner, `captioner caption`, the app, evaluation) use by
# default: no caption repeats a 3-word phrase. On the Flickr8k dev split it raised every metric
# of the shipped model a little (beam 3: CIDEr 51.96 -> 52.36, BLEU-4 21.37 -> 21.53).
NO_REPEAT_NGRAM_SIZE = 3

# How hard a focus region pulls attention (captioner.model.focus): the best of 1, 2, 4, 8 on
# coco-mini (scripts/evaluate_focus.py). Here, torch-free, so that the flags can show it.
DEFAULT_FOCUS_STRENGTH = 2.0
# Beyond ~50 the softmax already puts all attention inside the region; the bound keeps
# strength x weight far from float32's overflow (3.4e38), which would make every score NaN.
MAX_FOCUS_STRENGTH = 1e4


def check_whole_number(name: str, value: Any, low: int, high: int | None = None) -> None:
    """ValueError naming the argument and its allowed range (bools and 2.5 are not numbers of beams)."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a whole number {allowed}, got {value!r}")


def check_focus_strength(strength: Any) -> float:
    """The focus strength as a float, or a ValueError naming it: a finite number from 0 to
    MAX_FOCUS_STRENGTH (numpy and torch scalars included)."""
    number = isinstance(strength, numbers.Real) or getattr(strength, "ndim", None) == 0
    try:
        value = float(strength) if number and not isinstance(strength, bool) else math.nan
    except (TypeError, ValueError):  # a 0-d array of text
        value = math.nan
    if not 0 <= value <= MAX_FOCUS_STRENGTH:
        raise ValueError(
            f"focus_strength must be a number from 0 to {MAX_FOCUS_STRENGTH:g}, got {strength!r}"
        )
    return value


def check_penalty(name: str, value: Any) -> None:
    """ValueError naming the option unless it is a finite number >= 0 (a log-probability penalty)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding settings; every field is a flag of `captioner caption`, `evaluate` and `app`.

    Out-of-range values raise ValueError naming the field when the options are made, before
    they reach torch (whose errors would not say which).
    """

    beam_size: int = 5
    """Hypotheses kept at each word (1: greedy). The default, with length_penalty 1.0, scored
    the shipped model's best Flickr8k dev CIDEr (59.54 against beam 3's 57.12; issue #37)."""
    max_length: int = 20
    """Most words in a caption."""
    length_penalty: float = 1.0
    """Rank finished captions by log-probability / length**length_penalty (0: plain
    log-probability; 1.0, the default, favours longer captions)."""
    n_best: int | None = None
    """Alternatives returned per image, best first (none: all beam_size)."""
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE
    """Never repeat an n-gram of this many words within a caption (3 stops 'a man in a red shirt
    and a man in a red shirt'; 0: allow repeats)."""
    evidence_penalty: float = 0.0
    """Lower, by up to this much log-probability, the object words (dog, car, ...) of categories
    the encoder's ImageNet classifier sees no evidence of in the photo, weighted by how reliable
    missing evidence is for each (captioner.model.evidence; 0: off, the prototype used 4)."""
    constrain_evidence: float | None = None
    """Constrained beam search: the caption must name the (at most 2) object categories whose
    ImageNet evidence is at least this probability, 0-1 (captioner.model.constraints; none: off;
    0.3 was measured)."""
    person_penalty: float = 0.0
    """Lower person words (man, girl, people, ...) by this much log-probability when the person
    detector finds no person in the photo (captioner.model.person; 0: off, 4 was measured)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuse options that make no sense, naming the option and its allowed range."""
        check_whole_number("beam_size", self.beam_size, 1)
        check_whole_number("max_length", self.max_length, 1)
        if self.n_best is not None:
            check_whole_number("n_best", self.n_best, 1, self.beam_size)
        check_whole_number("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        penalty = self.length_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty):
            raise ValueError(f"length_penalty must be a finite number, got {penalty!r}")
        check_penalty("evidence_penalty", self.evidence_penalty)
        check_penalty("person_penalty", self.person_penalty)
        threshold = self.constrain_evidence
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1
        ):
            raise ValueError(f"constrain_evidence must be a probability in (0, 1] or None, got {threshold!r}")

    @property
    def uses_evidence(self) -> bool:
        """Whether decoding needs each photo's ImageNet evidence (captioner.model.evidence)."""
        return bool(self.evidence_penalty or self.person_penalty or self.constrain_evidence is not None)

    @property
    def per_image(self) -> int:
        """Captions returned per image: n_best, or beam_size when n_best is none."""
        return self.n_best or self.beam_size

    def replace(self, **changes: Any) -> DecodeOptions:
        """These options with some fields changed (checked again): `options.replace(beam_size=1)`.
        An unknown name is a TypeError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"unknown decoding option {unknown[0]!r}; the options are "
                + ", ".join(f.name for f in dataclasses.fields(self))
            )
        return dataclasses.replace(self, **changes) if changes else self
