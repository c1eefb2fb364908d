"""The decoder's step on ONNX Runtime (captioner.model.onnx_decoder): the torch step's outputs,
the same beam search results, its cache, and where it is used. Its speed is measured by
`captioner benchmark`."""

import pytest
import torch

from captioner import Captioner
from captioner.model import onnx_decoder
from captioner.model.decoder import AttentionDecoder
from captioner.model.decoding import beam_search
from captioner.model.ensemble import DecoderEnsemble
from captioner.model.onnx_decoder import OnnxDecoder, quantize_decoder, runtime_decoder
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features

from .test_onnx_encoder import real_photos


def small_decoder(attention: str = "additive", **kwargs) -> AttentionDecoder:
    torch.manual_seed(0)
    decoder = AttentionDecoder(30, 48, 32, 16, 24, 20, attention=attention, **kwargs).eval()
    with torch.no_grad():  # a peaked word distribution, as a trained decoder has
        decoder.classifier.weight.mul_(8.0)
    return decoder


def step_inputs(decoder: AttentionDecoder, rows: int = 3, cells: int = 9):
    torch.manual_seed(1)
    annotations, keys = decoder.prepare(torch.randn(rows, cells, 48))
    state = decoder.init_state(annotations)
    return annotations, keys, torch.tensor([1, 5, 7])[:rows], state


def flat(step_outputs) -> list[torch.Tensor]:
    """(logits, (h, c), alpha, gate) -> [logits, h, c, alpha, gate]"""
    logits, (h, c), alpha, gate = step_outputs
    return [logits, h, c, alpha, gate]


@pytest.mark.parametrize("attention", ["additive", "multiplicative"])
@pytest.mark.parametrize("options", [{}, {"deep_output": False, "gate": False}])
def test_the_step_equals_the_torch_step(attention, options, tmp_path):
    decoder = small_decoder(attention, **options)
    onnx = OnnxDecoder(decoder, cache=tmp_path)
    with torch.inference_mode():
        annotations, keys, words, state = step_inputs(decoder)
        focus = torch.linspace(-3, 3, 27).view(3, 9)
        for bias in (None, focus):
            for rows in (1, 3):  # any number of rows from one graph
                args = (annotations[:rows], keys[:rows], words[:rows], (state[0][:rows], state[1][:rows]))
                expected = decoder.step(*args, None if bias is None else bias[:rows])
                got = onnx.step(*args, None if bias is None else bias[:rows])
                for a, b in zip(flat(got), flat(expected), strict=True):
                    assert a.shape == b.shape
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_step_reads_each_images_grid_once(tmp_path):
    """Beams share their image's grid (AttentionDecoder.step): the graph takes N grids for
    N x W rows, any N and W."""
    decoder = small_decoder()
    onnx = OnnxDecoder(decoder, cache=tmp_path)
    with torch.inference_mode():
        annotations, keys, _, _ = step_inputs(decoder, rows=3)
        torch.manual_seed(2)
        for images, beams in ((1, 5), (3, 2)):
            rows = images * beams
            state = (torch.randn(rows, 24), torch.randn(rows, 24))
            words, focus = torch.randint(4, 30, (rows,)), torch.randn(rows, 9)
            args = (annotations[:images], keys[:images], words, state)
            for bias in (None, focus):
                expected = decoder.step(*args, bias)
                for a, b in zip(flat(onnx.step(*args, bias)), flat(expected), strict=True):
                    assert a.shape == b.shape and len(a) == rows
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_per_image_work_is_the_decoders_and_int8_with_quantize(tmp_path):
    """prepare and init_state: the float decoder's own; with quantize=True its int8 copy's, close
    to them (what they cost on the shipped model: docs/benchmarks.md)."""
    decoder = small_decoder()
    grid = torch.randn(2, 9, 48)
    with torch.inference_mode():
        annotations, keys = decoder.prepare(grid)
        state = decoder.init_state(annotations)
        float_runner = OnnxDecoder(decoder, cache=tmp_path)
        for got, expected in zip(float_runner.prepare(grid), (annotations, keys), strict=True):
            assert torch.equal(got, expected)
        float_state = float_runner.init_state(annotations)
        assert all(torch.equal(a, b) for a, b in zip(float_state, state, strict=True))
        int8 = OnnxDecoder(decoder, cache=tmp_path, quantize=True)
        int8_prepared = int8.prepare(grid)
        int8_state = int8.init_state(annotations)
    for got, expected in zip((*int8_prepared, *int8_state), (annotations, keys, *state), strict=True):
        assert not torch.equal(got, expected)  # int8 products, not the float ones
        assert float((got - expected).norm() / expected.norm()) < 0.05


