"""The network: encoder grids and weights, attention, teacher forcing, the loss, the vocabulary."""

import importlib
import json
import urllib.error

import pytest
import torch
from PIL import Image
from skimage import data

from captioner import CaptionModel, ModelConfig, Vocabulary
from captioner.model.attention import AdditiveAttention, MultiplicativeAttention, build_attention
from captioner.model.decoder import AttentionDecoder
from captioner.model.encoder import BACKBONES, Encoder, EncoderWeightsError, build_transform
from captioner.model.vocabulary import SPECIAL_TOKENS, tokenize
from captioner.training.losses import caption_loss

from .conftest import TINY
from .shapes import all_examples, train_decoder

# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("image_size, grid", [(224, 7), (448, 14)])
def test_lite0_grid_follows_image_size(image_size, grid):
    encoder = Encoder("efficientnet_lite0", image_size).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, image_size, image_size))
    assert encoder.grid_size == grid
    assert out.shape == (2, grid * grid, 1280)


def test_grid_size_pools_the_feature_map():
    encoder = Encoder("efficientnet_lite0", 224, grid_size=4).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = encoder(x)
        fmap = encoder.feature_map(x)
    assert out.shape == (1, 16, 1280)
    # cell (0, 0) of a 7 -> 4 adaptive pool averages rows/cols 0..1
    torch.testing.assert_close(out[0, 0], fmap[0, :, :2, :2].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="finer than"):
        Encoder("efficientnet_lite0", 224, grid_size=8, weights="random")


def test_resnet50_random_weights_on_request():
    encoder = Encoder("resnet50", 224, weights="random").eval()
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 49, 2048)


def test_resnet50_imagenet_offline_is_a_clear_error(monkeypatch, tmp_path):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached download either
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", no_network)
    with pytest.raises(EncoderWeightsError, match="could not download ImageNet weights for resnet50"):
        Encoder("resnet50", 224)  # "imagenet" is the default: never silently random


