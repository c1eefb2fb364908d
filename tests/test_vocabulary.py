"""The tokeniser and the vocabulary: Unicode captions keep their words, ASCII captions are split
exactly as before (so the shipped model's vocabulary still fits), and only words training sees
are counted."""

import json
import random
import re
import string
from pathlib import Path

import pytest

from captioner.data.config import DataConfig
from captioner.data.datasets import load_dataset
from captioner.model.vocabulary import SPECIAL_TOKENS, Vocabulary, _unicode_words, tokenize
from captioner.training.inputs import prepare_data

from .conftest import SHARED_DATA
from .shapes import all_examples, write_coco_dataset

ROOT = Path(__file__).resolve().parents[1]
EARLIER = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")  # the tokeniser of earlier versions


def earlier_tokenize(text: str) -> list[str]:
    return EARLIER.findall(text.lower())


@pytest.mark.parametrize(
    "caption, words",
    [
        ("A café with naïve art", ["a", "café", "with", "naïve", "art"]),
        ("Die Straße im Regen", ["die", "strasse", "im", "regen"]),  # case-folded: ß is ss
        ("Ein Hund läuft über die Wiese.", ["ein", "hund", "läuft", "über", "die", "wiese"]),
        ("A cafe\u0301 (decomposed é)", ["a", "café", "decomposed", "é"]),  # NFKC composes it
        ("ＡＢＣ full-width ﬁsh", ["abc", "full-width", "fish"]),  # compatibility forms
        ("the dog’s ball", ["the", "dog's", "ball"]),  # a typographic apostrophe is an apostrophe
        ("Собака бежит по траве", ["собака", "бежит", "по", "траве"]),
        ("बिल्ली सो रही है", ["बिल्ली", "सो", "रही", "है"]),  # vowel signs stay in their words
        ("犬が走っている。", ["犬", "が", "走", "っ", "て", "い", "る"]),  # no spaces: one per character
    ],
)
def test_unicode_captions_keep_their_words(caption, words):
    assert tokenize(caption) == words


def test_ascii_captions_are_split_exactly_as_before():
    """The Unicode tokeniser agrees with the earlier [a-z0-9] one on every ASCII text (ASCII
    captions take the earlier one's fast path; this checks the two paths agree)."""
    rng = random.Random(8)
    alphabet = string.printable + "'''---___"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["A Man, riding a HORSE!", "well-known dog's -bone- 'quoted' a--b a''b x-1 o'clock_2"]
    for text in texts:
        assert tokenize(text) == earlier_tokenize(text) == _unicode_words(text), repr(text)


def test_the_shipped_vocabulary_still_fits_its_captions():
    """Every word of the shipped model's vocabulary is a token of its own; with the Flickr8k
    captions at hand, rebuilding the vocabulary as it was built (min count 5, every word
    counted) gives the shipped one, word for word and in order."""
    shipped = json.loads((ROOT / "weights" / "config.json").read_text())["vocabulary"]
    assert all(tokenize(word) == [word] for word in shipped[len(SPECIAL_TOKENS) :])
    root = SHARED_DATA / "flickr8k"
    if not root.is_dir():
        pytest.skip("shared Flickr8k data not present")
    train = load_dataset(DataConfig(kind="flickr", root=str(root)))["train"]
    captions = [c for item in train for c in item.captions]
    assert all(tokenize(c) == earlier_tokenize(c) for c in captions)
    assert Vocabulary.build(captions, min_count=5).to_json() == shipped


def test_only_the_words_training_sees_are_counted(tmp_path):
    """A 10,000-word caption is truncated to max_caption_words for training: the words past
    that never reach the model, so they must not fill the vocabulary either."""
    junk = " ".join(f"junk{i % 50}" for i in range(10_000))
    examples = [*all_examples()]
    image, caption, side = examples[0]
    examples[0] = (image, f"{caption} {junk}", side)
    captions, images = write_coco_dataset(tmp_path, examples)
    data = DataConfig(kind="coco", train=str(captions), train_images=str(images))
    vocab = prepare_data(data, min_word_count=1, max_caption_words=6).vocab  # the caption's own 6
    assert not [w for w in vocab.to_json() if w.startswith("junk")]
    assert len(vocab) == len(Vocabulary.build([c for _, c, _ in all_examples()], 1))
    longer = prepare_data(data, min_word_count=1, max_caption_words=8).vocab
    assert {"junk0", "junk1"} <= set(longer.to_json()) and "junk2" not in longer.to_json()
    assert Vocabulary.build(["a b c d", "c d"], 1, max_words=2).to_json()[4:] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "words, message",
    [
        ([*SPECIAL_TOKENS, "dog", 5], "vocabulary entry 5 is 5"),
        ([*SPECIAL_TOKENS, None], "vocabulary entry 4 is None"),
        ([*SPECIAL_TOKENS, ["a"]], "vocabulary entry 4 is ['a']"),
        ([*SPECIAL_TOKENS, ""], "vocabulary entry 4 is ''"),
    ],
)
def test_a_vocabulary_entry_that_is_not_a_word_is_refused(words, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Vocabulary(words)


def test_a_vocabulary_that_is_not_a_list_is_refused():
    with pytest.raises(TypeError, match="vocabulary must be a list of words, got dict"):
        Vocabulary({"<pad>": 0})  # type: ignore[arg-type]
