"""Words the vocabulary lacks, added by direct transfer (captioner.model.new_words, issue #37 (d))."""

import json

import pytest
import torch

from captioner.evaluation.coco_objects import COCO_SYNONYMS
from captioner.model.decoder import AttentionDecoder
from captioner.model.folder import load_model, read_config, save_model
from captioner.model.new_words import check_new_words, extend_decoder, extend_model, load_new_words
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.model.vocabulary import Vocabulary
from captioner.serving.captioner import DEFAULT_WEIGHTS

from .shapes import all_examples

# The list of COCO categories the shipped vocabulary cannot name (oven aside: "stove"
# names it, though the table adds "oven" too).
MISSING_CATEGORIES = (
    "zebra giraffe banana clock vase sandwich donut sink broccoli carrot keyboard remote "
    "microwave toaster scissors toothbrush fork spoon"
).split() + ["fire hydrant"]


def small_decoder(vocab: Vocabulary) -> AttentionDecoder:
    torch.manual_seed(0)
    return AttentionDecoder(
        len(vocab), feature_dim=16, annotation_dim=8, embed_dim=8, hidden_dim=12, attention_dim=8, dropout=0.0
    ).eval()


VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "horse", "dog", "runs"])


def test_new_rows_copy_their_source_and_old_rows_are_unchanged():
    decoder = small_decoder(VOCAB)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    extended, vocab = extend_decoder(decoder, VOCAB, {"zebra": "horse", "puppy": "dog"})
    assert vocab.words == [*VOCAB.words, "zebra", "puppy"]
    assert extended.vocab_size == len(vocab) == extended.classifier.out_features
    old, horse, dog = len(VOCAB), VOCAB.index["horse"], VOCAB.index["dog"]
    for name in ("embedding.weight", "classifier.weight", "classifier.bias"):
        new = extended.state_dict()[name]
        assert torch.equal(new[:old], before[name])
        assert torch.equal(new[vocab.index["zebra"]], before[name][horse])
        assert torch.equal(new[vocab.index["puppy"]], before[name][dog])
    assert all(
        torch.equal(v, before[k]) for k, v in decoder.state_dict().items()
    )  # the original is untouched


def test_old_words_logits_are_unchanged_and_a_new_word_scores_as_its_source():
    decoder = small_decoder(VOCAB)
    extended, vocab = extend_decoder(decoder, VOCAB, {"zebra": "horse"})
    features = torch.randn(2, 5, 16)
    captions = torch.tensor([[1, 4, 5, 7, 2], [1, 4, 6, 2, 0]])
    lengths = torch.tensor([5, 4])
    with torch.no_grad():
        logits, _ = decoder(features, captions, lengths)
        new_logits, _ = extended(features, captions, lengths)
    assert torch.allclose(new_logits[..., : len(VOCAB)], logits, atol=1e-6)
    assert torch.allclose(new_logits[..., vocab.index["zebra"]], logits[..., VOCAB.index["horse"]], atol=1e-6)


def test_bias_offset_lowers_only_the_new_word():
    decoder = small_decoder(VOCAB)
    extended, vocab = extend_decoder(decoder, VOCAB, {"zebra": "horse"}, bias_offset=-2.0)
    bias = extended.classifier.bias.detach()
    assert torch.allclose(bias[vocab.index["zebra"]], bias[VOCAB.index["horse"]] - 2.0)


def test_bad_tables_are_refused_and_known_words_skipped():
    assert check_new_words(VOCAB, {"dog": "horse", "zebra": "horse"}) == {"zebra": "horse"}
    with pytest.raises(ValueError, match="'unicorn'"):
        check_new_words(VOCAB, {"zebra": "unicorn"})
    with pytest.raises(ValueError, match="fire hydrant"):
        check_new_words(VOCAB, {"fire hydrant": "horse"})
    with pytest.raises(ValueError, match="<end>"):
        check_new_words(VOCAB, {"zebra": "<end>"})
    with pytest.raises(ValueError, match="bias_offset"):
        extend_decoder(small_decoder(VOCAB), VOCAB, {"zebra": "horse"}, bias_offset=float("nan"))


def test_load_new_words_refuses_a_malformed_file(tmp_path):
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"sources": {"zebra": 3}}))
    with pytest.raises(ValueError, match="words.json"):
        load_new_words(path)


def test_the_shipped_table_names_every_missing_category_of_the_shipped_model():
    """Every source is a word of the shipped vocabulary; after the transfer every category the
    issue lists as unnameable has a name made of known words."""
    vocab = Vocabulary(read_config(DEFAULT_WEIGHTS)["vocabulary"])
    sources = load_new_words()
    assert set(check_new_words(vocab, sources)) == set(sources)  # all new, all sources known
    _, extended = extend_decoder(small_decoder(vocab), vocab, sources)
    for category in MISSING_CATEGORIES:
        names = COCO_SYNONYMS[category]
        assert not any(all(w in vocab.index for w in n.split()) for n in names), category
        assert any(all(w in extended.index for w in n.split()) for n in names), category


@pytest.mark.slow
def test_an_extended_model_folder_captions_as_before_when_new_words_are_never_picked(
    trained_shapes_model, tmp_path
):
    model, vocab, _ = trained_shapes_model
    examples = all_examples()
    pixels = torch.stack([model.encoder.transform(image) for image, _, _ in examples])
    with torch.no_grad():
        features = model.encoder(pixels)
    options = DecodeOptions(beam_size=3)
    before = [r.text for r in caption_features(model.decoder, vocab, features, options)]
    save_model(tmp_path / "base", model, vocab)
    loaded, loaded_vocab, _ = load_model(tmp_path / "base")
    extended_vocab = extend_model(
        loaded, loaded_vocab, {"oval": "circle", "cube": "square"}, bias_offset=-30.0
    )
    save_model(tmp_path / "extended", loaded, extended_vocab)
    extended, again_vocab, _ = load_model(tmp_path / "extended")
    assert again_vocab.words[-2:] == ["oval", "cube"]
    after = [r.text for r in caption_features(extended.decoder, again_vocab, features, options)]
    assert after == before


def test_the_new_words_make_confident_labels_nameable():
    """A photo whose ImageNet classifier is sure of "zebra" (and one sure of "pizza"): the
    shipped vocabulary names only the pizza, the extended one both."""
    from captioner.evaluation.nameable import count_nameable
    from captioner.model.evidence import imagenet_words

    labels = [c.label for c in imagenet_words().classes]
    probabilities = torch.zeros(3, 1000)
    probabilities[0, labels.index("zebra")] = 0.9
    probabilities[1, labels.index("pizza")] = 0.6
    probabilities[2, labels.index("zebra")] = 0.2  # not confident
    vocab = Vocabulary(read_config(DEFAULT_WEIGHTS)["vocabulary"])
    _, extended = extend_decoder(small_decoder(vocab), vocab, load_new_words())
    before, after = count_nameable(probabilities, vocab.words), count_nameable(probabilities, extended.words)
    assert before["confident_labels"] == after["confident_labels"] == 2
    assert (before["nameable"], before["unnameable"]) == (1, {"zebra": 1})
    assert (after["nameable"], after["unnameable"]) == (2, {})
    with pytest.raises(ValueError, match="threshold"):
        count_nameable(probabilities, vocab.words, threshold=0.0)