def test_unknown_backbone_and_bad_weights_file(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        Encoder("vgg16")
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        Encoder("efficientnet_lite0", weights=tmp_path / "nope.pth")


@pytest.mark.parametrize("backbone, image_size", [("efficientnet_lite0", 224), ("efficientnet_lite2", 260)])
def test_offline_imagenet_weights_recognise_an_espresso(backbone, image_size):
    """The package's tensors are paired with timm's by position: with a wrong pairing, the
    encoder's pooled features under the package's own ImageNet classifier would not recognise an
    espresso (class 967) in skimage's coffee photo. Lite2 at 260 px is the shipped model's encoder."""
    encoder = Encoder(backbone, image_size)  # weights="imagenet": from the PyPI package
    package = importlib.import_module(BACKBONES[backbone].offline_package)
    model_file = next(v for k, v in vars(package).items() if k.endswith("ModelFile"))
    shipped = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    pixels = build_transform(backbone, image_size)(Image.fromarray(data.coffee()))
    with torch.no_grad():
        pooled = encoder(pixels.unsqueeze(0)).mean(dim=1)  # (1, D): the global average pool
        probs = torch.nn.functional.linear(pooled, shipped["_fc.weight"], shipped["_fc.bias"]).softmax(-1)[0]
    assert int(probs.argmax()) == 967
    assert float(probs[967]) > 0.5


def test_set_trainable_trains_the_last_stages_with_imagenet_batch_norm_statistics():
    encoder = Encoder("efficientnet_lite0", 128)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen by default
    encoder.train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))

    encoder.set_trainable(5)
    encoder.train()
    assert encoder.training
    for i, stage in enumerate(encoder.stages):
        grads = {p.requires_grad for p in stage.parameters()}
        bn_modes = {m.training for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert grads == {i >= 5}, f"stage {i}"
        assert bn_modes == {False}, f"stage {i}"  # tuned stages too: batch statistics stay ImageNet's

    batch_norms = [encoder.stages[0][1], encoder.stages[-1][1]]  # a frozen and a tuned one
    stats = [bn.running_mean.clone() for bn in batch_norms]
    encoder(torch.randn(2, 3, 128, 128)).sum().backward()
    for bn, before in zip(batch_norms, stats, strict=True):
        torch.testing.assert_close(bn.running_mean, before)  # eval-mode BN does not update
    assert encoder.stages[-1][1].weight.grad is not None  # but its affine weights learn
    encoder.eval()
    assert not any(m.training for m in encoder.modules())
    with pytest.raises(ValueError, match="fine_tune_from 9: efficientnet_lite0 has stages 0 to 8"):
        encoder.set_trainable(len(encoder.stages))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
@torch.no_grad()
def test_attention_weights_are_a_distribution(kind):
    torch.manual_seed(0)
    attention = build_attention(kind, feature_dim=16, hidden_dim=8, attention_dim=12)
    features, hidden = torch.randn(3, 10, 16), torch.randn(3, 8)
    context, alpha = attention(features, hidden)
    assert context.shape == (3, 16) and alpha.shape == (3, 10)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    torch.testing.assert_close(context, torch.einsum("bl,bld->bd", alpha, features))
    # precomputed keys (the decoder's per-image work) give the same result
    _, alpha_keys = attention(features, hidden, keys=attention.prepare(features))
    torch.testing.assert_close(alpha_keys, alpha)


@torch.no_grad()
def test_additive_attention_is_xu_et_als_formula():
    torch.manual_seed(0)
    attention = build_attention("additive", feature_dim=16, hidden_dim=8, attention_dim=12)
    features, hidden = torch.randn(2, 10, 16), torch.randn(6, 8)  # 3 rows for each image
    _, alpha = attention(features, hidden)
    p = dict(attention.named_parameters())
    keys = features @ p["feature_proj.weight"].T + p["feature_proj.bias"]  # (2, 10, 12)
    query = hidden @ p["hidden_proj.weight"].T + p["hidden_proj.bias"]  # (6, 12)
    energy = torch.tanh(keys.repeat_interleave(3, dim=0) + query[:, None])  # (6, 10, 12)
    expected = torch.softmax(energy @ p["score.weight"][0] + p["score.bias"], dim=-1)
    torch.testing.assert_close(alpha, expected)


def test_attention_types():
    assert isinstance(build_attention("additive", 4, 4, 4), AdditiveAttention)
    assert isinstance(build_attention("multiplicative", 4, 4, 4), MultiplicativeAttention)
    with pytest.raises(ValueError, match="unknown attention type"):
        build_attention("dot", 4, 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
def test_both_attention_types_learn_the_shapes(kind, shapes_vocab):
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**{**vars(TINY), "attention": kind}), len(shapes_vocab))
    losses = train_decoder(model, shapes_vocab, all_examples(), steps=40)
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


# ----------------------------------------------------------------------------- decoder


def _random_decoder(vocab_size=15, feature_dim=20, **kwargs):
    torch.manual_seed(0)
    kwargs = {
        "annotation_dim": 16,
        "embed_dim": 12,
        "hidden_dim": 24,
        "attention_dim": 10,
        "dropout": 0.0,
        **kwargs,
    }
    return AttentionDecoder(vocab_size, feature_dim, **kwargs).eval()


def _padded(captions):
    lengths = torch.tensor([len(c) for c in captions])
    padded = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(captions):
        padded[i, : len(c)] = torch.tensor(c)
    return padded, lengths


@pytest.mark.parametrize("kind", ["additive", "multiplicative"])
def test_teacher_forcing_with_variable_lengths_equals_one_caption_at_a_time(kind):
    decoder = _random_decoder(attention=kind)
    features = torch.randn(4, 9, 20)
    captions, lengths = _padded([[1, 5, 6, 7, 2], [1, 8, 2], [1, 4, 4, 5, 6, 9, 2], [1, 2]])
    logits, alphas = decoder(features, captions, lengths)
    assert logits.shape == (4, 6, 15) and alphas.shape == (4, 6, 9)
    for i, n in enumerate((lengths - 1).tolist()):
        assert (logits[i, n:] == 0).all() and (alphas[i, n:] == 0).all()
        torch.testing.assert_close(alphas[i, :n].sum(-1), torch.ones(n))
        alone = decoder(features[i : i + 1], captions[i : i + 1, : n + 1], lengths[i : i + 1])
        alone_logits, alone_alphas = alone
        torch.testing.assert_close(logits[i, :n], alone_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alphas[i, :n], alone_alphas[0], atol=1e-5, rtol=1e-5)


