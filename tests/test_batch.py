"""Batch captioning from the command line: finding files, bad files, resume, formats, exit codes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner import Captioner
from captioner.cli.main import caption_folder_main
from captioner.serving.batch import (
    attention_filename,
    caption_files,
    find_images,
    find_inputs,
    looks_like_image,
    select_shard,
)
from captioner.serving.settings import BatchSettings

from .shapes import all_examples, shape_image

# Good images: (relative path, colour, shape, side, size, PIL format)
GOOD = [
    ("red_left.jpg", "red", "circle", "left", 224, "JPEG"),
    ("sub/blue_right.png", "blue", "square", "right", 300, "PNG"),
    ("sub/deeper/green_left.jpeg", "green", "square", "left", 500, "JPEG"),
    ("yellow_right.dat", "yellow", "circle", "right", 260, "JPEG"),  # found by its content
]
# Bad files: relative path -> words its error must contain
BAD = {
    "fake.jpg": "not a recognised image",
    "truncated.jpg": "cannot decode",
    "empty.png": "empty",
    "bomb.png": "decompression bomb",
    "broken.jpg": "broken link",
    "locked.jpg": "permission denied",
}
MAX_PIXELS = 400_000  # above every good image (500 x 500), below bomb.png (1000 x 1000)


def make_photos(root: Path, monkeypatch) -> Path:
    """A folder with GOOD and BAD files, plus files a folder scan must ignore."""
    photos = root / "photos"
    for name, colour, shape, side, size, fmt in GOOD:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        shape_image(colour, shape, side, size).save(photos / name, fmt, quality=95)
    (photos / "fake.jpg").write_text("this is not a picture")
    jpeg = (photos / "red_left.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (photos / "empty.png").write_bytes(b"")
    Image.new("1", (1000, 1000)).save(photos / "bomb.png")
    (photos / "broken.jpg").symlink_to(photos / "deleted.jpg")
    shape_image("red", "square", "right", 224).save(photos / "locked.jpg")
    make_unreadable(photos / "locked.jpg", monkeypatch)
    (photos / "notes.txt").write_text("holiday 2024")  # not an image: skipped silently
    shape_image("red", "square", "right", 224).save(photos / ".hidden.jpg")  # hidden: skipped
    return photos


def make_unreadable(path: Path, monkeypatch) -> None:
    """chmod 000; root can read anyway, so there the denial is simulated at open()."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    original = Image.open

    def open_denied(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)) and Path(fp).name == path.name:
            raise PermissionError(13, "Permission denied", str(fp))
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_denied)


def expected_caption(colour: str, shape: str, side: str) -> str:
    return f"a {colour} {shape} on the {side}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_name(records: list[dict]) -> dict[str, dict]:
    names = [Path(r["path"]).name for r in records]
    assert len(names) == len(set(names)), f"duplicate rows: {sorted(names)}"
    return {Path(r["path"]).name: r for r in records}


def run(photos_or_files, output: Path, checkpoint: Path, *flags: str) -> int:
    inputs = [str(p) for p in (photos_or_files if isinstance(photos_or_files, list) else [photos_or_files])]
    return caption_folder_main(
        [
            *inputs,
            "-o",
            str(output),
            "--model",
            str(checkpoint),
            "--max-pixels",
            str(MAX_PIXELS),
            "--no-progress",
            *flags,
        ]
    )


def test_find_images_by_extension_or_content(tmp_path, monkeypatch):
    photos = make_photos(tmp_path, monkeypatch)
    found = [os.path.relpath(p, photos) for p in find_images([photos])]
    assert sorted(found) == sorted([g[0] for g in GOOD] + list(BAD))
    assert looks_like_image(photos / "yellow_right.dat") and not looks_like_image(photos / "fake.jpg")

    # Explicit files are kept even when they are not images; globs expand; duplicates go.
    found = find_images([photos / "notes.txt", str(photos / "sub" / "*.png"), photos / "sub"])
    assert [os.path.relpath(p, photos) for p in found] == [
        "notes.txt",
        "sub/blue_right.png",
        "sub/deeper/green_left.jpeg",
    ]
    assert find_images([photos], exclude=[photos / "sub"]) == [
        p for p in find_images([photos]) if "/sub/" not in p
    ]


