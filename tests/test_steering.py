"""Issue #37: decoding that listens to the evidence: constrained beam search (DecodeOptions.
constrain_evidence, captioner.model.constraints) and the person detector (person_penalty,
captioner.model.person)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from skimage import data

from captioner.model.constraints import Constraints, evidence_constraints
from captioner.model.decoding import beam_search
from captioner.model.ensemble import DecoderEnsemble
from captioner.model.evidence import imagenet_words
from captioner.model.options import DecodeOptions
from captioner.model.person import (
    PERSON_THRESHOLD,
    fit_detector,
    load_detector,
    person_bias,
    person_probability,
)
from captioner.model.results import caption_features
from captioner.model.vocabulary import Vocabulary
from captioner.serving.captioner import Captioner
from tests.test_decoding import _random_decoder, _random_features

END = Vocabulary.end_id
# no word twice: with 8 words every caption ends within max_length
OPTIONS = DecodeOptions(beam_size=3, max_length=12, no_repeat_ngram_size=1)


def _tokens(beams):
    return [[(h.tokens, h.finished) for h in hypotheses] for hypotheses in beams]


def _unused_word(beams, image: int) -> int:
    """A word none of the image's plain captions contains."""
    said = {w for h in beams[image] for w in h.tokens}
    return next(w for w in range(4, 12) if w not in said)


def test_constrained_search_includes_the_forced_words_and_ends():
    decoder, features = _random_decoder(), _random_features(3)
    plain = beam_search(decoder, features, OPTIONS)
    first, second = _unused_word(plain, 0), _unused_word(plain, 2)
    other = next(w for w in range(4, 12) if w not in (first, second))
    constraints = Constraints.from_words([[[first]], [], [[second, other], [first]]], 12)
    forced = beam_search(decoder, features, OPTIONS, constraints=constraints)
    for image, needed in ((0, [{first}]), (2, [{second, other}, {first}])):
        best = forced[image][0]
        assert best.finished and best.met == len(needed)  # finished: it emitted <end>
        assert all(set(best.tokens) & words for words in needed)
    assert _tokens(forced)[1] == _tokens(plain)[1]  # an image without constraints: plain search


@pytest.mark.parametrize("beam_size", [1, 2])
def test_constrained_greedy_and_small_beams_meet_the_constraint(beam_size):
    decoder, features = _random_decoder(seed=1), _random_features(2, seed=5)
    options = DecodeOptions(beam_size=beam_size, max_length=12, no_repeat_ngram_size=1)
    plain = beam_search(decoder, features, options)
    word = _unused_word(plain, 0)
    forced = beam_search(
        decoder, features, options, constraints=Constraints.from_words([[[word]], [[word]]], 12)
    )
    assert all(word in hypotheses[0].tokens and hypotheses[0].finished for hypotheses in forced)


def test_no_constraints_give_exactly_the_plain_search():
    decoder, features = _random_decoder(), _random_features(4)
    plain = beam_search(decoder, features, OPTIONS)
    empty = beam_search(decoder, features, OPTIONS, constraints=Constraints.from_words([[]] * 4, 12))
    assert _tokens(empty) == _tokens(plain)
    assert [[h.score for h in hs] for hs in empty] == [[h.score for h in hs] for hs in plain]


def test_constrained_search_runs_an_ensemble():
    ensemble = DecoderEnsemble([_random_decoder(seed=0), _random_decoder(seed=1)]).eval()
    features = _random_features(2)
    word = _unused_word(beam_search(ensemble, features, OPTIONS), 0)
    forced = beam_search(ensemble, features, OPTIONS, constraints=Constraints.from_words([[[word]], []], 12))
    assert word in forced[0][0].tokens and forced[0][0].finished


@pytest.mark.parametrize("bad", [[[[]]], [[[99]]], [[[4], [5], [6]]]])
def test_bad_constraints_raise_value_error(bad):
    with pytest.raises(ValueError, match="constraints"):
        Constraints.from_words(bad, 12)


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("constrain_evidence", 0.0),
        ("constrain_evidence", 1.5),
        ("constrain_evidence", math.nan),
        ("constrain_evidence", True),
        ("constrain_evidence", "0.3"),
        ("person_penalty", -1.0),
        ("person_penalty", math.inf),
        ("person_penalty", "4"),
    ],
)
def test_bad_steering_options_raise_value_error(option, bad):
    with pytest.raises(ValueError, match=option):
        DecodeOptions(**{option: bad})


