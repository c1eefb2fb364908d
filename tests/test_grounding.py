"""Grounding and hallucination: the synonym table, the metrics' geometry, and the whole
evaluation on the shapes world (where the truth is known) and on coco-mini."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from captioner import Captioner
from captioner.evaluation.coco_objects import COCO_SYNONYMS, ObjectVocabulary
from captioner.evaluation.grounding import (
    GroundingReport,
    category_masks,
    evaluate_grounding,
    ground_caption,
    summarise,
    upsample_attention,
    write_report,
)
from captioner.serving.captioner import DEFAULT_WEIGHTS

from .app_server import ROOT
from .conftest import SHARED_DATA
from .shapes import COLOURS, SHAPES, SIDES, shape_image

# pycocotools' RLE decoding warns under numpy 2 (its __array__ lacks a copy argument): harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE_WORDS = {"circle": ["circle"], "square": ["square"]}
METRIC_KEYS = [
    "pointing_game",
    "centre_baseline",
    "attention_mass",
    "uniform_baseline",
    "chair_i",
    "chair_s",
    "images",
    "grounded_words",
    "object_mentions",
]
SIZE = 224


# --- the synonym table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, expected",
    [
        (
            "a man and two puppies near a hot dog stand",
            [("man", "person"), ("puppies", "dog"), ("hot dog", "hot dog")],
        ),
        ("two women ride bikes past a bus stop", [("women", "person"), ("bikes", "bicycle")]),
        ("a boy in an orange shirt sits at a table", [("boy", "person"), ("table", "dining table")]),
        (
            "a child hugs a teddy bear next to a bear",
            [("child", "person"), ("teddy bear", "teddy bear"), ("bear", "bear")],
        ),
        ("people and children and a man", [("people", "person")]),  # first mention per category
        ("a man rides a jet ski near the ladies", [("man", "person")]),
        ("buses and benches and knives", [("buses", "bus"), ("benches", "bench"), ("knives", "knife")]),
    ],
)
def test_caption_words_map_to_coco_categories(caption, expected):
    mentions = ObjectVocabulary().mentions(caption.split())
    assert [(m.phrase, m.category) for m in mentions] == expected
    for m in mentions:  # the attention index is the phrase's last word
        assert caption.split()[m.index] == m.phrase.split()[-1]


def test_the_table_names_every_coco_category_once():
    assert len(COCO_SYNONYMS) == 80
    instances = SHARED_DATA / "coco-mini" / "annotations" / "instances_train2017.json"
    if instances.is_file():
        assert {c["name"] for c in json.loads(instances.read_text())["categories"]} <= set(COCO_SYNONYMS)
    with pytest.raises(ValueError, match="'bike' is listed for both 'bicycle' and 'motorcycle'"):
        ObjectVocabulary({"bicycle": ["bike"], "motorcycle": ["bike"]})


# --- the metrics on hand-made attention ------------------------------------------------------------


def _square_mask(top: int, left: int, side: int, size: int = 100) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_pointing_game_counts_peaks_within_15_px_of_the_masks():
    """A 10x10 grid over a 100x100 image: one cell of attention, peaking at x = 10k + 4.5."""
    objects = ObjectVocabulary(SHAPE_WORDS)
    mask = _square_mask(38, 38, 20)  # rows/cols 38..57
    results = []
    for column, should_hit in [(4, True), (2, True), (1, False)]:  # on it, 14 px off, 24 px off
        attention = np.zeros((2, 10, 10), dtype=np.float32)
        attention[:, 4, column] = 1.0
        grounded = ground_caption(["a", "square"], attention, {"square": mask}, objects)
        assert grounded.objects[0].hit is should_hit
        results.append(grounded)
    assert results[0].objects[0].centre_hit  # the centre (50, 50) is on the mask
    metrics = summarise(results)
    assert metrics["pointing_game"] == pytest.approx(200 / 3)
    assert metrics["centre_baseline"] == 100.0
    assert metrics["uniform_baseline"] == pytest.approx(4.0)  # 20 x 20 of 100 x 100
    assert metrics["chair_i"] == metrics["chair_s"] == 0.0


def test_attention_mass_is_the_share_of_upsampled_attention_on_the_masks():
    objects = ObjectVocabulary(SHAPE_WORDS)
    left_half = np.zeros((100, 100), dtype=bool)
    left_half[:, :50] = True
    uniform = np.full((1, 4, 4), 1 / 16, dtype=np.float32)
    assert ground_caption(["square"], uniform, {"square": left_half}, objects).objects[
        0
    ].mass == pytest.approx(50.0)
    on_left = np.zeros((1, 4, 4), dtype=np.float32)
    on_left[0, :, :2] = 1 / 8  # all attention on the two left columns
    heat = upsample_attention(on_left[0], (100, 100))
    assert heat.sum() == pytest.approx(1.0) and heat[:, :50].sum() > 0.9
    mass = ground_caption(["square"], on_left, {"square": left_half}, objects).objects[0].mass
    assert mass == pytest.approx(heat[:, :50].sum() * 100)


def test_naming_an_absent_category_counts_toward_chair():
    objects = ObjectVocabulary(SHAPE_WORDS)
    attention = np.full((5, 2, 2), 0.25, dtype=np.float32)
    masks = {"circle": _square_mask(0, 0, 50)}
    both = ground_caption("a circle and a square".split(), attention, masks, objects)
    right = ground_caption("a circle a circle circle".split(), attention, masks, objects)
    assert [(o.word, o.in_image) for o in both.objects] == [("circle", True), ("square", False)]
    assert both.hallucinated and not right.hallucinated
    metrics = summarise([both, right])
    assert metrics["chair_i"] == pytest.approx(100 / 3)  # 1 of 3 mentions (circle counts once)
    assert metrics["chair_s"] == 50.0
    assert (metrics["object_mentions"], metrics["grounded_words"], metrics["images"]) == (3, 2, 2)


# --- the shapes world as a COCO instances file -------------------------------------------------------


def _shape_mask(shape: str, side: str, size: int = SIZE) -> np.ndarray:
    """The pixels shapes.shape_image paints, drawn the same way."""
    canvas = Image.new("L", (size, size), 0)
    r, cx, cy = size // 6, size // 4 if side == "left" else 3 * size // 4, size // 2
    draw = ImageDraw.Draw(canvas)
    (draw.ellipse if shape == "circle" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=1)
    return np.asarray(canvas, dtype=bool)


def _crowd_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, zeros first), as crowd regions use."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def write_instances(folder, images: list[tuple[Image.Image, list[tuple[str, str]]]]):
    """Images plus a COCO instances file: squares as polygons, circles as crowd RLE."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES, 1)]
    category_id = {c["name"]: c["id"] for c in categories}
    entries, annotations = [], []
    for image_id, (image, shapes) in enumerate(images, start=1):
        name = f"{image_id:06d}.png"
        image.save(image_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
        for shape, side in shapes:
            mask = _shape_mask(shape, side)
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            if shape == "square":
                x0, y0, w, h = box
                segmentation, crowd = [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]], 0
            else:
                segmentation, crowd = _crowd_rle(mask), 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": box,
                    "category_id": category_id[shape],
                    "segmentation": segmentation,
                    "area": int(mask.sum()),
                    "iscrowd": crowd,
                }
            )
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return image_dir, path


