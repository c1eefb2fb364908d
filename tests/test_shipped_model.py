"""The default model in weights/: loads with no arguments, is small, documented and works."""

import json

import numpy as np
import pytest
from skimage import data

from captioner import Captioner
from captioner.model.folder import CONFIG_FILE, WEIGHTS_FILE
from captioner.serving.captioner import DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def shipped() -> Captioner:
    return Captioner.from_pretrained(device="cpu")


def test_weights_folder_holds_a_compact_documented_model():
    weights = DEFAULT_WEIGHTS / WEIGHTS_FILE
    assert weights.stat().st_size < 50 * 2**20
    config = json.loads((DEFAULT_WEIGHTS / CONFIG_FILE).read_text())
    assert config["format"] == "captioner" and len(config["vocabulary"]) > 1000
    card = (DEFAULT_WEIGHTS / "MODEL_CARD.md").read_text()
    for needed in ("Flickr8k", "Hodosh", "BLEU-4", "CIDEr", "METEOR", "scripts/train.py"):
        assert needed in card


def test_default_model_captions_a_real_photo(shipped):
    result = shipped.caption(data.astronaut(), beam_size=3)
    assert result.finished and 3 <= len(result.words) <= 20
    assert all(w in shipped.vocab.index for w in result.words)
    assert result.attention.shape == (len(result.words), *shipped.grid_shape)
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert result.words[0] in ("a", "an", "the", "two", "three", "four", "people", "woman", "man")