def test_teacher_forcing_image_index_shares_features_between_captions():
    decoder = _random_decoder()
    features = torch.randn(2, 9, 20)
    captions, lengths = _padded([[1, 5, 2], [1, 6, 7, 2], [1, 8, 9, 10, 2]])
    image_index = torch.tensor([1, 0, 1])
    shared = decoder(features, captions, lengths, image_index=image_index)
    repeated = decoder(features[image_index], captions, lengths)
    for a, b in zip(shared, repeated, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "hard"])
@pytest.mark.parametrize("with_focus", [False, True])
@torch.no_grad()
def test_a_step_reads_each_images_grid_once_for_its_rows(kind, with_focus):
    """Beam search's beams share their image's grid: a step given each grid once and W rows per
    image gives what it gives with the grid repeated for every row."""
    decoder = _random_decoder(attention=kind)
    annotations, keys = decoder.prepare(torch.randn(2, 9, 20))
    rows = torch.tensor([0, 0, 0, 1, 1, 1])  # three rows (beams) of each image, consecutive
    torch.manual_seed(1)
    state = (torch.randn(6, 24), torch.randn(6, 24))
    words, focus = torch.tensor([1, 5, 7, 1, 8, 9]), torch.randn(6, 9) if with_focus else None
    once = decoder.step(annotations, keys, words, state, focus)
    repeated = decoder.step(annotations[rows], keys[rows], words, state, focus)
    for a, b in zip(once, repeated, strict=True):
        for x, y in zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]:
            assert x.shape == y.shape and x.shape[0] == 6
            torch.testing.assert_close(x, y)


@pytest.mark.slow
def test_plain_output_layer_predicts_from_the_hidden_state_and_learns(shapes_vocab):
    decoder = _random_decoder(deep_output=False)
    assert not hasattr(decoder, "out_hidden") and decoder.classifier.in_features == 24
    annotations, keys = decoder.prepare(torch.randn(2, 9, 20))
    state = decoder.init_state(annotations)
    logits, (h, _), _, _ = decoder.step(annotations, keys, torch.tensor([1, 1]), state)
    torch.testing.assert_close(logits, decoder.classifier(h))
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**{**vars(TINY), "deep_output": False}), len(shapes_vocab))
    losses = train_decoder(model, shapes_vocab, all_examples(), steps=40)
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


@pytest.mark.slow
def test_ungated_unprojected_decoder_attends_over_backbone_vectors_and_learns(shapes_vocab):
    """The two ablations: no gating scalar beta, and attention over the raw backbone vectors."""
    decoder = _random_decoder(gate=False, annotation_dim=None)
    assert decoder.f_beta is None and isinstance(decoder.feature_proj, torch.nn.Identity)
    features = torch.randn(2, 9, 20)
    annotations, keys = decoder.prepare(features)
    torch.testing.assert_close(annotations, features)
    state = decoder.init_state(annotations)
    context, _ = decoder.attention(annotations, state[0], keys=keys)
    expected = decoder.lstm(torch.cat([decoder.embedding(torch.tensor([1, 1])), context], dim=1), state)
    _, (h, c), _, _ = decoder.step(annotations, keys, torch.tensor([1, 1]), state)
    torch.testing.assert_close(h, expected[0])  # the context enters the LSTM unscaled
    torch.manual_seed(0)
    config = ModelConfig(**{**vars(TINY), "gate": False, "annotation_dim": None})
    model = CaptionModel(config, len(shapes_vocab))
    losses = train_decoder(model, shapes_vocab, all_examples(), steps=40)
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


def test_input_dropout_acts_in_training_only():
    """Dropout on words and annotations regularises training and leaves inference unchanged."""
    plain, dropped = _random_decoder(), _random_decoder(input_dropout=0.5)  # the same weights
    features = torch.randn(2, 9, 20)
    captions, lengths = _padded([[1, 5, 6, 2], [1, 7, 2]])
    first, second = dropped.train()(features, captions, lengths)[0], dropped(features, captions, lengths)[0]
    assert not torch.allclose(first, second)
    dropped.eval()
    torch.testing.assert_close(dropped(features, captions, lengths), plain(features, captions, lengths))


def test_model_forward_from_pixels():
    model = CaptionModel(ModelConfig(**vars(TINY)), 12, encoder_weights="random").eval()
    captions, lengths = _padded([[1, 5, 6, 2], [1, 7, 2]])
    logits, alphas = model(torch.randn(2, 3, 128, 128), captions, lengths)
    assert logits.shape == (2, 3, 12) and alphas.shape == (2, 3, 16)
    assert model.grid_shape == (4, 4) and model.config.grid_size == 4