def two_shapes(circle_colour: str = "red", square_colour: str = "blue") -> Image.Image:
    """A circle on the left and a square on the right of one canvas."""
    image = shape_image(circle_colour, "circle", "left")
    right = shape_image(square_colour, "square", "right")
    image.paste(right.crop((SIZE // 2, 0, SIZE, SIZE)), (SIZE // 2, 0))
    return image


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    """Every shape of the world with its true mask, plus an empty canvas with no annotations."""
    singles = [(shape_image(c, s, side), [(s, side)]) for c in COLOURS for s in SHAPES for side in SIDES]
    empty = (Image.new("RGB", (SIZE, SIZE), (128, 128, 128)), [])
    return write_instances(tmp_path_factory.mktemp("shapes-instances"), [*singles, empty])


def test_instance_masks_match_the_drawn_shapes_crowd_included(shapes_world):
    from pycocotools.coco import COCO

    image_dir, instances = shapes_world
    coco = COCO(str(instances))
    assert {a["iscrowd"] for a in coco.dataset["annotations"]} == {0, 1}
    for entry in coco.dataset["images"][:4]:
        masks = category_masks(coco, entry["id"])
        pixels = np.asarray(Image.open(image_dir / entry["file_name"]).convert("RGB"), dtype=int)
        painted = np.abs(pixels - 128).sum(axis=-1) > 30
        (mask,) = masks.values()
        assert (mask == painted).mean() > 0.995  # polygons and RLE give the shape's own pixels


@pytest.fixture(scope="module")
def shapes_captioner(shapes_checkpoint):
    return Captioner.from_pretrained(shapes_checkpoint, device="cpu")


@pytest.mark.slow
def test_a_trained_model_points_at_the_shapes_it_names(shapes_captioner, shapes_world):
    report = evaluate_grounding(shapes_captioner, *shapes_world, synonyms=SHAPE_WORDS)
    metrics = report.metrics
    assert list(metrics) == METRIC_KEYS
    assert report.skipped == ["000017.png"]  # the empty canvas has no annotations
    assert (metrics["images"], metrics["object_mentions"], metrics["grounded_words"]) == (16, 16, 16)
    assert metrics["chair_i"] == metrics["chair_s"] == 0.0  # it names exactly what is drawn
    assert metrics["pointing_game"] >= 75.0, metrics
    assert metrics["centre_baseline"] == 0.0  # the shapes sit left or right of the centre
    assert metrics["attention_mass"] > 1.5 * metrics["uniform_baseline"]
    assert all(0 < o.gate < 1 for r in report.images for o in r.objects)
    assert all(len(r.gates) == len(r.caption.split()) for r in report.images)


@pytest.mark.slow
def test_uniform_attention_scores_the_uniform_baseline(shapes_checkpoint, shapes_world):
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    with torch.no_grad():  # every score equal: the softmax spreads attention evenly
        captioner.model.decoder.attention.score.weight.zero_()
        captioner.model.decoder.attention.score.bias.zero_()
    metrics = evaluate_grounding(captioner, *shapes_world, synonyms=SHAPE_WORDS).metrics
    assert metrics["grounded_words"] > 0
    assert metrics["attention_mass"] == pytest.approx(metrics["uniform_baseline"], abs=1e-3)


@pytest.mark.slow
def test_a_shape_that_is_not_there_counts_toward_chair(shapes_captioner, tmp_path):
    """The same two-shape picture, captioned the same way, once with both shapes annotated and
    once with the named shape missing from the annotations."""
    image = two_shapes()
    both = evaluate_grounding(
        shapes_captioner,
        *write_instances(tmp_path / "both", [(image, [("circle", "left"), ("square", "right")])]),
        synonyms=SHAPE_WORDS,
    )
    (named,) = [o.category for o in both.images[0].objects]
    assert both.metrics["chair_s"] == 0.0 and both.metrics["grounded_words"] == 1
    other = {"circle": ("square", "right"), "square": ("circle", "left")}[named]
    without = evaluate_grounding(
        shapes_captioner, *write_instances(tmp_path / "without", [(image, [other])]), synonyms=SHAPE_WORDS
    )
    assert without.images[0].caption == both.images[0].caption
    assert without.metrics["chair_i"] == without.metrics["chair_s"] == 100.0
    assert without.metrics["grounded_words"] == 0 and np.isnan(without.metrics["pointing_game"])
    write_report(without, tmp_path / "report")  # strict JSON: nothing to point at is null, not NaN
    text = (tmp_path / "report" / "metrics.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["pointing_game"] is None and json.loads(text)["chair_s"] == 100.0


@pytest.mark.slow
def test_the_script_writes_metrics_and_details(shapes_checkpoint, shapes_world, tmp_path):
    image_dir, instances = shapes_world
    synonyms = tmp_path / "shapes.json"
    synonyms.write_text(json.dumps(SHAPE_WORDS))
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate_grounding.py"),
            "--images",
            str(image_dir),
            "--instances",
            str(instances),
            "--checkpoint",
            str(shapes_checkpoint),
            "--beam_size",
            "2",
            "--synonyms",
            str(synonyms),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert list(printed) == METRIC_KEYS and printed["images"] == printed["object_mentions"] == 16
    assert "skipped 1 images without instance annotations" in run.stderr
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(written) == METRIC_KEYS
    lines = [json.loads(line) for line in (tmp_path / "out" / "details.jsonl").read_text().splitlines()]
    assert len(lines) == 17 and lines[-1] == {"file_name": "000017.png", "skipped": "no instance annotations"}


def test_bad_inputs_are_named(shapes_world, tmp_path):
    image_dir, instances = shapes_world
    with pytest.raises(FileNotFoundError, match="instances file .*nope.json does not exist"):
        evaluate_grounding(None, image_dir, tmp_path / "nope.json")
    with pytest.raises(ValueError, match="none of the categories of .* is in the synonym table"):
        evaluate_grounding(None, image_dir, instances)  # COCO's table has no circles
    with pytest.raises(FileNotFoundError, match="16 images of .* are not in"):
        evaluate_grounding(None, tmp_path, instances, synonyms=SHAPE_WORDS)
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"}]})
    )
    with pytest.raises(ValueError, match="captions.json is not a COCO instances file .*'categories'"):
        evaluate_grounding(None, image_dir, captions)
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.raises(ValueError, match="notes.txt is not a COCO instances file \\(not JSON"):
        evaluate_grounding(None, image_dir, tmp_path / "notes.txt")


def test_write_report_keeps_exactly_the_metric_keys(tmp_path):
    objects = ObjectVocabulary(SHAPE_WORDS)
    grounded = ground_caption(
        ["circle"],
        np.full((1, 2, 2), 0.25, dtype=np.float32),
        {"circle": _square_mask(0, 0, 40)},
        objects,
        gate=[0.3],
    )
    write_report(GroundingReport(summarise([grounded]), [grounded], []), tmp_path)
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == METRIC_KEYS
    (detail,) = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert detail["objects"][0]["gate"] == pytest.approx(0.3) and detail["objects"][0]["hit"]
    assert detail["gates"] == [pytest.approx(0.3)]  # every word's beta


# --- real COCO photos ------------------------------------------------------------------------------

COCO_MINI = SHARED_DATA / "coco-mini"


@pytest.mark.slow
@pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_train2017.json").is_file(),
    reason="coco-mini (../shared/data/coco-mini) is not available",
)
def test_the_shipped_model_on_coco_mini():
    captioner = Captioner.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    report = evaluate_grounding(
        captioner,
        COCO_MINI / "train2017",
        COCO_MINI / "annotations" / "instances_train2017.json",
        beam_size=1,
    )
    metrics = report.metrics
    assert metrics["images"] + len(report.skipped) == 80
    assert metrics["object_mentions"] >= metrics["images"] // 2
    assert 0 < metrics["grounded_words"] < metrics["object_mentions"]
    for key in METRIC_KEYS[:6]:
        assert 0 <= metrics[key] <= 100, key
    # What the model card reports: attention beats uniform; COCO's objects are often invented.
    assert metrics["attention_mass"] > metrics["uniform_baseline"]
    assert metrics["chair_s"] > 20