def test_folder_with_good_and_bad_files(tmp_path, monkeypatch, shapes_checkpoint):
    photos = make_photos(tmp_path, monkeypatch)
    output = tmp_path / "captions.jsonl"
    monkeypatch.setenv("CAPTIONER_WEIGHTS", str(shapes_checkpoint))  # the default model
    code = caption_folder_main(
        [
            str(photos),
            "-o",
            str(output),
            "--max-pixels",
            str(MAX_PIXELS),
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    rows = by_name(read_jsonl(output))
    assert set(rows) == {Path(g[0]).name for g in GOOD} | set(BAD)
    for name, colour, shape, side, size, _ in GOOD:
        row = rows[Path(name).name]
        assert row["error"] is None
        assert row["caption"] == expected_caption(colour, shape, side)
        assert (row["width"], row["height"]) == (size, size)
        assert row["score"] < 0 and "alternatives" not in row
        assert Path(row["path"]) == photos / name
    for name, words in BAD.items():
        row = rows[name]
        assert words in row["error"] and name in row["error"], row
        assert row["caption"] is None


@pytest.mark.slow
def test_workers_csv_n_best_and_attention(tmp_path, monkeypatch, shapes_checkpoint):
    photos = make_photos(tmp_path, monkeypatch)
    (photos / "locked.jpg").unlink()  # its denial may be simulated in this process only
    output = tmp_path / "captions.csv"
    attention = photos / "attention"  # inside the scanned folder: must not be captioned later
    code = run(
        photos,
        output,
        shapes_checkpoint,
        "--num-workers",
        "2",
        "--batch-size",
        "3",
        "--n-best",
        "2",
        "--save-attention",
        str(attention),
    )
    assert code == 0
    with output.open(newline="") as f:
        rows = by_name(list(csv.DictReader(f)))
    assert set(rows) == {Path(g[0]).name for g in GOOD} | set(BAD) - {"locked.jpg"}
    for name, words in BAD.items():
        assert name == "locked.jpg" or words in rows[name]["error"]
    for name, colour, shape, side, size, _ in GOOD:
        row = rows[Path(name).name]
        assert row["error"] == "" and row["caption"] == expected_caption(colour, shape, side)
        assert int(row["width"]) == size and float(row["score"]) < 0
        alternatives = json.loads(row["alternatives"])
        assert len(alternatives) == 2 and alternatives[0]["caption"] == row["caption"]
        assert alternatives[0]["score"] >= alternatives[1]["score"]
        grid = attention / attention_filename(row["path"])
        with Image.open(grid) as image:
            assert image.format == "PNG" and image.width > 200
    assert len(list(attention.glob("*.png"))) == len(GOOD)

    # A rerun without --save-attention still leaves the attention folder out: nothing new.
    assert run(photos, output, shapes_checkpoint, "--num-workers", "2") == 0
    with output.open(newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_length_penalty_reaches_the_beam_search(tmp_path, monkeypatch, shapes_checkpoint):
    """--length-penalty ranks beams by log-probability / length^P, as Captioner.caption does."""
    photos = make_photos(tmp_path, monkeypatch)
    files = [photos / name for name, *_ in GOOD]
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    for penalty in ("0.0", "1.0"):
        output = tmp_path / f"captions-{penalty}.jsonl"
        assert (
            run(
                files,
                output,
                shapes_checkpoint,
                "--length-penalty",
                penalty,
                "--n-best",
                "2",
                "--num-workers",
                "0",
            )
            == 0
        )
        rows = by_name(read_jsonl(output))
        for path in files:
            expected = captioner.caption(str(path), beam_size=3, length_penalty=float(penalty), n_best=2)
            row = rows[path.name]
            assert row["caption"] == expected.text
            assert row["score"] == pytest.approx(expected.score, abs=1e-4)  # stored to 4 decimals
            assert [a["score"] for a in row["alternatives"]] == pytest.approx(
                [a.score for a in expected.alternatives], abs=1e-4
            )
    normalised = by_name(read_jsonl(tmp_path / "captions-1.0.jsonl"))["red_left.jpg"]
    plain = by_name(read_jsonl(tmp_path / "captions-0.0.jsonl"))["red_left.jpg"]
    words = len(plain["caption"].split()) + 1  # with <end>
    assert normalised["score"] == pytest.approx(plain["score"] / words, abs=1e-4)


def test_no_repeat_ngram_size_reaches_the_decoder(tmp_path, monkeypatch, shapes_checkpoint):
    """--no-repeat-ngram-size N: the rows are Captioner.caption(..., no_repeat_ngram_size=N)'s."""
    photos = make_photos(tmp_path, monkeypatch)
    files = [photos / name for name, *_ in GOOD]
    captioner = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    output = tmp_path / "captions.jsonl"
    assert run(files, output, shapes_checkpoint, "--no-repeat-ngram-size", "1", "--num-workers", "0") == 0
    rows = by_name(read_jsonl(output))
    for path in files:
        expected = captioner.caption(str(path), no_repeat_ngram_size=1)
        assert rows[path.name]["caption"] == expected.text
        assert rows[path.name]["score"] == pytest.approx(expected.score, abs=1e-4)
        assert len(set(expected.words)) == len(expected.words)  # n = 1: no word twice


def test_resume_after_crash_and_partial_line(tmp_path, monkeypatch, shapes_checkpoint):
    photos = make_photos(tmp_path, monkeypatch)
    output = tmp_path / "captions.jsonl"
    captioner = Captioner.from_pretrained(shapes_checkpoint)
    paths = find_images([photos])
    real_caption_tensors = captioner.caption_tensors
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_caption_tensors(*args, **kwargs)

    monkeypatch.setattr(captioner, "caption_tensors", crash_on_second_batch)
    settings = BatchSettings(batch_size=3, num_workers=0, max_pixels=MAX_PIXELS, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        caption_files(captioner, paths, output, settings=settings)
    first = read_jsonl(output)
    assert 0 < len(first) < len(paths)
    with output.open("a") as f:  # a crash in the middle of writing a record
        f.write('{"path": "' + str(photos / "half"))

    monkeypatch.setattr(captioner, "caption_tensors", real_caption_tensors)
    summary = caption_files(captioner, paths, output, settings=settings)
    assert summary.already_done + summary.failed_before == len(first)
    rows = by_name(read_jsonl(output))  # every line parses, no duplicates
    assert set(rows) == {Path(p).name for p in paths}
    assert read_jsonl(output)[: len(first)] == first


def test_retry_failed_replaces_old_failure_rows(tmp_path, monkeypatch, shapes_checkpoint):
    photos = make_photos(tmp_path, monkeypatch)
    output = tmp_path / "captions.jsonl"
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0
    shape_image("red", "circle", "left", 224).save(photos / "fake.jpg", "JPEG")  # now fixed

    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0
    assert "not a recognised image" in by_name(read_jsonl(output))["fake.jpg"]["error"]

    before = by_name(read_jsonl(output))
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0", "--retry-failed") == 0
    after = by_name(read_jsonl(output))
    assert set(after) == set(before)
    assert after["fake.jpg"]["error"] is None
    assert after["fake.jpg"]["caption"] == expected_caption("red", "circle", "left")
    assert "empty" in after["empty.png"]["error"]  # still bad: one fresh failure row
    assert all(after[name] == row for name, row in before.items() if row["error"] is None)


def test_exit_codes(tmp_path, monkeypatch, shapes_checkpoint):
    photos = make_photos(tmp_path, monkeypatch)
    bad_only = [photos / name for name in BAD]
    output = tmp_path / "out.jsonl"
    assert run(bad_only, output, shapes_checkpoint, "--num-workers", "0") == 1
    assert len(read_jsonl(output)) == len(BAD)
    (tmp_path / "nothing").mkdir()
    assert run(tmp_path / "nothing", tmp_path / "none.jsonl", shapes_checkpoint) == 1

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert run(photos, tmp_path / "a.jsonl", broken) == 2
    monkeypatch.setenv("CAPTIONER_WEIGHTS", str(tmp_path / "nothing"))
    assert caption_folder_main([str(photos), "-o", str(tmp_path / "b.jsonl")]) == 2
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()

    foreign = tmp_path / "notes.txt"  # -o pointing at someone else's file: refused, untouched
    foreign.write_text("shopping list\nmilk")
    assert run(photos / "red_left.jpg", foreign, shapes_checkpoint, "--num-workers", "0") == 2
    assert foreign.read_text() == "shopping list\nmilk"
    assert run(photos / "red_left.jpg", tmp_path / "nothing", shapes_checkpoint) == 2  # a folder


def test_attention_filenames_do_not_collide():
    names = {attention_filename(p) for p in ["a/b_c.jpg", "a_b/c.jpg", "a/b/c.jpg", "a__b/c.jpg"]}
    assert len(names) == 4
    long = attention_filename("x" * 300 + "/photo.jpg")
    assert len(long) < 100 and "photo.jpg" in long and long.endswith(".png")


# ----------------------------------------------------------------------------- odd names, CSV safety


def odd_names_folder(root: Path) -> tuple[Path, bytes, Path]:
    """A folder with a Latin-1 file name (not valid UTF-8) and a name that reads as a formula."""
    photos = root / "odd"
    photos.mkdir()
    latin1 = os.fsencode(photos) + b"/latin1_\xe9t\xe9.jpg"
    shape_image("red", "circle", "left").save(latin1.decode("utf-8", "surrogateescape"), "JPEG")
    formula = photos / "=HYPERLINK(1).jpg"
    shape_image("blue", "square", "right").save(formula, "JPEG")
    return photos, latin1, formula


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_file_names_that_are_not_utf8_are_captioned_recorded_exactly_and_resumed(
    tmp_path, shapes_checkpoint, suffix
):
    photos, latin1, formula = odd_names_folder(tmp_path)
    output = tmp_path / f"captions.{suffix}"
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0
    if suffix == "jsonl":
        records = read_jsonl(output)  # the file is valid UTF-8 JSON: \udcXX escapes
        assert "\\udce9" in output.read_text(encoding="utf-8")
    else:
        with output.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = list(csv.DictReader(f))  # the name's own bytes, as on the disk
        assert b"latin1_\xe9t\xe9.jpg" in output.read_bytes()
    paths = {os.fsencode(r["path"].removeprefix("'")): r for r in records}
    assert paths[latin1]["caption"] == expected_caption("red", "circle", "left")
    assert paths[os.fsencode(formula)]["caption"] == expected_caption("blue", "square", "right")

    before = output.read_bytes()
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0  # resumes: nothing to do
    assert output.read_bytes() == before


def test_csv_cells_that_would_run_as_formulas_are_neutralised(tmp_path, shapes_checkpoint, monkeypatch):
    """A path or error starting with = + - @ gets a leading ' in the CSV (OWASP's advice), and
    reading the file back to resume strips it again."""
    photos, _, _ = odd_names_folder(tmp_path)
    (photos / "+cmd.jpg").write_text("not an image")  # its error message starts with + too
    (photos / "@sum.jpg").symlink_to(photos / "=HYPERLINK(1).jpg")
    monkeypatch.chdir(photos)  # relative names: the cells start with the file name
    output = tmp_path / "captions.csv"
    names = ["=HYPERLINK(1).jpg", "+cmd.jpg", "@sum.jpg"]
    assert run(names, output, shapes_checkpoint, "--num-workers", "0") == 0
    with output.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "caption", "score", "width", "height", "error"]  # no --n-best column
    assert [row[0] for row in rows[1:]] == ["'=HYPERLINK(1).jpg", "'+cmd.jpg", "'@sum.jpg"]
    assert rows[2][5].startswith("'+cmd.jpg: not a recognised image")
    text_cells = [cell for row in rows[1:] for cell in (row[0], row[1], row[5])]
    assert not [c for c in text_cells if c[:1] in ("=", "+", "-", "@")]

    before = output.read_bytes()
    assert run(names, output, shapes_checkpoint, "--num-workers", "0") == 0  # all known: nothing new
    assert output.read_bytes() == before
    assert run(names, output, shapes_checkpoint, "--num-workers", "0", "--retry-failed") == 0
    with output.open(newline="", encoding="utf-8") as f:
        assert sorted(row[0] for row in list(csv.reader(f))[1:]) == sorted(f"'{n}" for n in names)


# ----------------------------------------------------------------------------- scale-out

ROOT = Path(__file__).resolve().parents[1]


def shapes_folder(root: Path) -> Path:
    photos = root / "shapes"
    photos.mkdir()
    for i, (image, _, _) in enumerate(all_examples()):
        image.save(photos / f"{i:02d}.jpg", quality=95)
    return photos


def captions_of(output: Path) -> dict[str, tuple[str, float]]:
    records = read_jsonl(output)
    assert len({r["path"] for r in records}) == len(records), "duplicate records"
    return {Path(r["path"]).name: (r["caption"], r["score"]) for r in records}


def test_shards_split_a_folder_into_disjoint_parts_that_merge_back(tmp_path, shapes_checkpoint):
    photos = shapes_folder(tmp_path)
    assert run(photos, tmp_path / "all.jsonl", shapes_checkpoint, "--num-workers", "0") == 0
    parts = [tmp_path / f"part{k}.jsonl" for k in range(2)]
    for k, part in enumerate(parts):
        assert run(photos, part, shapes_checkpoint, "--num-workers", "0", "--shard", f"{k}/2") == 0
    first, second = (set(captions_of(part)) for part in parts)
    assert first and second and not first & second
    assert first | second == set(captions_of(tmp_path / "all.jsonl"))
    # The split is by path: another spelling or order of the same files gives the same shards.
    shuffled = sorted(photos.glob("*.jpg"), reverse=True)
    assert {Path(p).name for p in select_shard([str(p) for p in shuffled], 0, 2)} == first

    merged = tmp_path / "merged.jsonl"
    again = tmp_path / "again.jsonl"  # a shard output listed twice must not duplicate records
    again.write_bytes(parts[0].read_bytes())
    assert caption_folder_main([str(parts[0]), str(parts[1]), str(again), "-o", str(merged), "--merge"]) == 0
    assert captions_of(merged) == captions_of(tmp_path / "all.jsonl")
    assert caption_folder_main([str(parts[0]), "-o", str(merged), "--merge"]) == 2  # never overwrites


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.slow
def test_torchrun_ranks_caption_their_shards_like_one_process(tmp_path, shapes_checkpoint):
    photos = shapes_folder(tmp_path)
    flags = ["--checkpoint", str(shapes_checkpoint), "--num-workers", "0", "--no-progress"]
    assert run(photos, tmp_path / "one.jsonl", shapes_checkpoint, "--num-workers", "0") == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "scripts/caption_folder.py",
        str(photos),
        "-o",
        str(tmp_path / "out.jsonl"),
        *flags,
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ranks = [tmp_path / f"out.rank{k}.jsonl" for k in range(2)]
    assert all(captions_of(r) for r in ranks) and not (tmp_path / "out.jsonl").exists()
    assert caption_folder_main([*map(str, ranks), "-o", str(tmp_path / "out.jsonl"), "--merge"]) == 0
    one, merged = captions_of(tmp_path / "one.jsonl"), captions_of(tmp_path / "out.jsonl")
    assert merged.keys() == one.keys()
    for name, (caption, score) in one.items():
        assert merged[name][0] == caption and merged[name][1] == pytest.approx(score, abs=1e-3)


@pytest.mark.slow
def test_a_killed_rank_resumes_its_shard(tmp_path, shapes_checkpoint):
    """What one torchrun rank sees (RANK, WORLD_SIZE), killed with SIGKILL mid-run, then rerun."""
    photos = shapes_folder(tmp_path)
    rank_env = subprocess_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0")
    command = [
        sys.executable,
        "scripts/caption_folder.py",
        str(photos),
        "-o",
        str(tmp_path / "out.jsonl"),
        "--checkpoint",
        str(shapes_checkpoint),
        "--num-workers",
        "0",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    output = tmp_path / "out.rank1.jsonl"
    proc = subprocess.Popen(
        command, cwd=ROOT, env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.read_text().count("\n") >= 1):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no record within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    partial = output.read_text().count("\n")
    expected = {Path(p).name for p in select_shard(find_inputs([photos]), 1, 2)}
    assert 1 <= partial <= len(expected)
    done = subprocess.run(command, cwd=ROOT, env=rank_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(captions_of(output)) == expected
