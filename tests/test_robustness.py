"""What a hostile or careless user feeds in: every case ends in a clear error naming the input
and its allowed range, or is handled (tensors, tiny images), never in a crash deep inside torch."""

import math

import numpy as np
import pytest
import torch
from gradio import Error as GradioError
from PIL import Image

from captioner import Captioner, CheckpointError, load_model, save_model
from captioner.cli.main import caption_folder_main
from captioner.data.images import ImageLoadError
from captioner.serving import webapp
from captioner.serving.settings import BatchSettings

from .shapes import shape_image


@pytest.fixture(scope="module")
def captioner(shapes_checkpoint):
    return Captioner.from_pretrained(shapes_checkpoint, device="cpu")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"beam_size": 2.5}, "beam_size must be a whole number >= 1, got 2.5"),
        ({"beam_size": 0}, "beam_size must be a whole number >= 1, got 0"),
        ({"beam_size": -1}, "beam_size must be a whole number >= 1, got -1"),
        ({"beam_size": True}, "beam_size must be a whole number >= 1, got True"),
        ({"max_length": 0}, "max_length must be a whole number >= 1, got 0"),
        ({"n_best": 4, "beam_size": 3}, "n_best must be a whole number from 1 to 3, got 4"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be a whole number >= 0, got -2"),
        ({"length_penalty": math.nan}, "length_penalty must be a finite number, got nan"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
    ],
)
def test_decoding_options_out_of_range_are_refused_by_name(captioner, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        captioner.caption(shape_image("red", "circle", "left"), **options)


def test_numpy_integers_are_whole_numbers(captioner):
    image = shape_image("red", "circle", "left")
    assert captioner.caption(image, beam_size=np.int64(2), max_length=np.int32(8)).words


def test_a_torch_tensor_captions_like_the_same_array(captioner):
    array = np.array(shape_image("blue", "square", "right"))
    expected = captioner.caption(array).text
    assert captioner.caption(torch.from_numpy(array)).text == expected  # (H, W, 3) uint8
    assert captioner.caption(torch.from_numpy(array).permute(2, 0, 1)).text == expected  # (3, H, W)


def test_a_tiny_image_gets_a_caption_with_a_note(captioner):
    tiny = captioner.caption(Image.new("RGB", (1, 1), "red"))
    assert tiny.words and tiny.notes
    assert "only 1x1 pixels" in tiny.notes[0]
    assert captioner.caption(shape_image("red", "circle", "left")).notes == []


def test_a_checkpoint_with_nan_or_infinite_weights_is_refused(trained_shapes_model, tmp_path):
    model, vocab, _ = trained_shapes_model
    broken = save_model(tmp_path / "diverged", model, vocab)
    state = model.state_dict()
    from safetensors.torch import save_file

    tensors = {k: v.clone().contiguous() for k, v in state.items()}
    tensors["decoder.classifier.weight"][0, 0] = math.nan
    tensors["decoder.lstm.bias_hh"][3] = math.inf
    save_file(tensors, str(broken / "model.safetensors"))
    for load in (load_model, Captioner.from_pretrained):
        with pytest.raises(
            CheckpointError,
            match=r"2 tensors hold NaN or infinite values .*"
            r"decoder.classifier.weight.*decoder.lstm.bias_hh",
        ):
            load(broken)


@pytest.mark.parametrize(
    "beam, length, opacity, message",
    [
        (3, 20, 50, "opacity must be a number from 0 to 1, got 50"),
        (3, 20, -1, "opacity must be a number from 0 to 1, got -1"),
        (3, 0, 0.6, "maximum length must be a whole number from 1 to 50, got 0"),
        (2.5, 20, 0.6, "beam size must be a whole number from 1 to 10, got 2.5"),
        (11, 20, 0.6, "beam size must be a whole number from 1 to 10, got 11"),
    ],
)
def test_the_app_refuses_arguments_out_of_range(captioner, tmp_path, beam, length, opacity, message):
    path = tmp_path / "photo.png"
    shape_image("red", "circle", "left").save(path)
    with pytest.raises(GradioError, match=message):
        webapp.caption_upload(captioner, {"path": str(path)}, beam, length, opacity)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beam-size", "2.5"], "--beam-size: invalid"),
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be a whole number >= 0, got -1"),
        (["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
        (["--shard", "2/2"], "--shard '2/2': need 0 <= K < N"),
        (["--shard", "half"], "--shard 'half': expected K/N"),
    ],
)
def test_the_caption_command_refuses_arguments_out_of_range(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        caption_folder_main([str(tmp_path), "-o", str(tmp_path / "out.jsonl"), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 33: focus and tensors


LEFT = (0, 0, 112, 224)


@pytest.mark.parametrize("strength", [3.5e38, 1e39, math.inf, -1.0, "2"])
def test_a_focus_strength_out_of_range_is_refused_by_name(captioner, strength):
    """Issue 33.9: 3.5e38 overflowed float32 deep in decoding (IndexError) and ended batch runs."""
    with pytest.raises(ValueError, match="focus_strength must be a number from 0 to 10000"):
        captioner.caption(shape_image("red", "circle", "left"), focus=LEFT, focus_strength=strength)
    with pytest.raises(ValueError, match="focus_strength must be a number from 0 to 10000"):
        BatchSettings(focus_strength=strength)


def test_the_largest_focus_strength_still_captions(captioner):
    result = captioner.caption(shape_image("red", "circle", "left"), focus=LEFT, focus_strength=1e4)
    assert result.words and math.isfinite(result.score) and np.isfinite(result.attention).all()


def test_the_caption_command_refuses_a_huge_focus_strength(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        caption_folder_main([str(tmp_path), "-o", str(tmp_path / "out.jsonl"), "--focus-strength", "1e39"])
    assert exit_.value.code == 2
    assert "--focus-strength must be a number from 0 to 10000, got 1e+39" in capsys.readouterr().err


def test_numpy_and_torch_scalars_and_arrays_are_focus_strengths_and_boxes(captioner):
    """Issue 33.20: what numpy code and detectors hand over."""
    image = shape_image("red", "circle", "left")
    expected = captioner.caption(image, focus=LEFT, focus_strength=2.0)
    for strength in (np.float32(2), np.float64(2), torch.tensor(2.0), np.int64(2)):
        assert captioner.caption(image, focus=LEFT, focus_strength=strength).score == expected.score
    for box in (np.array([0, 0, 112, 224.0]), torch.tensor([0, 0, 112, 224]), [np.int64(0), 0, 112, 224]):
        assert captioner.caption(image, focus=box).score == expected.score


@pytest.mark.parametrize(
    "focus, message",
    [
        ([[True] * 300] * 200, r"boolean array of the image's size \(224, 224\), got bool \(200, 300\)"),
        ("0099", "focus box must be four numbers"),
        ([[1, 2], [3]], "focus mask rows differ in length"),
        (np.zeros(5), "focus box must be four numbers"),
    ],
)
def test_a_wrong_focus_gives_a_short_error(captioner, focus, message):
    with pytest.raises(ValueError, match=message) as err:
        captioner.caption(shape_image("red", "circle", "left"), focus=focus)
    assert len(str(err.value)) < 200


def test_a_normalised_tensor_is_refused_not_clipped(captioner):
    """Issue 33.24: a (3, H, W) tensor in -1..1 was silently clipped and captioned differently."""
    pixels = torch.from_numpy(np.array(shape_image("red", "circle", "left"))).permute(2, 0, 1) / 255.0
    assert captioner.caption(pixels).words  # 0..1 is a picture
    with pytest.raises(ImageLoadError, match=r"torch tensor \(3, 224, 224\) float32: has negative values"):
        captioner.caption(pixels * 2 - 1)
