"""The web app: its helpers in-process, then app.py over real HTTP with gradio_client."""

import json
import math
import os
import shutil
import subprocess
import sys
from functools import partial

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from captioner import Captioner, load_image, save_model
from captioner.model.folder import load_ensemble
from captioner.model.options import DecodeOptions
from captioner.serving import webapp
from captioner.serving import webapp_events as events
from captioner.serving import webapp_layout as layout
from captioner.serving.app_model import ModelProcess
from captioner.serving.model_card import CARD_PAGE, ModelFacts, card_page, describe_model
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
    assert [label for _, label in gallery] == [
        f"{w} · β {g:.2f}" for w, g in zip(shown.words, shown.gate, strict=True)
    ]
    assert max(shown.image.size) == DISPLAY_SIZE

    plain = webapp.overlays(shown, 0.0)
    assert all(pixel_distance(image, shown.image) < 1 for image, _ in plain)
    assert all(pixel_distance(image, shown.image) > 10 for image, _ in webapp.overlays(shown, 1.0))

    big, tokens = webapp.word_view(shown, 3, 0.6)
    assert big["label"] == f"Word 3 of 6: “square” · image gate β = {shown.gate[2]:.2f}"
    assert [t for t, label in tokens if label] == ["square"]
    assert "".join(t for t, _ in tokens) == text


def test_the_evidence_shows_beside_the_caption_and_each_word(shapes_checkpoint, tmp_path):
    """What the encoder's ImageNet classifier saw: the photo's (or the box's) top labels beside
    the caption, as Captioner.caption(..., evidence=True) finds them, and each word's verdict."""
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    path = save_shape(tmp_path, "red", "circle", "left")
    upload = {"path": str(path), "orig_name": path.name}
    for box in (None, (0, 0, 112, 224)):
        _, _, _, shown = webapp.caption_upload(captioner, upload, focus_box=box and ", ".join(map(str, box)))
        expected = captioner.caption(load_image(path), focus=box, evidence=True)
        assert [(e.label, e.category) for e in shown.evidence] == [
            (e.label, e.category) for e in expected.evidence
        ]
        summary = webapp.evidence_summary(shown)
        assert ("in the box" if box else "in the photo") in summary
        assert all(e.label in summary for e in expected.evidence)
        assert len(shown.word_evidence) == len(shown.words) == len(shown.word_categories)
        for i, word in enumerate(shown.words, start=1):
            assert f"“{word}”" in webapp.word_evidence_view(shown, i)
    shown.word_categories[1], shown.word_evidence[1] = "person", None  # as for "man"
    assert "ImageNet has no class for person" in webapp.word_evidence_view(shown, 2)
    shown.evidence = None  # a model without an ImageNet classifier
    assert "no ImageNet classifier" in webapp.evidence_summary(shown) and not webapp.word_evidence_view(
        shown, 1
    )


def test_unlikely_captions_show_a_nonzero_probability():
    """A whole sentence's probability is often below 0.001; rounding must not show it as 0."""
    assert webapp.probability(math.log(3.21e-5)) == 3.21e-5
    assert webapp.probability(0.0) == 1.0


def test_about_panel_summarises_the_model_and_links_its_card(shapes_checkpoint, tmp_path):
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    about = describe_model(shapes_checkpoint, captioner)
    assert "efficientnet_lite0" in about and "128 px" in about
    assert "synthetic shapes (tests)" in about and "No model card" in about

    with_card = shutil.copytree(shapes_checkpoint, tmp_path / "model")
    (with_card / "MODEL_CARD.md").write_text(
        "# Shapes model\n\n## Data\n\nTen thousand drawn shapes.\n\nMore about them.\n\n"
        "## Scores (held-out shapes)\n\n| decoding | BLEU-4 | METEOR | CIDEr |\n|---|---|---|---|\n"
        "| greedy | 1.00 | 2.00 | 3.00 |\n| **beam 3 (default)** | 4.00 | 5.00 | **9.87** |\n"
    )
    about = describe_model(with_card, captioner)
    assert "**Training data.** Ten thousand drawn shapes." in about and "More about" not in about
    assert "(held-out shapes; default decoding): BLEU-4 4.00 · METEOR 5.00 · CIDEr 9.87" in about
    assert f"[Read the full model card]({CARD_PAGE})" in about and "No model card" not in about

    members = [{"path": "/home/someone/runs/a", "epoch": "xe-7"}, {"path": "b", "epoch": "xe-5"}]
    pair = save_model(
        tmp_path / "pair",
        *load_ensemble([shapes_checkpoint, shapes_checkpoint])[:2],
        metadata={"ensemble_of": members},
    )
    about = describe_model(pair, Captioner.from_pretrained(pair, device="cpu"))
    assert "2 LSTM decoders, trained apart, that average" in about
    assert "/home/someone" not in about and "xe-7" not in about  # no machine paths, no raw metadata


