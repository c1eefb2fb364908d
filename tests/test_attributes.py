"""Semantic attributes (issue #37 2c): the ImageNet evidence added to the decoder's annotations,
and the fine-tuning that teaches the decoder to read it."""

import json

import pytest
import torch
from PIL import Image

from captioner import CaptionModel, ModelConfig, Vocabulary, load_model, save_model
from captioner.model.decoder import AttentionDecoder, attribute_input
from captioner.model.decoding import beam_search
from captioner.model.ensemble import DecoderEnsemble
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.training.attributes import (
    AttributeCache,
    AttributeConfig,
    fine_tune_attributes,
    write_attribute_cache,
)
from captioner.training.run_state import STATE_FILE, read_progress

from .conftest import TINY

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "runs", "sits"]


def tiny_decoder(attributes: bool, seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(
        len(WORDS), 20, 16, 12, 24, 10, dropout=0.0, semantic_attributes=attributes
    ).eval()


def probabilities(batch: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.softmax(3 * torch.randn(batch, 1000), dim=1)


def test_zero_initialised_attributes_caption_exactly_as_without():
    plain, with_attributes = tiny_decoder(False), tiny_decoder(False)
    with_attributes = tiny_decoder(True)
    with_attributes.load_state_dict(plain.state_dict(), strict=False)  # attribute_proj stays zero
    features, options = torch.randn(3, 9, 20), DecodeOptions(beam_size=3, max_length=8)
    expected = beam_search(plain, features, options)
    found = beam_search(with_attributes, features, options, attributes=probabilities(3))
    assert [[h.tokens for h in beams] for beams in found] == [[h.tokens for h in beams] for beams in expected]


def test_prepare_adds_the_projected_attributes_to_every_cell():
    decoder = tiny_decoder(True)
    torch.nn.init.normal_(decoder.attribute_proj.weight)
    features, attributes = torch.randn(2, 9, 20), probabilities(2)
    annotations, _ = decoder.prepare(features, attributes)
    added = annotations - decoder.feature_proj(features)  # (B, L, A)
    expected = decoder.attribute_proj(attribute_input(attributes))  # (B, A)
    torch.testing.assert_close(added, expected[:, None, :].expand_as(added))
    assert not torch.allclose(added[0, 0], added[1, 0])  # each image its own attributes


def test_beam_search_with_attributes_ends_with_end():
    decoder = tiny_decoder(True)
    torch.nn.init.normal_(decoder.attribute_proj.weight)
    with torch.no_grad():
        decoder.classifier.bias[2] = 4.0  # <end> likely: the captions finish
    beams = beam_search(
        decoder, torch.randn(2, 9, 20), DecodeOptions(beam_size=3), attributes=probabilities(2)
    )
    assert all(beams_of_image[0].finished for beams_of_image in beams)


def test_attributes_missing_or_unexpected_are_clear_errors():
    features = torch.randn(2, 9, 20)
    with pytest.raises(ValueError, match="reads semantic attributes"):
        tiny_decoder(True).prepare(features)
    with pytest.raises(ValueError, match="has no semantic attributes"):
        tiny_decoder(False).prepare(features, probabilities(2))
    with pytest.raises(ValueError, match=r"attributes must be \(B=2, 1000\)"):
        tiny_decoder(True).prepare(features, probabilities(3))
    vocab = Vocabulary(WORDS)
    with pytest.raises(ValueError, match="reads semantic attributes"):
        caption_features(tiny_decoder(True), vocab, torch.randn(1, 9, 20), DecodeOptions())


def test_ensemble_passes_attributes_to_every_member():
    members = [tiny_decoder(True, seed) for seed in (0, 1)]
    for member in members:
        torch.nn.init.normal_(member.attribute_proj.weight)
    ensemble = DecoderEnsemble(members)
    features, attributes = torch.randn(2, 9, 20), probabilities(2)
    annotations, _ = ensemble.prepare(features, attributes)
    torch.testing.assert_close(annotations[:, 1], members[1].prepare(features, attributes)[0])
    assert ensemble.reads_attributes
    beams = beam_search(ensemble, features, DecodeOptions(beam_size=2, max_length=5), attributes=attributes)
    assert len(beams) == 2


def test_model_folder_keeps_the_option(tmp_path):
    config = ModelConfig(**{**vars(TINY), "semantic_attributes": True})
    model = CaptionModel(config, len(WORDS), encoder_weights="random")
    torch.nn.init.normal_(model.decoder.attribute_proj.weight)
    save_model(tmp_path, model, Vocabulary(WORDS))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["semantic_attributes"] is True
    loaded, _, _ = load_model(tmp_path)
    assert loaded.config.semantic_attributes
    torch.testing.assert_close(loaded.decoder.attribute_proj.weight, model.decoder.attribute_proj.weight)


def test_old_folders_load_without_the_option(tmp_path):
    model = CaptionModel(ModelConfig(**vars(TINY)), len(WORDS), encoder_weights="random")
    save_model(tmp_path, model, Vocabulary(WORDS))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["semantic_attributes"]  # written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded, _, _ = load_model(tmp_path)
    assert not loaded.config.semantic_attributes and loaded.decoder.attribute_proj is None


# ----------------------------------------------------------------------------- fine-tuning


def synthetic_run(tmp_path):
    """A tiny model folder, a Flickr8k-layout folder of 6 photos and attribute caches of them."""
    vocab = Vocabulary(WORDS)
    model = CaptionModel(ModelConfig(**vars(TINY)), len(WORDS), encoder_weights="random")
    save_model(tmp_path / "init", model, vocab, metadata={"train_config": {"fine_tune_from": 7}})
    flickr = tmp_path / "flickr"
    (flickr / "images").mkdir(parents=True)
    names = [f"{i}.jpg" for i in range(6)]
    lines = []
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8)).save(flickr / "images" / name)
        animal, verb = ("dog", "runs") if i % 2 else ("cat", "sits")
        lines += [f"{name}#{k}\ta {animal} {verb}" for k in range(5)]
    (flickr / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (flickr / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:4]) + "\n")
    (flickr / "Flickr_8k.devImages.txt").write_text("\n".join(names[4:]) + "\n")
    cells, dim = 16, model.encoder.feature_dim

    def encode(paths):
        torch.manual_seed(len(str(paths[0])))
        return torch.randn(len(paths), cells, dim), probabilities(len(paths))

    paths = [flickr / "images" / n for n in names]
    write_attribute_cache(tmp_path / "train", paths[:4], encode, (cells, dim), batch_size=3)
    write_attribute_cache(tmp_path / "dev", paths[4:], encode, (cells, dim))
    return AttributeConfig(
        init_from=str(tmp_path / "init"),
        train_cache=str(tmp_path / "train"),
        dev_cache=str(tmp_path / "dev"),
        flickr=str(flickr),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=2,
        lr=1e-2,
        checkpoint_every=1,
        val_beam_size=1,
    )


