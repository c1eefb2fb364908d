"""The Python API: Captioner.from_pretrained(...).caption(images)."""

import numpy as np
import pytest
import torch

from captioner import Alternative, Captioner, CaptionResult, DecodeOptions, ImageLoadError, ModelNotFoundError

from .shapes import all_examples

EXAMPLES = all_examples()


@pytest.fixture(scope="module")
def captioner(shapes_checkpoint):
    return Captioner.from_pretrained(shapes_checkpoint, device="cpu")


def test_from_pretrained_path_types_and_device(shapes_checkpoint):
    for path in (shapes_checkpoint, str(shapes_checkpoint), shapes_checkpoint / "model.safetensors"):
        captioner = Captioner.from_pretrained(path, device="cpu")
        assert captioner.device == torch.device("cpu")
        assert all(p.device.type == "cpu" for p in captioner.model.parameters())
        assert not captioner.model.training
        assert captioner.grid_shape == (4, 4)


def test_one_image_gives_one_result(captioner):
    image, caption, _ = EXAMPLES[0]
    result = captioner.caption(image)
    assert isinstance(result, CaptionResult)
    assert result.text == caption and result.words == caption.split()
    assert result.finished
    # the default length penalty 1.0 ranks by log-probability per token (the words and <end>)
    assert result.score == pytest.approx(result.log_prob / (len(result.words) + 1)) and result.log_prob < 0
    assert result.attention.shape == (len(result.words), 4, 4)
    assert result.attention.dtype == np.float32
    np.testing.assert_allclose(result.attention.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert [a.text for a in result.alternatives][0] == caption
    assert len(result.alternatives) == DecodeOptions().beam_size  # n-best defaults to the beam size


def test_each_word_carries_its_gate(captioner):
    """beta, 0-1 per word: the same whatever else is in the batch."""
    images = [img for img, _, _ in EXAMPLES[:5]]
    together = captioner.caption(images)
    for image, result in zip(images, together, strict=True):
        assert result.gate.shape == (len(result.words),) and result.gate.dtype == np.float32
        assert ((result.gate > 0) & (result.gate < 1)).all()
        np.testing.assert_allclose(captioner.caption(image).gate, result.gate, atol=1e-5)
    assert captioner.caption(images[0], max_length=2).gate.shape == (2,)


def test_paths_pil_images_and_arrays(captioner, tmp_path):
    (img0, cap0, _), (img1, cap1, _), (img2, cap2, _) = EXAMPLES[3:6]
    path = tmp_path / "shape.png"
    img0.save(path)
    results = captioner.caption([path, str(path), img1, np.asarray(img2)])
    assert isinstance(results, list) and len(results) == 4
    assert [r.text for r in results] == [cap0, cap0, cap1, cap2]
    assert captioner.caption(np.asarray(img2)).text == cap2  # an array is one image, not a list
    assert [r.text for r in captioner.caption((img1,))] == [cap1]  # a tuple is a list
    assert captioner.caption([]) == []


def test_batch_size_does_not_change_results(captioner):
    images = [img for img, _, _ in EXAMPLES[:7]]
    all_at_once = captioner.caption(images, batch_size=32)
    in_threes = captioner.caption(images, batch_size=3)
    assert [r.text for r in in_threes] == [r.text for r in all_at_once]
    for a, b in zip(in_threes, all_at_once, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


def test_encoder_chunks_give_the_same_captions(captioner, monkeypatch):
    pixels = torch.stack([captioner.preprocess(img) for img, _, _ in EXAMPLES[:5]])
    outputs = []
    for chunk in (2, 5, 64):
        monkeypatch.setattr("captioner.serving.captioner.CPU_ENCODER_BATCH", chunk)
        outputs.append(captioner.caption_tensors(pixels))
    for results in outputs[1:]:
        assert [r.text for r in results] == [r.text for r in outputs[0]]
        for a, b in zip(results, outputs[0], strict=True):
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-4)


def test_alternatives_n_best_and_decoding_options(captioner):
    image, caption, _ = EXAMPLES[9]
    result = captioner.caption(image, beam_size=4, n_best=4)
    assert len(result.alternatives) == 4 and all(isinstance(a, Alternative) for a in result.alternatives)
    assert result.alternatives[0].text == result.text == caption
    scores = [a.score for a in result.alternatives]
    assert scores == sorted(scores, reverse=True)
    assert len({a.text for a in result.alternatives}) == 4
    assert all(a.words == a.text.split() for a in result.alternatives)

    assert len(captioner.caption(image, beam_size=4, n_best=2).alternatives) == 2
    greedy = captioner.caption(image, beam_size=1)
    assert greedy.text == caption and len(greedy.alternatives) == 1
    normalised = captioner.caption(image, length_penalty=1.0)
    assert normalised.text == caption
    assert normalised.score == pytest.approx(normalised.log_prob / (len(normalised.words) + 1))
    short = captioner.caption(image, max_length=3)
    assert short.words == caption.split()[:3] and not short.finished
    assert short.attention.shape == (3, 4, 4)


def test_decoding_options_as_keywords_or_as_one_object(captioner):
    """caption(image, beam_size=4, n_best=2) is caption(image, DecodeOptions(beam_size=4, n_best=2));
    keywords change the options given."""
    image = EXAMPLES[9][0]
    by_name = captioner.caption(image, beam_size=4, n_best=2, length_penalty=1.0)
    options = DecodeOptions(beam_size=4, n_best=2, length_penalty=1.0)
    for result in (
        captioner.caption(image, options),
        captioner.caption(image, DecodeOptions(), beam_size=4, n_best=2, length_penalty=1.0),
    ):
        assert [(a.text, a.score) for a in result.alternatives] == [
            (a.text, a.score) for a in by_name.alternatives
        ]
    with pytest.raises(TypeError, match="options must be a DecodeOptions, got 3"):
        captioner.caption(image, 3)
    with pytest.raises(TypeError, match="unknown decoding option 'beam'"):
        captioner.caption(image, beam=3)


def test_bad_image_in_a_list_names_it(captioner, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_text("not really a photo")
    with pytest.raises(ImageLoadError, match="holiday.jpg"):
        captioner.caption([EXAMPLES[0][0], bad])


def test_from_pretrained_without_a_model_is_a_helpful_error(tmp_path, monkeypatch):
    empty = tmp_path / "weights"
    empty.mkdir()
    monkeypatch.setenv("CAPTIONER_WEIGHTS", str(empty))
    with pytest.raises(ModelNotFoundError) as err:
        Captioner.from_pretrained()
    message = str(err.value)
    assert str(empty) in message and "config.json" in message
    assert "scripts/train.py" in message and "CAPTIONER_WEIGHTS" in message

    monkeypatch.delenv("CAPTIONER_WEIGHTS")
    monkeypatch.setattr("captioner.serving.captioner.DEFAULT_WEIGHTS", tmp_path / "not-downloaded")
    with pytest.raises(ModelNotFoundError, match="no trained model in"):
        Captioner.from_pretrained()
    with pytest.raises(FileNotFoundError):  # ModelNotFoundError is a FileNotFoundError
        Captioner.from_pretrained(empty)


def test_from_pretrained_uses_the_environment_variable(shapes_checkpoint, monkeypatch):
    monkeypatch.setenv("CAPTIONER_WEIGHTS", str(shapes_checkpoint))
    image, caption, _ = EXAMPLES[1]
    assert Captioner.from_pretrained(device="cpu").caption(image).text == caption


def test_quantized_decoder_keeps_the_captions(shapes_checkpoint):
    """The int8 decoder of quantize=True (dynamic quantization, CPU) is a speed option, not a
    different model (the int8 encoder it comes with: tests/test_quantize.py)."""
    from captioner.model.onnx_decoder import quantize_decoder

    from .shapes import all_examples

    examples = all_examples()
    images = [img for img, _, _ in examples]
    plain = Captioner.from_pretrained(shapes_checkpoint, device="cpu").caption(images)
    quantized = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    quantized.model.decoder = quantize_decoder(quantized.model.decoder)
    assert "quantized" in type(quantized.model.decoder.lstm).__module__
    fast = quantized.caption(images)
    assert [r.text for r in fast] == [r.text for r in plain] == [c for _, c, _ in examples]
