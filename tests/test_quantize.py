"""quantize=True: the int8 encoder graph (captioner.model.quantize) made by `captioner export
--quantize`, its grids against fp32, the captions it gives, and the errors without it. Its cost
on Flickr8k dev and its speed are measured by scripts/evaluate.py and `captioner benchmark`."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner import Captioner
from captioner.cli.main import main
from captioner.model.folder import load_model
from captioner.model.quantize import INT8_FILE, Int8EncoderError, int8_encoder
from captioner.serving.captioner import DEFAULT_WEIGHTS

from .shapes import all_examples
from .test_onnx_encoder import real_photos


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """The shapes world's photos and three real photographs, as files to calibrate on."""
    folder = tmp_path_factory.mktemp("calibration")
    for i, (image, _, _) in enumerate(all_examples()):
        image.save(folder / f"shape{i:02d}.png")
    for i, image in enumerate(real_photos()):
        image.save(folder / f"real{i}.jpg")
    return folder


@pytest.fixture(scope="module")
def int8_folder(shapes_checkpoint, photo_folder, tmp_path_factory) -> Path:
    """The shapes model exported with its int8 encoder."""
    target = tmp_path_factory.mktemp("int8") / "model"
    args = ["export", str(shapes_checkpoint), str(target), "--dtype", "float32"]
    assert main([*args, "--quantize", "--calibration-images", str(photo_folder)]) == 0
    assert (target / INT8_FILE).is_file()
    return target


@pytest.mark.slow
def test_int8_grids_are_close_to_fp32(int8_folder):
    encoder = load_model(int8_folder)[0].encoder
    int8 = int8_encoder(encoder, int8_folder)
    pixels = torch.stack([encoder.transform(image) for image in real_photos()])
    with torch.inference_mode():
        exact, approximate = encoder(pixels), int8(pixels)
    assert approximate.shape == exact.shape == (3, encoder.grid_size**2, encoder.feature_dim)
    cosine = F.cosine_similarity(approximate.flatten(1), exact.flatten(1))
    assert cosine.min() > 0.85, cosine  # Lite0, 128 px, 27 calibration photos: 0.91-0.96 measured
    assert cosine.max() < 1.0  # it is int8, not the fp32 graph


@pytest.mark.slow
def test_quantize_true_captions_like_fp32(int8_folder):
    examples = all_examples()
    images = [image for image, _, _ in examples]
    before = {p.name: p.stat().st_mtime_ns for p in int8_folder.iterdir()}
    exact = Captioner.from_pretrained(int8_folder, device="cpu", quantize=False).caption(images)
    int8 = Captioner.from_pretrained(int8_folder, device="cpu", quantize=True)
    assert Captioner.from_pretrained(int8_folder, device="cpu").quantize  # the CPU default with the graph
    assert int8.encoder.metadata()["captioner.calibration_photos"] == str(len(examples) + 3)
    approximate = int8.caption(images)
    same = sum(a.text == b.text for a, b in zip(approximate, exact, strict=True))
    right = sum(a.text == caption for a, (_, caption, _) in zip(approximate, examples, strict=True))
    # A 4x4 grid and a 128-wide decoder, both int8: 8 of 16 right and equal to fp32 measured, by
    # chance ~1 (4 colours x 2 shapes x 2 sides); the shipped model keeps most (next test).
    assert same >= 6 and right >= 6, (same, right, len(images))
    assert {p.name: p.stat().st_mtime_ns for p in int8_folder.iterdir()} == before  # read-only use


@pytest.mark.slow
def test_the_shipped_int8_encoder_fits_the_shipped_weights():
    exact = Captioner.from_pretrained(DEFAULT_WEIGHTS, device="cpu", quantize=False)
    int8 = Captioner.from_pretrained(DEFAULT_WEIGHTS, device="cpu", quantize=True)  # digest checked
    pixels = torch.stack([exact.preprocess(image) for image in real_photos()])
    with torch.inference_mode():
        cosine = F.cosine_similarity(int8.encoder(pixels).flatten(1), exact.encoder(pixels).flatten(1))
    assert cosine.min() > 0.9, cosine  # 0.97 median on 1000 Flickr8k dev photos
    pairs = zip(int8.caption(real_photos()), exact.caption(real_photos()), strict=True)
    assert all(len(set(a.text.split()) & set(b.text.split())) >= 2 for a, b in pairs)


