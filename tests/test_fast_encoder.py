"""The inference encoder (captioner.fast_encoder): the plain backbone's features, on real photos.

Its speed is measured by scripts/benchmark.py, not here.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from captioner import Captioner, CaptionModel
from captioner.data.datasets import load_flickr
from captioner.model.encoder import BACKBONES, Encoder
from captioner.model.inference_encoder import InferenceEncoder

from .conftest import SHARED_DATA

FLICKR = SHARED_DATA / "flickr8k"
# Each backbone at a size whose stride-2 "SAME" paddings are asymmetric (even sizes), small
# enough to keep the tests quick; the shipped Lite2 at its real 448 px is checked below.
SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260,
         "resnet50": 224, "resnet101": 224}


def skimage_photos() -> list[Image.Image]:
    """Real photographs that ship with scikit-image (no download)."""
    return [Image.fromarray(f()) for f in (skimage_data.astronaut, skimage_data.chelsea, skimage_data.coffee)]


def randomise_batchnorm(encoder: Encoder) -> None:
    """Random weights come with batch norms that do nothing (mean 0, var 1, scale 1, shift 0):
    give them real statistics, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            bn.weight.copy_(0.5 + torch.rand(n, generator=generator))
            bn.bias.copy_(0.1 * torch.randn(n, generator=generator))


def assert_same_grids(fast: torch.Tensor, plain: torch.Tensor) -> None:
    """Within 1e-4 of the plain grids' largest value."""
    assert fast.shape == plain.shape
    error = (fast - plain).abs().max().item()
    assert error <= 1e-4 * plain.abs().max().item(), f"max error {error}, scale {plain.abs().max().item()}"


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_features_equal_the_plain_backbone_on_real_photos(backbone):
    """EfficientNet-Lite with its ImageNet weights; the ResNets have none offline, so random
    weights with random batch-norm statistics. The plain Encoder runs timm's / torchvision's
    unmodified model."""
    if backbone.startswith("resnet"):
        encoder = Encoder(backbone, SIZES[backbone], weights="random").eval()
        randomise_batchnorm(encoder)
    else:
        encoder = Encoder(backbone, SIZES[backbone]).eval()
    pixels = torch.stack([encoder.transform(photo) for photo in skimage_photos()])
    fast = InferenceEncoder(encoder)
    with torch.inference_mode():
        plain = encoder(pixels)  # (B, L, D)
        assert_same_grids(fast(pixels), plain)
        assert_same_grids(torch.cat([fast(p) for p in pixels.split(1)]), plain)  # batch of one


@pytest.mark.slow
def test_lite2_at_448_px_equals_timm_on_flickr_photos():
    """The shipped model's backbone at its real input size, on Flickr8k dev photos."""
    if not FLICKR.is_dir():
        pytest.skip(f"{FLICKR} is absent")
    encoder = Encoder("efficientnet_lite2", 448).eval()
    photos = [Image.open(i.path).convert("RGB") for i in load_flickr(FLICKR)["val"][:8]]
    pixels = torch.stack([encoder.transform(photo) for photo in photos])
    with torch.inference_mode():
        assert_same_grids(InferenceEncoder(encoder)(pixels), encoder(pixels))


@pytest.mark.parametrize("options", [dict(fold_bn=False), dict(static_padding=False), dict(fuse=False),
                                     dict(channels_last=False, matmul_pointwise=False)])
def test_each_optimisation_can_be_turned_off(options):
    encoder = Encoder("efficientnet_lite0", 128).eval()
    pixels = torch.stack([encoder.transform(photo) for photo in skimage_photos()])
    with torch.inference_mode():
        assert_same_grids(InferenceEncoder(encoder, **options)(pixels), encoder(pixels))


def test_the_encoder_it_copies_is_untouched_and_still_trains():
    """Checkpoints hold the plain state dict, and fine-tuning trains the plain modules."""
    encoder = Encoder("efficientnet_lite0", 128)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    InferenceEncoder(encoder)
    after = encoder.state_dict()
    assert after.keys() == before.keys() and any("bn1.running_var" in k for k in after)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    encoder.set_trainable(len(encoder.stages) - 1)
    encoder.train()
    encoder(torch.randn(2, 3, 128, 128)).sum().backward()
    assert encoder.body.conv_head.weight.grad is not None and encoder.body.bn2.weight.grad is not None


def test_captioner_checkpoints_keep_the_plain_state_dict(shapes_checkpoint, tmp_path):
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    fresh = CaptionModel(captioner.model.config, len(captioner.vocab), encoder_weights="random")
    assert captioner.model.state_dict().keys() == fresh.state_dict().keys()


def test_bad_input_and_training_are_refused():
    fast = InferenceEncoder(Encoder("efficientnet_lite0", 128))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 128, 128\), got \(1, 3, 96, 96\)"):
        fast(torch.zeros(1, 3, 96, 96))
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()


@pytest.mark.slow
def test_shipped_model_captions_on_100_dev_photos_are_unchanged():
    """fp32: the Captioner's path (inference encoder, word tables) against the path before issue
    20 (the plain encoder, decoding through nn.LSTMCell), beam 3."""
    if not FLICKR.is_dir():
        pytest.skip(f"{FLICKR} is absent")
    captioner = Captioner.from_pretrained(device="cpu")
    images = load_flickr(FLICKR)["val"][:100]
    pixels = torch.stack([captioner.preprocess(i.path) for i in images])
    fast = captioner.caption_tensors(pixels, beam_size=3)
    captioner.encoder = captioner.model.encoder  # the plain path
    captioner.model.decoder.word_tables = False
    plain = captioner.caption_tensors(pixels, beam_size=3)
    assert [r.text for r in fast] == [r.text for r in plain]
    for a, b in zip(fast, plain, strict=True):
        assert a.log_prob == pytest.approx(b.log_prob, abs=1e-3)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-3)


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_grids():
    encoder = Encoder("efficientnet_lite0", 128).eval()
    pixels = torch.stack([encoder.transform(photo) for photo in skimage_photos()])
    with torch.inference_mode():
        assert_same_grids(InferenceEncoder(encoder, compile=True)(pixels), encoder(pixels))


@pytest.mark.slow
def test_int8_encoder_stays_close_to_the_fp32_grids():
    """int8 changes the grids (its cost in CIDEr is measured by scripts/benchmark.py
    --dev-cider); here: every photo's grid still points the same way as the fp32 one."""
    pytest.importorskip("torchao")
    from captioner.model.inference_encoder import calibration_photos

    encoder = Encoder("efficientnet_lite0", 128).eval()
    pixels = torch.stack([encoder.transform(photo) for photo in skimage_photos()])
    int8 = InferenceEncoder(encoder, int8_calibration=calibration_photos(encoder.transform))
    with torch.inference_mode():
        fast, plain = int8(pixels), encoder(pixels)
    assert fast.shape == plain.shape
    similarity = torch.nn.functional.cosine_similarity(fast.flatten(1), plain.flatten(1))
    assert similarity.min() > 0.8, similarity
    assert not torch.equal(fast, plain)