def test_beam_search_finds_the_same_captions(tmp_path):
    decoder = small_decoder()
    features = torch.randn(4, 9, 48, generator=torch.Generator().manual_seed(2))
    options = DecodeOptions(beam_size=3, max_length=8, n_best=3)
    expected = beam_search(decoder, features, options)
    got = beam_search(OnnxDecoder(decoder, cache=tmp_path), features, options)
    assert [[h.tokens for h in image] for image in got] == [[h.tokens for h in image] for image in expected]
    for mine, theirs in zip(sum(got, []), sum(expected, []), strict=True):
        assert mine.log_prob == pytest.approx(theirs.log_prob, abs=1e-4)
        torch.testing.assert_close(mine.alphas, theirs.alphas, rtol=1e-4, atol=1e-5)


def test_a_decoder_with_semantic_attributes_gets_them_through_prepare(tmp_path):
    decoder = small_decoder(semantic_attributes=True)
    with torch.no_grad():
        decoder.attribute_proj.weight.normal_()  # trained: not the zero start
    onnx = OnnxDecoder(decoder, cache=tmp_path)
    assert onnx.reads_attributes
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 9, 48, generator=generator)
    attributes = torch.softmax(torch.randn(2, 1000, generator=generator), dim=1)
    options = DecodeOptions(beam_size=3, max_length=8)
    expected = beam_search(decoder, features, options, attributes=attributes)
    got = beam_search(onnx, features, options, attributes=attributes)
    assert [[h.tokens for h in image] for image in got] == [[h.tokens for h in image] for image in expected]
    with pytest.raises(ValueError, match="reads semantic attributes"):
        beam_search(onnx, features, options)


@pytest.mark.slow
def test_the_cache_is_reused_and_keyed_on_the_weights(tmp_path, monkeypatch):
    decoder = small_decoder()
    assert OnnxDecoder(decoder, cache=tmp_path).prepare_graph().origin == "exported"
    (graph,) = (tmp_path / "onnx").glob("*.onnx")
    assert graph.name.startswith("decoder-step-30words-")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_decoder, "export_step", no_export)
        assert OnnxDecoder(decoder, cache=tmp_path).prepare_graph().origin == "cache"
    with torch.no_grad():
        decoder.classifier.bias.add_(0.5)
    assert OnnxDecoder(decoder, cache=tmp_path).prepare_graph().origin == "exported"
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # no cache can be made under it, not even by root
    onnx = OnnxDecoder(decoder, cache=blocked / "cache").prepare_graph()
    assert onnx.origin == "memory"
    with torch.inference_mode():
        annotations, keys, words, state = step_inputs(decoder)
        torch.testing.assert_close(
            onnx.step(annotations, keys, words, state)[0],
            decoder.step(annotations, keys, words, state)[0],
            rtol=1e-4,
            atol=1e-5,
        )


def test_what_cannot_run_on_onnxruntime_stays_in_torch():
    decoder = small_decoder()
    assert isinstance(runtime_decoder(decoder), OnnxDecoder)
    for other in (
        small_decoder("hard"),
        DecoderEnsemble([small_decoder(), small_decoder()]),
        quantize_decoder(small_decoder()),
    ):
        assert runtime_decoder(other) is other
    with pytest.raises(ValueError, match="soft attention, not AttentionDecoder with HardAttention"):
        OnnxDecoder(small_decoder("hard"))


@pytest.mark.slow
def test_the_captioner_decodes_on_onnxruntime_and_follows_a_new_decoder(trained_shapes_model):
    model, vocab, _ = trained_shapes_model
    captioner = Captioner(model, vocab, device="cpu")
    assert isinstance(captioner.decoder, OnnxDecoder)
    images = real_photos()
    onnx = [r.text for r in captioner.caption(images, beam_size=3)]
    torch_decoder = captioner.decoder.decoder
    captioner.model.decoder = quantize_decoder(torch_decoder)  # replaced: the runner follows
    assert captioner.decoder is captioner.model.decoder
    captioner.model.decoder = torch_decoder
    assert isinstance(captioner.decoder, OnnxDecoder)
    with torch.inference_mode():  # the same photos decoded by the torch decoder
        grids = captioner.encoder(torch.stack([captioner.transform(image) for image in images]))
        plain = caption_features(torch_decoder, vocab, grids, DecodeOptions(beam_size=3))
    assert [r.text for r in plain] == onnx


def test_the_int8_step_keeps_the_shapes_captions(shapes_checkpoint, tmp_path):
    """quantize=True's decoder: onnxruntime's dynamic int8 twin of the step, approximately the
    float step (its int8 encoder: tests/test_quantize.py)."""
    from .shapes import all_examples

    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    images = [image for image, _, _ in all_examples()]
    plain = [r.text for r in captioner.caption(images)]
    captioner.decoder = int8 = runtime_decoder(captioner.model.decoder, quantize=True)
    assert isinstance(int8, OnnxDecoder) and int8.quantize
    assert [r.text for r in captioner.caption(images)] == plain == [c for _, c, _ in all_examples()]
    OnnxDecoder(captioner.model.decoder, cache=tmp_path, quantize=True).prepare_graph()
    (graph,) = (tmp_path / "onnx").glob("*.onnx")
    assert "-int8-" in graph.name
