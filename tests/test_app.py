"""The web app: its helpers in-process, then app.py over real HTTP with gradio_client."""

import math
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner import Captioner, load_image, save_model
from captioner.model.folder import load_ensemble
from captioner.serving import webapp
from captioner.serving.webapp import DISPLAY_SIZE

from .app_server import ROOT, running_app
from .shapes import shape_image


def save_shape(folder, colour, shape, side, name=None):
    path = folder / (name or f"{colour}_{shape}_{side}.png")
    shape_image(colour, shape, side).save(path)
    return path


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


# --- in-process: the pieces app.py puts together ---------------------------------------------------

def test_sliders_redraw_from_the_kept_result(shapes_checkpoint, tmp_path):
    """After one model run, opacity and word changes need only the state, never the model."""
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    path = save_shape(tmp_path, "green", "square", "right")
    upload = {"path": str(path), "orig_name": path.name}  # what Gradio hands the event
    text, table, gallery, shown = webapp.caption_upload(captioner, upload)
    assert text == "a green square on the right" and table[0][1] == text
    assert [label.split(" · ")[0] for _, label in gallery] == shown.words == text.split()
    assert shown.gate.shape == (len(shown.words),) and ((shown.gate > 0) & (shown.gate < 1)).all()
    assert [label for _, label in gallery] == [f"{w} · β {g:.2f}" for w, g in zip(shown.words, shown.gate,
                                                                                 strict=True)]
    assert max(shown.image.size) == DISPLAY_SIZE

    plain = webapp.overlays(shown, 0.0)
    assert all(pixel_distance(image, shown.image) < 1 for image, _ in plain)
    assert all(pixel_distance(image, shown.image) > 10 for image, _ in webapp.overlays(shown, 1.0))

    big, tokens = webapp.word_view(shown, 3, 0.6)
    assert big["label"] == f"Word 3 of 6: “square” · image gate β = {shown.gate[2]:.2f}"
    assert [t for t, label in tokens if label] == ["square"]
    assert "".join(t for t, _ in tokens) == text


def test_unlikely_captions_show_a_nonzero_probability():
    """A whole sentence's probability is often below 0.001; rounding must not show it as 0."""
    assert webapp.probability(math.log(3.21e-5)) == 3.21e-5
    assert webapp.probability(0.0) == 1.0


def test_about_panel_reads_config_metadata_and_model_card(shapes_checkpoint, tmp_path):
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    about = webapp.describe_model(shapes_checkpoint, captioner)
    assert "efficientnet_lite0" in about and "128 px" in about
    assert "synthetic shapes (tests)" in about and "No model card" in about

    with_card = shutil.copytree(shapes_checkpoint, tmp_path / "model")
    (with_card / "MODEL_CARD.md").write_text("## Shapes model\n\nCIDEr 9.87 on held-out shapes.\n")
    about = webapp.describe_model(with_card, captioner)
    assert "CIDEr 9.87 on held-out shapes" in about and "No model card" not in about

    members = [{"path": "a", "epoch": "xe-7"}, {"path": "b", "epoch": "xe-5"}]
    pair = save_model(tmp_path / "pair", *load_ensemble([shapes_checkpoint, shapes_checkpoint])[:2],
                      metadata={"ensemble_of": members})
    about = webapp.describe_model(pair, Captioner.from_pretrained(pair, device="cpu"))
    assert "2 LSTM decoders, trained apart, that average" in about
    assert "**Ensemble of.** path a, epoch xe-7 | path b, epoch xe-5" in about


def test_example_photos_are_written_and_readable(tmp_path):
    paths = [row[0] for row in webapp.example_images(tmp_path)]
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"{name}.jpg" for name in webapp.EXAMPLES]
    assert all(min(load_image(p).size) >= 256 for p in paths)


@pytest.mark.slow
def test_app_without_a_model_exits_with_a_clear_message(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "cannot start without a model: no trained model in" in run.stderr
    assert "Traceback" not in run.stderr


# --- over HTTP: the running app ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_url(shapes_checkpoint):
    with running_app(shapes_checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.mark.slow
def test_only_the_caption_endpoint_is_public(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/caption"}


@pytest.mark.slow
def test_caption_endpoint(client, tmp_path):
    path = save_shape(tmp_path, "red", "circle", "left")
    caption, alternatives, attention = client.predict(handle_file(str(path)), 3, 20, 0.6,
                                                      api_name="/caption")
    assert caption == "a red circle on the left"

    assert alternatives["headers"] == ["#", "caption", "score", "p"]
    rows = alternatives["data"]
    assert [row[0] for row in rows] == [1, 2, 3] and rows[0][1] == caption
    scores = [row[2] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0 < row[3] <= 1 for row in rows)

    labels = [item["caption"].split(" · β ") for item in attention]  # "word · β 0.42"
    assert [word for word, _ in labels] == caption.split()
    assert all(0 < float(beta) < 1 for _, beta in labels)
    images = [Image.open(item["image"]).convert("RGB") for item in attention]
    assert {image.size for image in images} == {(DISPLAY_SIZE, DISPLAY_SIZE)}
    assert len({image.tobytes() for image in images}) > 1  # each word has its own map


@pytest.mark.slow
def test_greedy_and_opacity(client, tmp_path):
    path = handle_file(str(save_shape(tmp_path, "blue", "square", "right")))
    caption, alternatives, faint = client.predict(path, 1, 20, 0.0, api_name="/caption")
    assert caption == "a blue square on the right" and len(alternatives["data"]) == 1
    _, _, strong = client.predict(path, 1, 20, 1.0, api_name="/caption")
    original = shape_image("blue", "square", "right").resize((DISPLAY_SIZE, DISPLAY_SIZE))
    faint, strong = (Image.open(items[2]["image"]).convert("RGB") for items in (faint, strong))
    assert pixel_distance(faint, original) < 3 < 20 < pixel_distance(strong, original)


def make_bad_file(folder, kind):
    if kind == "text":
        path = folder / "notes.txt"
        path.write_text("not an image\n")
    elif kind == "fake":
        path = folder / "fake.png"
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "truncated":
        path = folder / "truncated.jpg"
        shape_image("red", "circle", "left").save(path, quality=95)
        path.write_bytes(path.read_bytes()[:1500])
    else:  # tiny file, too many pixels
        path = folder / "huge.png"
        Image.new("1", (8000, webapp.MAX_PIXELS // 8000 + 1)).save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("text", "notes.txt: not a recognised image file"),
    ("fake", "fake.png: not a recognised image file"),
    ("truncated", "truncated.jpg: cannot decode image"),
    ("huge", "exceeds the limit of 40,000,000"),
])
def test_bad_files_are_clear_errors_and_the_server_carries_on(client, tmp_path, kind, message):
    with pytest.raises(AppError, match=message) as caught:
        client.predict(handle_file(str(make_bad_file(tmp_path, kind))), api_name="/caption")
    assert str(tmp_path) not in str(caught.value) and "Traceback" not in str(caught.value)
    good = save_shape(tmp_path, "yellow", "circle", "right")
    assert client.predict(handle_file(str(good)), api_name="/caption")[0] == "a yellow circle on the right"


@pytest.mark.slow
def test_no_image_is_a_clear_error(client):
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, api_name="/caption")


@pytest.mark.slow
def test_oversized_upload_is_refused(app_url):
    response = httpx.post(f"{app_url}gradio_api/upload", trust_env=False,
                          files={"files": ("big.png", b"\0" * (10 * 2**20 + 1))})
    assert response.status_code == 413
