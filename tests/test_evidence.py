"""Issue #37: the encoder's ImageNet evidence (captioner.model.evidence) and the decoding option
that listens to it (DecodeOptions.evidence_penalty)."""

from __future__ import annotations

import math

import pytest
import torch
from skimage import data

from captioner.model.decoding import beam_search
from captioner.model.evidence import (
    EvidenceError,
    ImageNetEvidence,
    check_untuned_before,
    evidence_bias,
    imagenet_words,
    word_evidence,
)
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.model.vocabulary import Vocabulary
from captioner.serving.captioner import Captioner
from tests.test_decoding import _random_decoder, _random_features


def _class(label: str) -> int:
    return next(i for i, c in enumerate(imagenet_words().classes) if c.label == label)


def test_imagenet_words_map_breeds_fridge_and_never_person():
    classes = imagenet_words().classes
    assert len(classes) == 1000
    assert all(c.coco == "dog" for c in classes[151:269])  # the 118 dog breeds
    fridge = classes[_class("refrigerator")]
    assert fridge.coco == "refrigerator" and "refrigerator" in fridge.words
    assert not any(c.coco == "person" for c in classes)
    assert classes[_class("ballplayer")].implies_person
    assert classes[_class("tabby")].coco == "cat"


def test_word_evidence_names_the_category_and_leaves_person_alone():
    probabilities = torch.zeros(1000)
    probabilities[_class("tabby")], probabilities[_class("Egyptian cat")] = 0.5, 0.3
    cat, person, verb = word_evidence(["cats", "man", "sits"], probabilities)
    assert cat is not None and cat.category == "cat" and cat.label == "tabby"
    assert math.isclose(cat.probability, 0.8, rel_tol=1e-6)
    assert person is None and verb is None  # ImageNet has no person class


def test_evidence_bias_lowers_unseen_objects_by_their_reliability():
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "cat", "dog", "man", "chair", "frisbee"]
    probabilities = torch.zeros(2, 1000)
    probabilities[0, _class("tabby")] = 0.9  # photo 0: a cat; photo 1: nothing ImageNet knows
    bias = evidence_bias(probabilities, words, penalty=4.0)
    assert bias.shape == (2, len(words))
    assert bias[0, words.index("cat")] == 0 and bias[1, words.index("cat")] < -3
    assert -4 < bias[0, words.index("dog")] < -3.5  # missing dog evidence is reliable
    assert -1 < bias[0, words.index("chair")] < 0  # missing chair evidence means little
    for never in ("a", "man", "frisbee"):  # not an object / person / no ImageNet class
        assert (bias[:, words.index(never)] == 0).all()


def test_word_bias_in_beam_search_follows_each_image_through_the_batch():
    decoder, features = _random_decoder(), _random_features(4)
    options = DecodeOptions(beam_size=3, no_repeat_ngram_size=0)
    plain = beam_search(decoder, features, options)
    zero = beam_search(decoder, features, options, word_bias=torch.zeros(4, 12))
    assert [[h.tokens for h in hs] for hs in zero] == [[h.tokens for h in hs] for hs in plain]
    image = next(i for i, hs in enumerate(plain) if hs[0].tokens)
    banned = plain[image][0].tokens[0]
    bias = torch.zeros(4, 12)
    bias[image, banned] = float("-inf")  # only this image may not say its first word
    steered = beam_search(decoder, features, options, word_bias=bias)
    assert all(banned not in h.tokens for h in steered[image])
    for other in set(range(4)) - {image}:
        assert [h.tokens for h in steered[other]] == [h.tokens for h in plain[other]]


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "4"])
def test_bad_evidence_penalty_raises_value_error(bad):
    with pytest.raises(ValueError, match="evidence_penalty"):
        DecodeOptions(evidence_penalty=bad)


def test_evidence_penalty_without_evidence_raises():
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *"abcdefgh"])
    with pytest.raises(ValueError, match="evidence_penalty needs"):
        caption_features(_random_decoder(), vocab, _random_features(1), DecodeOptions(evidence_penalty=2.0))


def test_evidence_needs_an_imagenet_head_and_untuned_early_stages():
    with pytest.raises(EvidenceError, match="resnet50"):
        ImageNetEvidence("resnet50")
    with pytest.raises(EvidenceError, match="stage 6"):
        check_untuned_before(6)
    check_untuned_before(7)


@pytest.fixture(scope="module")
def shipped() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


@pytest.mark.slow
def test_evidence_off_is_todays_caption_and_penalty_steers(shipped):
    today = shipped.caption(data.chelsea())
    assert today.evidence is None and today.word_evidence is None
    assert shipped._evidence_head is None  # the default path never builds or runs it
    off = shipped.caption(data.chelsea(), evidence_penalty=0.0)
    assert (off.text, off.score) == (today.text, today.score)
    with_evidence = shipped.caption(data.chelsea(), evidence=True)
    assert with_evidence.text == today.text and math.isclose(with_evidence.score, today.score, abs_tol=1e-3)
    steered = shipped.caption(data.chelsea(), evidence_penalty=4.0)  # "a brown dog ..." -> no dog
    assert "dog" in today.words and "dog" not in steered.words


@pytest.mark.slow
def test_evidence_on_real_photos(shipped):
    cat = shipped.caption(data.chelsea(), evidence=True)
    assert cat.evidence is not None and cat.evidence[0].category == "cat"
    assert cat.evidence[0].probability > 0.5
    probabilities = [e.probability for e in cat.evidence]
    assert probabilities == sorted(probabilities, reverse=True)
    assert cat.word_evidence is not None and len(cat.word_evidence) == len(cat.words)
    coffee = shipped.caption(data.coffee(), evidence=True)
    assert coffee.evidence is not None and "cup" in [e.category for e in coffee.evidence]
