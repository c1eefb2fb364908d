"""`captioner caption --evidence` (issue #37): every row says what the encoder's ImageNet
classifier saw, the same as Captioner.caption(..., evidence=True); of the box in a focus row; the
field survives resume and merge, in JSONL and CSV."""

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from captioner import Captioner
from captioner.cli.main import caption_folder_main

from .shapes import shape_image
from .test_batch import read_jsonl, run

PHOTOS = [("red", "circle", "left"), ("blue", "square", "right"), ("green", "square", "left")]


def make_photos(root: Path) -> Path:
    photos = root / "photos"
    photos.mkdir()
    for colour, shape, side in PHOTOS:
        shape_image(colour, shape, side, 224).save(photos / f"{colour}.png")
    (photos / "fake.jpg").write_bytes(b"not an image")
    return photos


def same_evidence(field: dict, result) -> bool:
    """A record's evidence field against a CaptionResult's evidence."""
    labels = [(e.label, e.category) for e in result.evidence]
    words = [(w, e.label) for w, e in zip(result.words, result.word_evidence, strict=True) if e is not None]
    return (
        [(x["label"], x["category"]) for x in field["labels"]] == labels
        and all(
            math.isclose(x["probability"], e.probability, abs_tol=2e-3)
            for x, e in zip(field["labels"], result.evidence, strict=True)
        )
        and [(x["word"], x["label"]) for x in field["words"]] == words
    )


@pytest.mark.slow
def test_evidence_rows_match_the_api_and_the_focus_box(tmp_path, shapes_checkpoint):
    photos = make_photos(tmp_path)
    focus = tmp_path / "focus.json"
    box = [112, 0, 224, 224]
    focus.write_text(json.dumps({str(photos / "blue.png"): box}))
    output = tmp_path / "captions.jsonl"
    assert (
        run(photos, output, shapes_checkpoint, "--num-workers", "0", "--evidence", "--focus-json", str(focus))
        == 0
    )
    rows = {Path(r["path"]).name: r for r in read_jsonl(output)}
    captioner = Captioner.from_pretrained(shapes_checkpoint)
    for colour, *_ in PHOTOS:
        image = Image.open(photos / f"{colour}.png")
        region = box if colour == "blue" else None
        result = captioner.caption(image, focus=region, evidence=True)
        row = rows[f"{colour}.png"]
        assert row["caption"] == result.text and same_evidence(row["evidence"], result), colour
        labels = [x["probability"] for x in row["evidence"]["labels"]]
        assert len(labels) == 5 and labels == sorted(labels, reverse=True) and 0 < labels[0] <= 1
    whole = captioner.caption(Image.open(photos / "blue.png"), evidence=True)
    assert not same_evidence(rows["blue.png"]["evidence"], whole)  # the box's, not the photo's
    assert rows["fake.jpg"]["error"] and not rows["fake.jpg"].get("evidence")

    plain = tmp_path / "plain.jsonl"
    assert run(photos, plain, shapes_checkpoint, "--num-workers", "0") == 0
    assert all("evidence" not in r for r in read_jsonl(plain))  # only when asked


@pytest.mark.slow
def test_evidence_survives_csv_shards_resume_and_merge(tmp_path, shapes_checkpoint):
    photos = make_photos(tmp_path)
    whole = tmp_path / "all.jsonl"
    assert run(photos, whole, shapes_checkpoint, "--num-workers", "0", "--evidence") == 0
    expected = {Path(r["path"]).name: r["evidence"] for r in read_jsonl(whole)}
    parts = [tmp_path / f"part{k}.csv" for k in range(2)]
    for k, part in enumerate(parts):
        assert (
            run(photos, part, shapes_checkpoint, "--num-workers", "0", "--evidence", "--shard", f"{k}/2") == 0
        )
        before = part.read_bytes()
        assert run(photos, part, shapes_checkpoint, "--num-workers", "0", "--shard", f"{k}/2") == 0
        assert part.read_bytes() == before  # resumed: nothing new, nothing lost
    merged = tmp_path / "merged.csv"
    assert caption_folder_main([str(p) for p in parts] + ["-o", str(merged), "--merge"]) == 0
    with merged.open(newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == set(expected)
    for name, evidence in expected.items():
        assert (json.loads(rows[name]["evidence"]) if rows[name]["evidence"] else None) == evidence
