"""Caption this region: a box or mask steers the attention, and so the caption."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.model.decoding import beam_search
from captioner.model.focus import focus_weights
from captioner.model.options import DecodeOptions

from .shapes import COLOURS, all_examples


@pytest.fixture(scope="module")
def captioner(shapes_checkpoint):
    return Captioner.from_pretrained(shapes_checkpoint, device="cpu")


def two_shapes(left: tuple[str, str], right: tuple[str, str], size: int = 224) -> Image.Image:
    """A (colour, shape) on the left and another on the right of one grey canvas."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    r = size // 6
    for (colour, shape), cx in ((left, size // 4), (right, 3 * size // 4)):
        box = (cx - r, size // 2 - r, cx + r, size // 2 + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def test_a_box_maps_onto_the_grid_through_the_squashing_resize():
    """A 400 x 200 image squashed to a square: a 4 x 4 grid's cells are 100 x 50 pixels."""
    weights = focus_weights((0, 0, 100, 50), (400, 200), (4, 4)).view(4, 4)
    assert weights[0, 0] == 1 and weights.sum() == 1
    weights = focus_weights((50, 25, 150, 75), (400, 200), (4, 4)).view(4, 4)
    expected = torch.zeros(4, 4)
    expected[:2, :2] = 0.25  # a quarter of each of four cells
    assert torch.allclose(weights, expected)
    weights = focus_weights((0, 0, 400, 200), (400, 200), (4, 4))
    assert torch.equal(weights, torch.ones(16))
    mask = np.zeros((200, 400), dtype=bool)
    mask[25:75, 50:150] = True  # the same region as a mask
    assert torch.allclose(focus_weights(mask, (400, 200), (4, 4)).view(4, 4), expected)


@pytest.mark.parametrize(
    "box, message",
    [
        ((0, 0, 300, 100), "reaches outside the 200x100 image"),
        ((-1, 0, 50, 50), "reaches outside"),
        ((10, 10, 10, 50), "non-zero area"),
        ((50, 10, 10, 50), "x0 < x1"),
        ((0, math.nan, 50, 50), "NaN"),
        ((0, 0, 50), "four numbers"),
        (np.zeros((10, 10), dtype=bool), r"boolean array of the image's size \(100, 200\)"),
        (np.zeros((100, 200), dtype=bool), "selects no pixel"),
    ],
)
def test_bad_regions_are_clear_errors(captioner, box, message):
    image = Image.new("RGB", (200, 100))
    with pytest.raises(ValueError, match=message):
        captioner.caption(image, focus=box)


def test_no_focus_is_exactly_the_plain_decoding(captioner):
    images = [image for image, _, _ in all_examples()[::3]]
    plain = captioner.caption(images, beam_size=3)
    unfocused = captioner.caption(images, beam_size=3, focus=[None] * len(images))
    for a, b in zip(plain, unfocused, strict=True):
        assert (a.text, a.score) == (b.text, b.score) and np.array_equal(a.attention, b.attention)
    features = captioner.model.encoder(torch.stack([captioner.preprocess(i) for i in images]))
    direct = beam_search(captioner.model.decoder, features, DecodeOptions(beam_size=3))
    assert [h[0].tokens for h in direct] == [captioner.vocab.encode(r.text)[1:-1] for r in plain]


@pytest.mark.parametrize(
    "left_shape, right_shape",
    [(("red", "circle"), ("blue", "square")), (("green", "square"), ("yellow", "circle"))],
)
def test_focus_on_one_of_two_shapes_names_that_shape_and_looks_there(captioner, left_shape, right_shape):
    """The model only ever saw one shape per image; with two, a box picks which one it names."""
    image = two_shapes(left_shape, right_shape)
    left, right = (0, 56, 112, 168), (112, 56, 224, 168)
    on_left = captioner.caption(image, focus=left, focus_strength=4.0)
    on_right = captioner.caption(image, focus=right, focus_strength=4.0)
    assert " ".join(left_shape) in on_left.text, on_left.text
    assert " ".join(right_shape) in on_right.text, on_right.text
    side = on_left.attention.shape[2] // 2
    for result, half in ((on_left, np.s_[:, :, :side]), (on_right, np.s_[:, :, side:])):
        assert result.attention[half].sum() > 0.5 * result.attention.sum()
    # A list of images takes a list of regions; a mask works like a box.
    mask = np.zeros((224, 224), dtype=bool)
    mask[56:168, 112:224] = True
    both = captioner.caption([image, image], focus=[left, mask], focus_strength=4.0)
    assert [r.text for r in both] == [on_left.text, on_right.text]


def test_the_batch_captioner_takes_boxes_from_a_json_file(tmp_path, shapes_checkpoint):
    import json

    from captioner.cli.main import caption_folder_main

    photos = tmp_path / "photos"
    photos.mkdir()
    image = two_shapes(("red", "circle"), ("blue", "square"))
    for name in ("left.png", "right.png", "whole.png", "bad.png"):
        image.save(photos / name)
    boxes = {
        str(photos / "left.png"): [0, 56, 112, 168],
        str(photos / "right.png"): [112, 56, 224, 168],
        str(photos / "bad.png"): [0, 0, 500, 50],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    output = tmp_path / "out.jsonl"
    code = caption_folder_main(
        [
            str(photos),
            "-o",
            str(output),
            "--checkpoint",
            str(shapes_checkpoint),
            "--focus-json",
            str(tmp_path / "boxes.json"),
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, output.read_text().splitlines())}
    assert "red circle" in rows["left.png"]["caption"] and "blue square" in rows["right.png"]["caption"]
    assert rows["whole.png"]["caption"] == Captioner.from_pretrained(shapes_checkpoint).caption(image).text
    assert "reaches outside the 224x224 image" in rows["bad.png"]["error"]


def test_the_focus_evaluation_counts_objects_named_with_and_without_focus(tmp_path, captioner):
    """scripts/evaluate_focus.py's measure on a COCO instances file of two-shape photos: focus
    on a shape's box names it; without focus the caption names one shape of the two."""
    import json

    from captioner.evaluation.focus import EVIDENCE, evaluate_focus

    pairs = [(("red", "circle"), ("blue", "square")), (("green", "square"), ("yellow", "circle"))]
    images, annotations = [], []
    for image_id, (left, right) in enumerate(pairs, start=1):
        name = f"pair_{image_id}.png"
        two_shapes(left, right).save(tmp_path / name)
        images.append({"id": image_id, "file_name": name, "width": 224, "height": 224})
        for (_, shape), x in ((left, 0), (right, 112)):
            x0, y0, x1, y1 = x + 18, 74, x + 94, 150  # the shape's bounding box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "iscrowd": 0,
                    "category_id": 1 if shape == "circle" else 2,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                }
            )
    instances = tmp_path / "instances.json"
    instances.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                # COCO names that ImageNet classes have, so that the boxes' evidence is measured too
                "categories": [{"id": 1, "name": "orange"}, {"id": 2, "name": "tv"}],
            }
        )
    )
    reports = evaluate_focus(
        captioner,
        tmp_path,
        instances,
        settings=[("both", 4.0), ("attention", 0.0)],
        synonyms={"orange": ["circle"], "tv": ["square"]},
    )
    focused, unsteered = reports[("both", 4.0)], reports[("attention", 0.0)]
    assert len(focused.trials) == 4 and all(t.nameable for t in focused.trials)
    summary = focused.summary()
    assert summary["named_with_focus"] == 100.0
    assert summary["named_without_focus"] == 50.0  # one shape of each photo
    assert summary["named_from_crop"] == 100.0  # the ceiling: each shape alone
    assert unsteered.summary()["named_with_focus"] == 50.0  # strength 0 is no focus at all
    assert summary["objects_with_imagenet_category"] == 4
    assert all(0 <= summary[f"evidence_hit_{where}"] <= 100 for where in EVIDENCE)
    assert all(len(t.box_evidence) == 5 for t in focused.trials)


