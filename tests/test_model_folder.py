"""Model folders: safetensors + JSON round trips, and every kind of broken file is a clear error."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from captioner import Captioner, CheckpointError, load_model, save_model
from captioner.model.caption_model import CaptionModel
from captioner.model.config import ModelConfig
from captioner.model.folder import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE

from .conftest import TINY
from .shapes import all_examples


@pytest.fixture
def folder(shapes_checkpoint, tmp_path):
    """A private copy of the shapes model folder that a test may break."""
    return shutil.copytree(shapes_checkpoint, tmp_path / "model")


def _images():
    return [img for img, _, _ in all_examples()[::3]]


def _edit_config(folder, edit):
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_round_trip_gives_identical_tensors_and_captions(trained_shapes_model, shapes_checkpoint):
    model, vocab, _ = trained_shapes_model
    loaded, loaded_vocab, config = load_model(shapes_checkpoint)
    assert not loaded.training
    assert loaded_vocab.words == vocab.words
    assert config["metadata"] == {"trained_on": "synthetic shapes (tests)"}
    assert config["model"] == vars(model.config)
    original = model.state_dict()
    state = loaded.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name

    before = Captioner(model, vocab, device="cpu").caption(_images(), beam_size=3)
    after = Captioner(loaded, loaded_vocab, device="cpu").caption(_images(), beam_size=3)
    assert [r.text for r in after] == [r.text for r in before]
    for a, b in zip(after, before, strict=True):
        assert a.score == b.score
        assert (a.attention == b.attention).all()
    # the path of the weights file works as well as the folder
    assert load_model(shapes_checkpoint / WEIGHTS_FILE)[1].words == vocab.words


def test_fp16_model_folder(trained_shapes_model, shapes_checkpoint, tmp_path):
    model, vocab, _ = trained_shapes_model
    folder = save_model(tmp_path / "fp16", model, vocab, dtype=torch.float16)
    size16, size32 = (folder / WEIGHTS_FILE).stat().st_size, (shapes_checkpoint / WEIGHTS_FILE).stat().st_size
    assert size16 < 0.6 * size32
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        assert f.get_tensor("decoder.classifier.weight").dtype == torch.float16
    loaded, _, config = load_model(folder)
    assert config["weights_dtype"] == "float16"
    assert loaded.decoder.classifier.weight.dtype == torch.float32  # runs in fp32 on the CPU
    torch.testing.assert_close(
        loaded.decoder.classifier.weight, model.decoder.classifier.weight, atol=1e-3, rtol=1e-3
    )
    results = Captioner(loaded, vocab, device="cpu").caption(_images())
    assert [r.text for r in results] == [caption for _, caption, _ in all_examples()[::3]]
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_saved_files_get_the_usual_permissions(trained_shapes_model, tmp_path):
    """Atomic writes go through mkstemp, whose files are private (0600): a model folder must be
    readable by the web server and the team like any file the user writes (umask applies)."""
    umask = os.umask(0o022)
    os.umask(umask)
    model, vocab, _ = trained_shapes_model
    folder = save_model(tmp_path / "shared", model, vocab)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_model_folder_holds_no_pickle_and_loading_never_unpickles(folder, monkeypatch):
    raw = (folder / WEIGHTS_FILE).read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])  # safetensors: a JSON header, then raw tensors
    assert "decoder.classifier.weight" in header
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[: 8 + header_size]  # no zip, no pickle
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / pickle used while loading a model folder")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    model, vocab, _ = load_model(folder)
    assert len(vocab) == model.decoder.vocab_size


def _assert_error(folder, *fragments):
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_corrupt_weights_file(folder):
    (folder / WEIGHTS_FILE).write_bytes(b"\x00garbage, not tensors" * 100)
    _assert_error(folder, str(folder / WEIGHTS_FILE), "corrupt")


def test_truncated_weights_file(folder):
    path = folder / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_error(folder, str(path))


def test_config_that_is_not_json(folder):
    (folder / CONFIG_FILE).write_text('{"format": "captioner", ')
    _assert_error(folder, str(folder / CONFIG_FILE), "not valid JSON")


def test_json_that_is_not_a_captioner_config(folder):
    (folder / CONFIG_FILE).write_text('["a", "list"]')
    _assert_error(folder, str(folder / CONFIG_FILE), "not a captioner config")


def test_config_whose_dims_do_not_match_the_weights(folder):
    _edit_config(folder, lambda c: c["model"].update(hidden_dim=64))
    message = _assert_error(folder, str(folder / WEIGHTS_FILE), str(folder / CONFIG_FILE), "does not match")
    assert "file (128, 128) vs config (64, 128)" in message  # names the tensor and both shapes


def test_vocabulary_that_does_not_match_the_weights(folder):
    _edit_config(folder, lambda c: c["vocabulary"].append("extra"))
    _assert_error(folder, "decoder.classifier.weight", "does not match")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda c: c["model"].update(colour="blue"), "unknown model settings ['colour']"),
        (lambda c: c["model"].update(backbone="vgg16"), "unknown backbone"),
        (lambda c: c["model"].update(hidden_dim="big"), "hidden_dim"),
        (lambda c: c.pop("model"), "model"),
        (lambda c: c.update(vocabulary=["a", "b"]), "bad vocabulary"),
    ],
)
def test_bad_config_values(folder, edit, fragment):
    _edit_config(folder, edit)
    _assert_error(folder, str(folder / CONFIG_FILE), fragment)


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda c: c.update(ensemble_size=100_000), ["says ensemble_size 100000", "holds 1 decoder(s)"]),
        (
            lambda c: c.pop("ensemble_size") and c["model"].update(decoders=100_000),  # older spelling
            ["says ensemble_size 100000"],
        ),
        (lambda c: c["model"].update(hidden_dim=1_000_000), ["does not match", "vs config (1000000, "]),
        (
            lambda c: c.update(vocabulary=c["vocabulary"] + [f"w{i}" for i in range(200_000)]),
            ["decoder.classifier.weight", "does not match"],
        ),
        (lambda c: c.update(ensemble_size="2"), ["ensemble_size must be a whole number >= 1, got '2'"]),
        (lambda c: c.update(ensemble_size=0), ["ensemble_size must be a whole number >= 1, got 0"]),
    ],
)
def test_absurd_sizes_are_refused_from_the_weights_header_before_anything_is_built(
    folder, monkeypatch, edit, fragments
):
    """config.json is checked against the safetensors header (names and shapes) first: a
    config saying 100000 decoders built decoders until memory ran out (4.8 GB in 23 s)."""

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("captioner.model.folder.CaptionModel", never)
    _edit_config(folder, edit)
    _assert_error(folder, str(folder / CONFIG_FILE), *fragments)


@pytest.mark.parametrize("entry, shown", [(5, "5"), (None, "None"), ({"w": 1}, "{'w': 1}")])
def test_vocabulary_entries_that_are_not_words_are_refused_at_load(folder, entry, shown):
    """Such a config loaded, then every caption() failed with a TypeError."""
    _edit_config(folder, lambda c: c["vocabulary"].__setitem__(6, entry))
    for load in (load_model, Captioner.from_pretrained):
        with pytest.raises(CheckpointError, match=rf"bad vocabulary \(vocabulary entry 6 is {shown}"):
            load(folder)


def test_wrong_format_version(folder):
    _edit_config(folder, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    _assert_error(folder, str(folder / CONFIG_FILE), f"format version {FORMAT_VERSION + 1}")


def test_missing_files(folder, tmp_path):
    _assert_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")
    (folder / WEIGHTS_FILE).unlink()
    _assert_error(folder, str(folder / WEIGHTS_FILE), "missing")
    (folder / CONFIG_FILE).unlink()
    _assert_error(folder, str(folder / CONFIG_FILE), "missing")


def test_ablation_model_round_trip_and_older_configs_load_gated(shapes_vocab, folder, tmp_path):
    """The ablation switches live in the saved config; configs written before they existed
    (no `gate` key) load as the gated model they were."""
    torch.manual_seed(0)
    config = ModelConfig(**{**vars(TINY), "gate": False, "annotation_dim": None})
    model = CaptionModel(config, len(shapes_vocab), encoder_weights="random").eval()
    loaded, _, saved = load_model(save_model(tmp_path / "ablation", model, shapes_vocab))
    assert saved["model"]["gate"] is False and saved["model"]["annotation_dim"] is None
    assert loaded.decoder.f_beta is None
    images = _images()
    before = Captioner(model, shapes_vocab, device="cpu").caption(images, beam_size=2)
    after = Captioner(loaded, shapes_vocab, device="cpu").caption(images, beam_size=2)
    assert [r.text for r in after] == [r.text for r in before]

    _edit_config(folder, lambda c: c["model"].pop("gate"))
    assert load_model(folder)[0].decoder.f_beta is not None