@pytest.mark.parametrize("option", [{"constrain_evidence": 0.3}, {"person_penalty": 4.0}])
def test_steering_without_evidence_names_the_option(option):
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"])
    with pytest.raises(ValueError, match=f"{next(iter(option))} needs"):
        caption_features(_random_decoder(), vocab, _random_features(1), DecodeOptions(**option))


def _class(label: str) -> int:
    return next(i for i, c in enumerate(imagenet_words().classes) if c.label == label)


# Sorted by frequency, as vocabularies are; the rare tail ("tricycles") is never forced.
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "cats", "dog", "man", "skis", "kitty"]
WORDS += [f"rare{i}" for i in range(10)] + ["tricycles"]


def test_evidence_constraints_force_confident_trusted_categories():
    probabilities = torch.zeros(3, 1000)
    probabilities[0, _class("tabby")], probabilities[0, _class("beagle")] = 0.6, 0.35
    probabilities[1, _class("ski")] = 0.9  # skis: confident evidence that Flickr8k seldom names
    probabilities[2, _class("tabby")] = 0.2  # below the threshold
    constraints = evidence_constraints(probabilities, WORDS, threshold=0.3)
    assert constraints.counts == (2, 0, 0)
    bits = constraints.word_bits[0]
    assert {WORDS[i] for i in (bits & 1).nonzero().squeeze(1).tolist()} == {"cat", "cats", "kitty"}
    assert {WORDS[i] for i in (bits & 2).nonzero().squeeze(1).tolist()} == {"dog"}


def test_person_detector_file_loads_and_lowers_person_words():
    weights, bias = load_detector()
    assert weights.shape == (1000,) and math.isfinite(bias)
    # Fixture: evidence spread over the 10 classes the detector reads as people, or as no one.
    probabilities = torch.full((2, 1000), 1e-4)
    for row, order in enumerate((weights.argsort(descending=True), weights.argsort())):
        probabilities[row, order[:10]] = (1 - 990e-4) / 10
    person = person_probability(probabilities)
    assert person[0] > PERSON_THRESHOLD > person[1]
    penalty = person_bias(probabilities, WORDS, 4.0)
    assert penalty[1, WORDS.index("man")] == -4.0 and (penalty[0] == 0).all()
    assert (penalty[1, [WORDS.index(w) for w in ("a", "cat", "dog")]] == 0).all()


def test_person_detector_rejects_a_malformed_file(tmp_path):
    path = tmp_path / "detector.json"
    path.write_text(json.dumps({"weights": [0.0] * 10, "bias": 0.0}))
    with pytest.raises(ValueError, match="1000 'weights'"):
        load_detector(path)


def test_fit_detector_separates_and_needs_both_classes():
    inputs = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    labels = (inputs[:, 0] + 0.5 * inputs[:, 1] > 0).float()
    weights, bias = fit_detector(inputs, labels, l2=1e-3)
    assert float(((inputs @ weights + bias > 0).float() == labels).float().mean()) > 0.95
    with pytest.raises(ValueError, match="both classes"):
        fit_detector(inputs, torch.ones(200))


@pytest.fixture(scope="module")
def shipped() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


@pytest.mark.slow
def test_shipped_model_names_the_cat_when_constrained(shipped):
    plain = shipped.caption(data.chelsea(), beam_size=3, length_penalty=0.0)
    assert "cat" not in plain.words  # today: "a brown dog ..."
    forced = shipped.caption(data.chelsea(), beam_size=3, length_penalty=0.0, constrain_evidence=0.3)
    assert "cat" in forced.words and forced.finished
    off = shipped.caption(data.chelsea(), beam_size=3, length_penalty=0.0, constrain_evidence=None)
    assert (off.text, off.score) == (plain.text, plain.score)
