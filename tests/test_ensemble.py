"""Ensembles of decoders: they decode exactly like their members' averaged log-probabilities,
load and save like any model, and refuse members that cannot vote together."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from captioner import Captioner, CheckpointError, load_model, save_model
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.decoder import AttentionDecoder
from captioner.model.decoding import BANNED_IDS, beam_search
from captioner.model.ensemble import DecoderEnsemble
from captioner.model.folder import load_ensemble
from captioner.model.options import DecodeOptions
from captioner.model.vocabulary import Vocabulary

from .conftest import TINY
from .shapes import all_examples


def _decoder(seed: int) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(
        12, 32, annotation_dim=16, embed_dim=16, hidden_dim=24, attention_dim=16, dropout=0.0
    ).eval()


def _features(batch: int) -> torch.Tensor:
    return 10 * torch.randn(batch, 9, 32, generator=torch.Generator().manual_seed(4))


def _greedy(decoder, features, max_length):
    """Greedy decoding (beam search with one beam), repeats allowed."""
    options = DecodeOptions(beam_size=1, max_length=max_length, no_repeat_ngram_size=0)
    return [hyps[0] for hyps in beam_search(decoder, features, options)]


def test_an_ensemble_of_one_decoder_twice_decodes_like_the_decoder():
    decoder = _decoder(0)
    twice = DecoderEnsemble([decoder, copy.deepcopy(decoder)]).eval()
    features = _features(5)
    options = DecodeOptions(beam_size=3, max_length=10, no_repeat_ngram_size=0)
    for alone, together in zip(
        beam_search(decoder, features, options), beam_search(twice, features, options), strict=True
    ):
        assert [h.tokens for h in together] == [h.tokens for h in alone]
        assert [h.score for h in together] == pytest.approx([h.score for h in alone], abs=1e-4)
        for a, b in zip(alone, together, strict=True):
            torch.testing.assert_close(b.alphas, a.alphas)


def test_an_ensembles_gate_is_its_members_mean_gate():
    first, second = _decoder(0), _decoder(1)
    ensemble = DecoderEnsemble([first, second]).eval()
    features, words = _features(3), torch.tensor([5, 9, 4])
    gates = []
    with torch.no_grad():
        for decoder in (ensemble, first, second):  # two words, so the states count too
            annotations, keys = decoder.prepare(features)
            state = decoder.init_state(annotations)
            _, state, _, _ = decoder.step(annotations, keys, torch.full((3,), Vocabulary.start_id), state)
            gates.append(decoder.step(annotations, keys, words, state)[3])
    torch.testing.assert_close(gates[0], (gates[1] + gates[2]) / 2)


def test_greedy_ensemble_follows_the_mean_of_its_members_log_probabilities():
    members = [_decoder(0), _decoder(1)]
    features = _features(4)
    ensemble_captions = _greedy(DecoderEnsemble(members).eval(), features, max_length=8)
    # The same decision rule, written out member by member with separate states.
    prepared = [m.prepare(features) for m in members]
    states = [m.init_state(a) for m, (a, _) in zip(members, prepared, strict=True)]
    words = torch.full((4,), Vocabulary.start_id)
    chosen, alphas = [], []
    with torch.no_grad():
        for _ in range(8):
            steps = [m.step(a, k, words, s) for m, (a, k), s in zip(members, prepared, states, strict=True)]
            states = [s for _, s, _, _ in steps]
            mean = torch.stack([torch.log_softmax(logits, -1) for logits, _, _, _ in steps]).mean(0)
            words = mean.index_fill(1, torch.tensor(BANNED_IDS), float("-inf")).argmax(-1)
            chosen.append(words)
            alphas.append((steps[0][2] + steps[1][2]) / 2)
    chosen = torch.stack(chosen, 1).tolist()
    for i, caption in enumerate(ensemble_captions):
        ids = chosen[i]
        expected = ids[: ids.index(Vocabulary.end_id)] if Vocabulary.end_id in ids else ids
        assert caption.tokens == expected
        torch.testing.assert_close(caption.alphas, torch.stack(alphas, 1)[i, : len(expected)])
    # the two members disagree somewhere, so the test is not about one member alone
    alone = [_greedy(m, features, max_length=8) for m in members]
    assert [h.tokens for h in alone[0]] != [h.tokens for h in alone[1]]


@pytest.fixture(scope="module")
def second_shapes_checkpoint(trained_shapes_model, tmp_path_factory):
    """The shapes model with a different (randomly re-initialised) decoder: a second member."""
    model, vocab, _ = trained_shapes_model
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    other.decoder = CaptionModel(model.config, len(vocab), encoder_weights="random").decoder
    return save_model(tmp_path_factory.mktemp("second"), other.eval(), vocab, metadata={"member": "second"})


@pytest.mark.slow
def test_export_writes_an_ensemble_that_loads_and_captions(
    shapes_checkpoint, second_shapes_checkpoint, tmp_path
):
    target = tmp_path / "ensemble"
    subprocess.run(
        [
            sys.executable,
            "scripts/export_model.py",
            str(shapes_checkpoint),
            str(second_shapes_checkpoint),
            str(target),
            "--dtype",
            "float32",
        ],
        check=True,
    )
    model, vocab, config = load_model(target)
    assert isinstance(model.decoder, DecoderEnsemble) and len(model.decoder.members) == 2
    assert [m["path"] for m in config["metadata"]["ensemble_of"]] == [
        str(shapes_checkpoint),
        str(second_shapes_checkpoint),
    ]
    first, _, _ = load_model(shapes_checkpoint)
    for name, tensor in first.decoder.state_dict().items():
        assert torch.equal(model.decoder.members[0].state_dict()[name], tensor), name
    images = [img for img, _, _ in all_examples()[::4]]
    results = Captioner(model, vocab, device="cpu").caption(images, beam_size=3)
    for result in results:
        assert result.words and result.attention.shape == (len(result.words), *model.grid_shape)
        assert result.attention.sum(axis=(1, 2)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_members_that_cannot_vote_together_are_refused(
    shapes_checkpoint, second_shapes_checkpoint, trained_shapes_model, tmp_path
):
    model, vocab, _ = trained_shapes_model
    with pytest.raises(CheckpointError, match="at least 2"):
        load_ensemble([shapes_checkpoint])
    other_vocab = Vocabulary([*vocab.words[:-1], "zebra"])
    renamed = save_model(tmp_path / "vocab", model, other_vocab)
    with pytest.raises(CheckpointError, match=f"{renamed}: its vocabulary differs"):
        load_ensemble([shapes_checkpoint, renamed])
    bigger = CaptionModel(ModelConfig(**{**vars(TINY), "hidden_dim": 64}), len(vocab))
    resized = save_model(tmp_path / "hidden", bigger, vocab)
    with pytest.raises(CheckpointError, match=f"{resized}: model settings"):
        load_ensemble([shapes_checkpoint, resized])
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        next(tuned.encoder.parameters()).add_(0.01)
    fine_tuned = save_model(tmp_path / "tuned", tuned, vocab)
    with pytest.raises(CheckpointError, match=f"{fine_tuned}: its encoder weights differ"):
        load_ensemble([shapes_checkpoint, fine_tuned])
    half = save_model(tmp_path / "half", model, vocab, dtype=torch.float16)  # same encoder, fp16 file
    assert len(load_ensemble([shapes_checkpoint, half])[0].decoder.members) == 2
    pair = save_model(tmp_path / "pair", *load_ensemble([shapes_checkpoint, second_shapes_checkpoint])[:2])
    with pytest.raises(CheckpointError, match=f"{pair} is already an ensemble"):
        load_ensemble([pair, shapes_checkpoint])


def test_an_ensemble_is_stored_beside_the_model_settings_and_old_exports_load(
    shapes_checkpoint, second_shapes_checkpoint, tmp_path
):
    """The ensemble is an inference-time wrapper: `ensemble_size` sits beside the model settings
    (which describe one decoder, as training builds it); folders exported when it was a model
    setting (`model.decoders`) load the same."""
    pair = save_model(tmp_path / "pair", *load_ensemble([shapes_checkpoint, second_shapes_checkpoint])[:2])
    config = json.loads((pair / "config.json").read_text())
    assert config["ensemble_size"] == 2 and "decoders" not in config["model"]
    assert json.loads((shapes_checkpoint / "config.json").read_text())["ensemble_size"] == 1
    old = json.loads(json.dumps(config))
    del old["ensemble_size"]
    old["model"]["decoders"] = 2
    (pair / "config.json").write_text(json.dumps(old))
    model, _, _ = load_model(pair)
    assert isinstance(model.decoder, DecoderEnsemble) and len(model.decoder.members) == 2
    with pytest.raises(NotImplementedError):  # no teacher forcing: an ensemble is never trained
        model.decoder(torch.zeros(1, 16, 1280), torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]))