def test_quantize_without_the_int8_graph_says_how_to_make_it(shapes_checkpoint, tmp_path, capsys):
    with pytest.raises(Int8EncoderError, match=f"{INT8_FILE} in the model folder .*captioner export"):
        Captioner.from_pretrained(shapes_checkpoint, device="cpu", quantize=True)
    assert not Captioner.from_pretrained(shapes_checkpoint, device="cpu").quantize  # default: fp32
    model, vocab, _ = load_model(shapes_checkpoint)
    with pytest.raises(Int8EncoderError, match="this model has none"):
        Captioner(model, vocab, device="cpu", quantize=True)
    with pytest.raises(SystemExit):  # argparse's error: the two flags go together
        main(["export", str(shapes_checkpoint), str(shapes_checkpoint), "--quantize"])
    real_photos()[0].save(tmp_path / "photo.jpg")
    output = ["-o", str(tmp_path / "captions.jsonl")]
    assert main(["caption", str(tmp_path), "--model", str(shapes_checkpoint), "--quantize", *output]) != 0
    error = capsys.readouterr().err
    assert f"quantize=True needs the int8 encoder {INT8_FILE}" in error and "Traceback" not in error


@pytest.mark.slow
def test_an_int8_graph_of_other_weights_is_refused(int8_folder, tmp_path):
    model, vocab, _ = load_model(int8_folder)
    with torch.no_grad():
        model.encoder.stages[-1][0].weight.mul_(1.01)  # another tuned head
    other = Captioner(model, vocab, device="cpu").save_pretrained(tmp_path / "other")
    shutil.copy(int8_folder / INT8_FILE, other / INT8_FILE)
    with pytest.raises(Int8EncoderError, match="made from other encoder weights"):
        Captioner.from_pretrained(other, device="cpu", quantize=True)


@pytest.mark.slow
def test_the_benchmark_times_quantize_true(int8_folder, capsys):
    settings = ["--runs", "1", "--warmup", "0", "--threads", "1", "--encoder-batches", "1"]
    photos = ["--batch-sizes", "1", "--extract-images", "2", "--extract-runs", "1", "--image-size", "128"]
    assert main(["benchmark", "--model", str(int8_folder), *settings, *photos]) == 0
    printed = capsys.readouterr().out
    assert printed.count("onnxruntime int8 (quantize=True)") == 1, printed  # the encoder table
    assert printed.count("quantize=True (int8 encoder+decoder)") == 2, printed  # caption(), folder
    assert "captioning a folder of 2 photos" in printed
    assert "decoder step, 5 beams" in printed and "onnxruntime int8 " in printed


@pytest.mark.slow
def test_save_pretrained_keeps_the_int8_encoder_only_for_its_weights(int8_folder, tmp_path):
    captioner = Captioner.from_pretrained(int8_folder, device="cpu")
    copy = captioner.save_pretrained(tmp_path / "copy")  # the same weights: the graph fits them
    assert (copy / INT8_FILE).read_bytes() == (int8_folder / INT8_FILE).read_bytes()
    Captioner.from_pretrained(copy, device="cpu", quantize=True)  # its digest is checked at load
    rounded = captioner.save_pretrained(tmp_path / "fp16", dtype=torch.float16)  # other weights
    assert not (rounded / INT8_FILE).exists()
    with torch.no_grad():
        captioner.model.encoder.stages[-1][0].weight.mul_(1.01)  # fine-tuned further: another encoder
    assert not (captioner.save_pretrained(tmp_path / "tuned") / INT8_FILE).exists()


@pytest.mark.slow
def test_int8_evidence_comes_from_the_same_pass_and_keeps_the_captions(int8_folder):
    int8 = Captioner.from_pretrained(int8_folder, device="cpu", quantize=True)
    exact = Captioner.from_pretrained(int8_folder, device="cpu", quantize=False)
    photos = real_photos()
    pixels = torch.stack([exact.preprocess(image) for image in photos])
    with torch.inference_mode():
        grids, stage_input = int8.encoder.with_stage_input(pixels)
        torch.testing.assert_close(grids, int8.encoder(pixels))
        trunk = exact.evidence_trunk()(pixels)  # float32: the stages before the evidence stage
    assert stage_input.shape == trunk.shape
    assert F.cosine_similarity(stage_input.flatten(1), trunk.flatten(1)).min() > 0.9
    plain, evidenced = int8.caption(photos), int8.caption(photos, evidence=True)
    assert [r.text for r in evidenced] == [r.text for r in plain]  # evidence does not change the grid
    assert all(r.evidence for r in evidenced)