def test_cache_resumes_and_refuses_another_photo_list(tmp_path):
    calls = []

    def encode(paths):
        calls.append(len(paths))
        return torch.ones(len(paths), 4, 3), torch.full((len(paths), 1000), 0.001)

    paths = [tmp_path / f"{i}.jpg" for i in range(5)]
    write_attribute_cache(tmp_path / "cache", paths, encode, (4, 3), batch_size=2)
    cache = AttributeCache(tmp_path / "cache")
    cache.check_complete()
    assert calls == [2, 2, 1] and cache.rows([4])[0].shape == (1, 4, 3)
    write_attribute_cache(tmp_path / "cache", paths, encode, (4, 3))  # all done: nothing to encode
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError, match="another list of photos"):
        write_attribute_cache(tmp_path / "cache", paths[:2], encode, (4, 3))


@pytest.mark.slow
def test_fine_tuning_checkpoints_and_resumes(tmp_path):
    cfg = synthetic_run(tmp_path)
    cfg.stop_after_step = 1
    assert fine_tune_attributes(cfg) == {"stopped_at_step": 1}
    state = tmp_path / "run" / STATE_FILE
    assert read_progress(state).global_step == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic: no half-written files left
    cfg.stop_after_step = None
    result = fine_tune_attributes(cfg)  # resumes at step 2 of 2
    assert result["best_epoch"] == "epoch1" and read_progress(state).global_step == 2
    best, _, config = load_model(tmp_path / "run" / "best")
    assert best.config.semantic_attributes and config["metadata"]["train_config"] == {"fine_tune_from": 7}
    assert best.decoder.attribute_proj.weight.abs().sum() > 0  # the attributes were trained


def test_captioner_train_refuses_semantic_attributes():
    from captioner.training.config import TrainConfig
    from captioner.training.loop import check_config

    cfg = TrainConfig(model=ModelConfig(semantic_attributes=True))
    with pytest.raises(ValueError, match="scripts/train_attributes.py"):
        check_config(cfg)