def test_about_the_shipped_model_quotes_the_readmes_scores_and_no_machine_paths():
    """Scores from the model card (as the README quotes them), data from its Data section; none
    of config.json's training paths or logged epoch labels."""
    weights = ROOT / "weights"
    config = json.loads((weights / "config.json").read_text())
    about = describe_model(weights, ModelFacts(config, 13_059_373, (14, 14), len(config["vocabulary"])))
    scores = "BLEU-4 23.71 · METEOR 21.80 · CIDEr 59.54"
    assert scores in about and scores.replace(" ·", ",") in (ROOT / "README.md").read_text()
    assert "Flickr8k" in about and "efficientnet_lite2" in about and "14×14" in about
    train_config = config["metadata"]["train_config"]
    assert train_config["data"]["root"] not in about and train_config["output_dir"] not in about
    assert "xe-9" not in about and "{" not in about and len(about) < 1500


@pytest.mark.parametrize(
    "metadata", [[1, 2, 3], "text", 7, None, {"val_scores": [1], "train_config": 3, "trained_on": {"x": 1}}]
)
def test_odd_metadata_in_config_json_never_breaks_the_about_panel(shapes_checkpoint, tmp_path, metadata):
    """Issue 33, item 22: `"metadata": [1, 2, 3]` in config.json made the About panel raise."""
    folder = shutil.copytree(shapes_checkpoint, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "metadata": metadata}))
    captioner = Captioner.from_pretrained(folder, device="cpu")
    about = describe_model(folder, captioner)
    assert "efficientnet_lite0" in about and "No model card" in about


def test_the_card_page_serves_only_images_inside_the_model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "inside.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / "MODEL_CARD.md").write_text(
        "![in](inside.png) ![out](../outside.png) ![web](https://x.org/a.png)"
    )
    text, images = card_page(folder)
    assert images == [(folder / "inside.png").resolve()]
    assert f"gradio_api/file={(folder / 'inside.png').resolve()}" in text
    assert "../outside.png is not in the model folder" in text and "(https://x.org/a.png)" in text
    assert card_page(tmp_path) is None


def test_the_pages_events_show_problems_as_text_and_never_raise(shapes_checkpoint, tmp_path):
    """The page's caption events write a problem into the status line (the API's raise it)."""
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    caption = partial(webapp.caption_upload, captioner)
    ready = lambda: True  # noqa: E731

    def last(events):
        return list(events)[-1]

    assert last(events.caption_photo(caption, ready, None, on_upload=True)) == (*events.CLEARED, "", "")
    text, *_, status, region_status = last(events.caption_photo(caption, ready, None))
    assert text == "" and status.startswith("⚠️ Upload an image first") and region_status == ""
    bad = tmp_path / "not_*an*_image.png"
    bad.write_bytes(b"nope" * 100)
    *_, status, _ = last(events.caption_photo(caption, ready, {"path": str(bad), "orig_name": bad.name}))
    assert status == "⚠️ Could not read this image: not\\_\\*an\\*\\_image.png: not a recognised image file"

    good = save_shape(tmp_path, "red", "circle", "left")
    upload = {"path": str(good), "orig_name": good.name}
    box, *kept, region_status, status = last(
        events.caption_region(caption, ready, {"boxes": []}, upload, 3, 20, 0.6, 8)
    )
    assert region_status.startswith("⚠️ Draw a box on the image first") and status == ""
    assert all(isinstance(value, type(gr.skip())) for value in [box, *kept])  # the last result stays
    raw = {"boxes": [{"xmin": 0, "ymin": 40, "xmax": 100, "ymax": 160, "scaleFactor": 2}]}
    box, text, *_, region_status, status = last(
        events.caption_region(caption, ready, raw, upload, 3, 20, 0.6, 8)
    )
    assert box == "0, 20, 50, 80" and text.startswith("a red") and region_status == status == ""

    loading = list(events.caption_photo(caption, lambda: False, upload))
    assert loading[0][-2] == events.LOADING and loading[-1][0] == "a red circle on the left"


@pytest.mark.parametrize("payload", ["hello", 5, {"path": 5}, {"orig_name": "x.png"}, [], None])
def test_anything_but_an_upload_is_upload_an_image_first(payload):
    """Issue 33, item 27: an API client's "hello" or 5 in place of the image."""
    with pytest.raises(gr.Error, match="Upload an image first"):
        webapp.read_upload(payload)
    assert layout.ImageData.model_validate(payload if payload is not None else {}).path is None