# ----------------------------------------------------------------------------- loss


def test_caption_loss_is_token_cross_entropy_plus_doubly_stochastic_term():
    torch.manual_seed(0)
    captions, lengths = _padded([[1, 5, 6, 2], [1, 7, 2]])
    logits = torch.randn(2, 3, 9)
    logits[1, 2] = 1e6  # past the end of caption 1: must be ignored
    num_cells = 3
    alphas = torch.zeros(2, 3, num_cells)
    alphas[0] = torch.eye(3)  # every cell gets total attention 1: no penalty
    alphas[1, :2] = 1.0 / num_cells  # 2 steps of uniform attention: each cell gets 2/3

    loss, parts = caption_loss(logits, captions, alphas, alpha_reg=0.0)
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, 2), (1, 0, 7), (1, 1, 2)]
    expected = torch.stack([-logits[b, t].log_softmax(-1)[w] for b, t, w in targets]).mean()
    torch.testing.assert_close(loss, expected)
    assert parts["xent"] == pytest.approx(float(expected))
    assert parts["attention_reg"] == pytest.approx((0.0 + (1 - 2 / 3) ** 2) / 2)

    loss_reg, _ = caption_loss(logits, captions, alphas, alpha_reg=2.0)
    torch.testing.assert_close(loss_reg, expected + 2.0 * (1 - 2 / 3) ** 2 / 2)
    # explicit global counts equal to the local ones change nothing
    same, _ = caption_loss(logits, captions, alphas, alpha_reg=2.0, token_count=5.0, caption_count=2)
    torch.testing.assert_close(same, loss_reg)


def test_caption_loss_label_smoothing_and_gradient():
    torch.manual_seed(0)
    captions, _ = _padded([[1, 5, 6, 2]])
    logits = torch.randn(1, 3, 9, requires_grad=True)
    alphas = torch.full((1, 3, 4), 0.25, requires_grad=True)
    plain, _ = caption_loss(logits, captions, alphas)
    smoothed, _ = caption_loss(logits, captions, alphas, label_smoothing=0.1)
    assert smoothed.item() != pytest.approx(plain.item())
    plain.backward()
    assert logits.grad.abs().sum() > 0 and alphas.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- vocabulary


def test_tokenizer_lowercases_and_drops_punctuation_offline():
    assert tokenize("A Man, riding a HORSE!  (on the beach).") == [
        "a",
        "man",
        "riding",
        "a",
        "horse",
        "on",
        "the",
        "beach",
    ]
    assert tokenize("Two dogs' toys; a well-known dog's bone: 3 of them...") == [
        "two",
        "dogs",
        "toys",
        "a",
        "well-known",
        "dog's",
        "bone",
        "3",
        "of",
        "them",
    ]
    assert tokenize("") == [] and tokenize("?!.") == []


def test_vocabulary_build_min_count_and_special_tokens():
    captions = ["A dog runs.", "a DOG sits", "A cat sits", "a bird"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == [*SPECIAL_TOKENS, "a", "dog", "sits"]  # most frequent first, ties a-z
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    assert [vocab.words[i] for i in range(4)] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert len(Vocabulary.build(captions, min_count=1)) == 4 + 6
    assert len(Vocabulary.build(captions, min_count=10)) == 4
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "<pad>", "<start>", "<end>", "<unk>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([*SPECIAL_TOKENS, "a", "a"])


def test_vocabulary_encode_decode_and_json_round_trip():
    vocab = Vocabulary.build(["a red circle on the left", "a blue square"], min_count=1)
    ids = vocab.encode("A red SQUARE, on the right!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == ["a", "red", "square", "on", "the", "<unk>"]
    a, red = vocab.index["a"], vocab.index["red"]
    assert vocab.decode([vocab.start_id, a, vocab.pad_id, vocab.end_id, red]) == ["a"]
    assert vocab.decode(torch.tensor(ids)) == vocab.decode(ids)

    saved = json.dumps(vocab.to_json())  # as config.json and the run state hold it
    assert json.loads(saved) == vocab.words
    loaded = Vocabulary(json.loads(saved))
    assert loaded.words == vocab.words and loaded.encode("a blue circle") == vocab.encode("a blue circle")
