"""The encoder on ONNX Runtime (captioner.model.onnx_encoder): the torch encoder's grids, any
batch, its cache, and the same captions. Its speed is measured by `captioner benchmark`."""

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from captioner import Captioner
from captioner.data.datasets import load_flickr
from captioner.model import onnx_encoder, onnx_runtime
from captioner.model.encoder import Encoder
from captioner.model.onnx_encoder import OnnxEncoder, runtime_encoder
from captioner.serving.captioner import DEFAULT_WEIGHTS

from .conftest import SHARED_DATA


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    """Lite0 with its ImageNet weights at 128 px (4x4 grid): small and quick to export."""
    return Encoder("efficientnet_lite0", 128).eval()


def real_photos() -> list[Image.Image]:
    """Three real photographs that ship with scikit-image (no download)."""
    return [Image.fromarray(f()) for f in (skimage_data.astronaut, skimage_data.chelsea, skimage_data.coffee)]


@pytest.fixture(scope="module")
def photos(encoder) -> torch.Tensor:
    """real_photos() preprocessed: (3, 3, 128, 128)."""
    return torch.stack([encoder.transform(image) for image in real_photos()])


def assert_close(onnx: torch.Tensor, plain: torch.Tensor) -> None:
    """Within fp32 rounding: 1e-4 of the largest value."""
    assert onnx.shape == plain.shape and onnx.dtype == torch.float32
    error = (onnx - plain).abs().max().item()
    assert error <= 1e-4 * plain.abs().max().item(), f"max error {error}"


def test_grids_equal_the_torch_encoders_for_any_batch(encoder, photos, tmp_path):
    onnx = OnnxEncoder(encoder, cache=tmp_path)
    with torch.inference_mode():
        plain = encoder(photos)
        for batch in (1, 3):
            assert_close(onnx(photos[:batch]), plain[:batch])
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 128, 128\)"):
        onnx(photos[:, :, :64])


def test_the_graph_pads_by_constants_not_by_sizes_computed_at_run_time(encoder):
    """timm's TF "same" padding, computed from the input's size in eager mode, is exported as
    constants (onnxruntime folds them into the convolutions; run-time pads cost ~15 %)."""
    import onnx

    graph = onnx.load_from_string(onnx_encoder.export_onnx(encoder)).graph
    producer = {output: node for node in graph.node for output in node.output}

    def operators_behind(name: str) -> set[str]:
        node = producer.get(name)
        return set() if node is None else {node.op_type}.union(*map(operators_behind, node.input))

    pads = [node for node in graph.node if node.op_type == "Pad"]
    assert len(pads) == 5  # Lite0's five stride-2 convolutions
    assert all("Shape" not in operators_behind(node.input[1]) for node in pads)


def test_until_stage_gives_the_activations_entering_that_stage(encoder, photos, tmp_path):
    onnx = OnnxEncoder(encoder, until_stage=3, cache=tmp_path)
    with torch.inference_mode():
        expected = torch.nn.Sequential(*encoder.stages[:3])(photos)
        assert_close(onnx(photos), expected)
        assert_close(onnx(photos[:1]), expected[:1])
        assert_close(encoder(onnx(photos), from_stage=3), encoder(photos))


@pytest.mark.slow
def test_the_cache_is_reused_and_keyed_on_the_weights(encoder, tmp_path, monkeypatch):
    assert OnnxEncoder(encoder, cache=tmp_path).prepare().origin == "exported"
    files = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith("efficientnet_lite0-128px-4x4-")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    with monkeypatch.context() as patch:
        patch.setattr(onnx_encoder, "export_onnx", no_export)
        assert OnnxEncoder(encoder, cache=tmp_path).prepare().origin == "cache"
    changed = Encoder("efficientnet_lite0", 128).eval()
    with torch.no_grad():
        changed.stages[-1][0].weight.mul_(1.01)  # a tuned head: another graph
    assert OnnxEncoder(changed, cache=tmp_path).prepare().origin == "exported"
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


def test_an_unwritable_cache_keeps_the_graph_in_memory(encoder, photos, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # no folder can be made under it, not even by root
    onnx = OnnxEncoder(encoder, cache=blocked / "cache").prepare()
    assert onnx.origin == "memory"
    with torch.inference_mode():
        assert_close(onnx(photos[:2]), encoder(photos[:2]))


def test_the_cpu_path_is_onnx_and_other_devices_keep_torch(encoder, monkeypatch):
    assert isinstance(runtime_encoder(encoder), OnnxEncoder)
    assert isinstance(runtime_encoder(encoder, until_stage=2), OnnxEncoder)
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="CAPTIONER_ORT_THREADS"):
        onnx_runtime.default_threads()
    with pytest.raises(RuntimeError, match="inference only"):
        OnnxEncoder(encoder).train()


def test_onnxruntime_threads_follow_torch_unless_set(monkeypatch):
    monkeypatch.delenv(onnx_runtime.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert onnx_runtime.default_threads() == threads
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "3")
    assert onnx_runtime.default_threads() == 3


def test_torch_runs_on_one_thread_inside_and_as_before_after(monkeypatch):
    """torch_on_one_thread: nested and from two threads at once, torch is on one thread while any
    use is open, and onnxruntime's default still counts the threads from before."""
    monkeypatch.delenv(onnx_runtime.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    inside: list[tuple[int, int]] = []
    both_in = threading.Barrier(2)

    def caption_like() -> None:
        with onnx_runtime.torch_on_one_thread():
            both_in.wait(timeout=30)
            with onnx_runtime.torch_on_one_thread():
                inside.append((torch.get_num_threads(), onnx_runtime.default_threads()))
            both_in.wait(timeout=30)

    try:
        workers = [threading.Thread(target=caption_like) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert inside == [(1, 2), (1, 2)]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_caption_leaves_torchs_threads_as_they_were(trained_shapes_model):
    model, vocab, _ = trained_shapes_model
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        captioner = Captioner(model, vocab, device="cpu")
        assert isinstance(captioner.encoder, OnnxEncoder)
        captioner.caption(real_photos()[:1], beam_size=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_captions_with_onnx_equal_the_torch_paths(trained_shapes_model):
    """The small shapes model (Lite0 at 128 px) on real photos and a shapes scene."""
    model, vocab, _ = trained_shapes_model
    captioner = Captioner(model, vocab, device="cpu")
    assert isinstance(captioner.encoder, OnnxEncoder)
    images = real_photos()
    onnx = [r.text for r in captioner.caption(images, beam_size=3)]
    captioner.encoder = captioner.model.encoder
    assert [r.text for r in captioner.caption(images, beam_size=3)] == onnx


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "flickr8k").is_dir() or not Path(DEFAULT_WEIGHTS).exists(),
    reason="needs the shipped model and Flickr8k",
)
def test_the_shipped_model_says_the_same_on_flickr8k_dev_photos():
    captioner = Captioner.from_pretrained(DEFAULT_WEIGHTS, device="cpu", quantize=False)
    paths = [i.path for i in load_flickr(SHARED_DATA / "flickr8k")["val"][:4]]
    onnx = [r.text for r in captioner.caption(paths)]
    captioner.encoder = captioner.model.encoder
    assert [r.text for r in captioner.caption(paths)] == onnx