@pytest.mark.slow
def test_the_model_process_captions_like_the_captioner(shapes_checkpoint, tmp_path):
    """The app's model runs in a process of its own; results and errors cross back unchanged."""
    path = save_shape(tmp_path, "blue", "square", "right")
    image = load_image(path)
    local = Captioner.from_pretrained(shapes_checkpoint, device="cpu").caption(image, evidence=True)
    model = ModelProcess(shapes_checkpoint, "cpu", quantize=False)
    model.start()
    try:
        assert "128 px" in model.describe() and not model.failed.is_set()
        remote = model.caption(image, DecodeOptions())
        assert remote.text == local.text and remote.words == local.words
        np.testing.assert_allclose(remote.attention, local.attention, atol=1e-5)
        assert [a.text for a in remote.alternatives] == [a.text for a in local.alternatives]
        assert [e.label for e in remote.evidence] == [e.label for e in local.evidence]  # always on
        with pytest.raises(ValueError, match="focus"):
            model.caption(image, DecodeOptions(), focus=(0, 0, 5000, 5000))
        assert model.caption(image).text == local.text  # still serving after an error
    finally:
        model.stop()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((shapes_checkpoint / "config.json").read_text())
    failing = ModelProcess(broken, "cpu", quantize=False)
    failing.start()
    assert failing.failed.wait(300) and "cannot start without a model" in str(failing.error)
    with pytest.raises(RuntimeError, match="did not load"):
        failing.caption(image)
    failing.stop()


@pytest.mark.slow
def test_the_apps_process_never_imports_torch(shapes_checkpoint, tmp_path):
    """The page's process reads uploads and draws overlays; the model process does the rest."""
    path = save_shape(tmp_path, "green", "circle", "left")
    code = f"""
import sys
from pathlib import Path
from captioner.serving import webapp
from captioner.serving.app_model import ModelProcess
model = ModelProcess(Path({str(shapes_checkpoint)!r}), "cpu", False)
model.start()
demo = webapp.build_app(model, model.describe, webapp.example_images(Path({str(tmp_path)!r})))
text, *_ = webapp.caption_upload(model, {{"path": {str(path)!r}}})
model.stop()
print(text, sorted(m for m in ("torch", "timm", "nltk") if m in sys.modules))
"""
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "a green circle on the left []"


def test_the_component_file_log_lines_and_only_they_are_dropped(capsys):
    import gradio.routes

    webapp.quiet_component_log()
    gradio.routes.print("id=ab12, environment=client, type=component, file_name=style.css")
    gradio.routes.print("* Running on local URL:  http://127.0.0.1:7860")
    assert capsys.readouterr().out == "* Running on local URL:  http://127.0.0.1:7860\n"


def test_example_photos_are_written_and_readable(tmp_path):
    paths = [row[0] for row in webapp.example_images(tmp_path)]
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"{name}.jpg" for name in webapp.EXAMPLES]
    assert all(min(load_image(p).size) >= 256 for p in paths)


@pytest.mark.slow
def test_app_without_a_model_exits_with_a_clear_message(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    caption, alternatives, attention = client.predict(handle_file(str(path)), 3, 20, 0.6, api_name="/caption")
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
@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", "notes.txt: not a recognised image file"),
        ("fake", "fake.png: not a recognised image file"),
        ("truncated", "truncated.jpg: cannot decode image"),
        ("huge", "exceeds the limit of 40,000,000"),
    ],
)
def test_bad_files_are_clear_errors_and_the_server_carries_on(client, tmp_path, kind, message):
    with pytest.raises(AppError, match=message) as caught:
        client.predict(handle_file(str(make_bad_file(tmp_path, kind))), api_name="/caption")
    assert str(tmp_path) not in str(caught.value) and "Traceback" not in str(caught.value)
    good = save_shape(tmp_path, "yellow", "circle", "right")
    assert client.predict(handle_file(str(good)), api_name="/caption")[0] == "a yellow circle on the right"


@pytest.mark.slow
@pytest.mark.parametrize("image", [None, "hello", 5])
def test_no_image_is_a_clear_error(client, image):
    """Issue 33, item 27: not a generic "upstream Gradio app has raised an exception"."""
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(image, api_name="/caption")


@pytest.mark.slow
def test_oversized_upload_is_refused(app_url):
    response = httpx.post(
        f"{app_url}gradio_api/upload", trust_env=False, files={"files": ("big.png", b"\0" * (10 * 2**20 + 1))}
    )
    assert response.status_code == 413