def test_a_focused_caption_carries_the_evidence_of_its_box(captioner):
    """Issue #37: with focus, result.evidence is what the ImageNet classifier sees in the box; a
    box over the whole image, or strength 0, gives the whole photo's."""
    image = two_shapes(("red", "circle"), ("blue", "square"))
    whole = captioner.caption(image, evidence=True)
    everywhere = captioner.caption(image, focus=(0, 0, 224, 224), evidence=True)
    unsteered = captioner.caption(image, focus=(0, 0, 112, 224), focus_strength=0, evidence=True)
    for same in (everywhere, unsteered):
        assert [e.label for e in same.evidence] == [e.label for e in whole.evidence]
        assert all(
            math.isclose(a.probability, b.probability, abs_tol=1e-4)
            for a, b in zip(same.evidence, whole.evidence, strict=True)
        )
    left, right = (
        captioner.caption(image, focus=box, evidence=True) for box in ((0, 0, 112, 224), (112, 0, 224, 224))
    )
    assert [e.probability for e in left.evidence] != [e.probability for e in right.evidence]
    assert len(left.word_evidence) == len(left.words)


@pytest.mark.slow
def test_the_box_evidence_names_what_is_in_the_box():
    """The shipped model on a cat beside a coffee cup: the photo's evidence mixes them, each
    box's names its own object."""
    from skimage import data

    cat, coffee = (Image.fromarray(photo).resize((300, 300)) for photo in (data.chelsea(), data.coffee()))
    image = Image.new("RGB", (600, 300))
    image.paste(cat, (0, 0))
    image.paste(coffee, (300, 0))
    shipped = Captioner.from_pretrained(device="cpu")
    left = shipped.caption(image, focus=(0, 0, 300, 300), evidence=True)
    right = shipped.caption(image, focus=(300, 0, 600, 300), evidence=True)
    assert left.evidence[0].category == "cat" and left.evidence[0].probability > 0.5
    assert "cat" not in {e.category for e in right.evidence} and "cup" in {e.category for e in right.evidence}
