"""The batch captioner and model folders when a run meets another run, a pipe, a full disk, a
hand-edited or spreadsheet-saved output, a typo, or several machines (issue 33)."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner import Captioner
from captioner.cli.main import caption_folder_main
from captioner.files import exclusive_lock
from captioner.serving import captioner as captioner_module
from captioner.serving.batch import caption_files
from captioner.serving.hub import ModelNotFoundError
from captioner.serving.inputs import find_inputs, select_shard
from captioner.serving.records import lock_path
from captioner.serving.settings import BatchSettings

from .shapes import all_examples, shape_image
from .test_batch import ROOT, read_jsonl, run, subprocess_env

SETTINGS = BatchSettings(num_workers=0, progress=False)


@pytest.fixture(scope="module")
def captioner(shapes_checkpoint):
    return Captioner.from_pretrained(shapes_checkpoint, device="cpu")


def small_folder(root: Path, count: int = 4) -> Path:
    """`count` shape photos, some in a subfolder."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, (image, _, _) in enumerate(all_examples()[:count]):
        image.save(photos / ("sub" if i % 2 else "") / f"{i:02d}.jpg", quality=95)
    return photos


def no_model_load(monkeypatch) -> None:
    """Loading the model fails the test: the command must have stopped before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(captioner_module.Captioner, "from_pretrained", refuse)


# ----------------------------------------------------------------------------- inputs (33.3, 33.19, 34.3)


def test_shards_are_the_same_on_every_machine_wherever_the_folder_is(
    tmp_path, shapes_checkpoint, monkeypatch
):
    """Issue 33.3: the same photos at m1/photos and m2/home/u/photos, each machine running from
    its own folder, shard by the path relative to the input: every photo in exactly one shard."""
    m1 = tmp_path / "m1"
    photos = small_folder(m1, 8)
    m2 = tmp_path / "m2" / "home" / "u"
    shutil.copytree(photos, m2 / "photos")
    parts = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]
    for k, machine in enumerate((m1, m2)):
        monkeypatch.chdir(machine)
        assert run("photos/", parts[k], shapes_checkpoint, "--num-workers", "0", "--shard", f"{k}/2") == 0
    names = [os.path.relpath(r["path"], "photos") for part in parts for r in read_jsonl(part)]
    assert sorted(names) == sorted(os.path.relpath(p, photos) for p in find_inputs([photos]))
    keys = find_inputs(["photos/"])
    assert sorted(keys.values()) == sorted(names)  # the key: the path below the input folder
    # A glob's key is its path below the pattern's folder part; a file alone is keyed by its name.
    assert set(find_inputs(["photos/**/*.jpg"]).values()) == set(keys.values())
    assert select_shard(find_inputs(["photos/00.jpg"]), 0, 2) == select_shard(["photos/00.jpg"], 0, 2)


def test_an_input_that_names_nothing_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Issue 34.3: one line naming the path, exit status 2, no output file, no model load."""
    no_model_load(monkeypatch)
    output = tmp_path / "out.jsonl"
    assert caption_folder_main(["/nope", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: /nope: no such file or folder"
    assert not output.exists()
    assert caption_folder_main([str(tmp_path / "*.png"), "-o", str(output)]) == 2  # matches nothing
    assert "*.png: no such file or folder" in capsys.readouterr().err and not output.exists()


def test_an_empty_shard_is_not_a_failure(tmp_path, capsys, monkeypatch):
    """Issue 33.19: --shard 10/20 of a 3-file folder: exit 0 with a note, an empty output for
    --merge, and no model load."""
    photos = small_folder(tmp_path, 3)
    empty = next(k for k in range(20) if not select_shard(find_inputs([photos]), k, 20))
    no_model_load(monkeypatch)
    output = tmp_path / "part.jsonl"
    assert caption_folder_main([str(photos), "-o", str(output), "--shard", f"{empty}/20"]) == 0
    assert f"note: shard {empty}/20 holds none of the 3 files found" in capsys.readouterr().err
    assert output.read_text() == ""
    csv_output = tmp_path / "part.csv"
    assert caption_folder_main([str(photos), "-o", str(csv_output), "--shard", f"{empty}/20"]) == 0
    assert csv_output.read_text() == "path,caption,score,width,height,error\n"


# ----------------------------------------------------------------------------- output (33.4-6, 12, 13b, 17)


def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(
    tmp_path, shapes_checkpoint, capsys
):
    """Issue 33.4: another run holds the output's lock: refused at once, the file untouched."""
    photos = small_folder(tmp_path)
    output = tmp_path / "out.jsonl"
    output.write_text("")
    with exclusive_lock(lock_path(output), wait=False):  # what a running caption_files holds
        assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 2
        err = capsys.readouterr().err
        assert f"another captioner run is writing {output} (process {os.getpid()})" in err
        assert output.read_text() == ""
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0  # released: goes on
    assert len(read_jsonl(output)) == 4


@pytest.mark.slow
def test_records_stream_to_a_pipe_without_resume(tmp_path, shapes_checkpoint):
    """Issue 33.5: `-o /dev/stdout | cat` hung reading the pipe back; records stream, the summary
    goes to stderr."""
    photos = small_folder(tmp_path)
    command = [
        sys.executable,
        "scripts/caption_folder.py",
        str(photos),
        "-o",
        "/dev/stdout",
        "--checkpoint",
        str(shapes_checkpoint),
        "--num-workers",
        "0",
        "--no-progress",
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 4 and all(r["caption"] for r in records)
    assert "captioned 4" in done.stderr


def test_a_full_device_is_a_clear_output_error(tmp_path, shapes_checkpoint, capsys):
    """Issues 33.5 and 33.6: /dev/full is not read back (it never ends), and ENOSPC ends the run
    with the OutputError and exit status 2, not an OSError from closing the file."""
    photos = small_folder(tmp_path)
    for suffix in ("jsonl", "csv"):
        code = run(photos, Path("/dev/full"), shapes_checkpoint, "--num-workers", "0", "--format", suffix)
        assert code == 2
        err = capsys.readouterr().err
        assert "error: cannot write /dev/full" in err and "No space left on device" in err, err


@pytest.mark.slow
def test_a_full_disk_on_a_regular_file_exits_2_with_one_line(tmp_path, shapes_checkpoint):
    """Issue 33.6: the file-size limit stands in for a disk filling up mid-run (Python ignores
    SIGXFSZ, so the write fails with EFBIG as it would with ENOSPC)."""
    photos = small_folder(tmp_path)
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

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # one or two records

    done = subprocess.run(
        command,
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"error: cannot write {tmp_path / 'out.jsonl'}: [Errno 27] File too large" in done.stderr


def test_a_hand_edited_last_line_without_newline_is_kept(tmp_path, captioner):
    """Issue 33.12: a complete record missing only its newline is not cut off and re-captioned."""
    photos = small_folder(tmp_path)
    paths = sorted(find_inputs([photos]))
    output = tmp_path / "out.jsonl"
    caption_files(captioner, paths[:2], output, settings=SETTINGS)
    lines = output.read_text().splitlines()
    edited = {**json.loads(lines[1]), "caption": "fixed by hand"}
    output.write_text(lines[0] + "\n" + json.dumps(edited))  # an editor saved it without the newline
    summary = caption_files(captioner, paths, output, settings=SETTINGS)
    assert (summary.already_done, summary.captioned) == (2, 2)
    records = read_jsonl(output)
    assert len(records) == 4 and records[1] == edited
    assert output.read_text().endswith("}\n")


def test_merge_only_reads_its_inputs(tmp_path, captioner):
    """Issue 33.13b: a shard with a partial last line is merged without it and left as it was;
    a complete last line without its newline is merged."""
    photos = small_folder(tmp_path)
    paths = sorted(find_inputs([photos]))
    shards = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]
    caption_files(captioner, paths[:2], shards[0], settings=SETTINGS)
    caption_files(captioner, paths[2:], shards[1], settings=SETTINGS)
    with shards[0].open("a") as f:
        f.write('{"path": "' + str(photos / "half"))  # a killed shard
    shards[1].write_bytes(shards[1].read_bytes().rstrip(b"\n"))
    before = [s.read_bytes() for s in shards]
    merged = tmp_path / "all.jsonl"
    assert caption_folder_main([*map(str, shards), "-o", str(merged), "--merge"]) == 0
    assert [s.read_bytes() for s in shards] == before
    assert sorted(r["path"] for r in read_jsonl(merged)) == paths


@pytest.mark.parametrize("encoding, newline", [("utf-8", "\r\n"), ("utf-8-sig", "\n"), ("utf-8-sig", "\r\n")])
def test_a_csv_re_saved_by_a_spreadsheet_resumes(tmp_path, shapes_checkpoint, encoding, newline):
    """Issue 33.17: CRLF line ends and a byte-order mark (Excel) are read back like our own CSV."""
    photos = small_folder(tmp_path)
    output = tmp_path / "out.csv"
    first = sorted(find_inputs([photos]))[:2]
    assert run(first, output, shapes_checkpoint, "--num-workers", "0") == 0
    text = output.read_text(encoding="utf-8")
    output.write_bytes(text.replace("\n", newline).encode(encoding))
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0") == 0
    rows = output.read_text(encoding="utf-8-sig").splitlines()[1:]
    assert len(rows) == 4 and len({row.split(",")[0] for row in rows}) == 4


# ----------------------------------------------------------------------------- --focus-json (33.18)


def test_focus_json_names_unmatched_paths_refuses_non_boxes_and_records_the_box(
    tmp_path, shapes_checkpoint, capsys
):
    photos = small_folder(tmp_path)
    paths = sorted(find_inputs([photos]))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({paths[0]: [0, 0, 112, 224], str(photos / "typo.jpg"): [0, 0, 10, 10]}))
    output = tmp_path / "out.jsonl"
    assert run(photos, output, shapes_checkpoint, "--num-workers", "0", "--focus-json", str(boxes)) == 0
    assert f"1 of 2 paths match no input image: {str(photos / 'typo.jpg')!r}" in capsys.readouterr().err
    records = {r["path"]: r for r in read_jsonl(output)}
    assert records[paths[0]]["focus"] == [0, 0, 112, 224]
    assert all(records[p]["focus"] is None for p in paths[1:])
    assert list(records[paths[0]])[-2:] == ["focus", "error"]
    csv_output = tmp_path / "out.csv"
    flags = ("--num-workers", "0", "--focus-json", str(boxes))
    assert run(paths[:2], csv_output, shapes_checkpoint, *flags) == 0
    rows = csv_output.read_text().splitlines()
    assert rows[0] == "path,caption,score,width,height,focus,error"
    assert '"[0.0, 0.0, 112.0, 224.0]"' in rows[1] and rows[2].endswith(",,")

    boxes.write_text(json.dumps({paths[0]: "0099"}))  # four characters are not four numbers
    with pytest.raises(SystemExit) as exit_:
        run(photos, tmp_path / "other.jsonl", shapes_checkpoint, "--focus-json", str(boxes))
    assert exit_.value.code == 2
    assert "focus box must be four numbers (x0, y0, x1, y1), got '0099'" in capsys.readouterr().err


def test_a_bad_region_given_to_caption_files_is_an_error_row(tmp_path, captioner):
    photos = small_folder(tmp_path)
    paths = sorted(find_inputs([photos]))
    mask = np.zeros((224, 224), dtype=bool)
    mask[:, :112] = True
    output = tmp_path / "out.jsonl"
    summary = caption_files(
        captioner, paths[:3], output, settings=SETTINGS, focus={paths[0]: "0099", paths[1]: mask}
    )
    assert (summary.captioned, summary.failed) == (2, 1)
    records = read_jsonl(output)
    assert "focus box must be four numbers" in records[0]["error"] and records[0]["focus"] is None
    assert records[1]["focus"] == "mask" and records[1]["caption"]
    assert records[2]["focus"] is None and records[2]["caption"]


# ----------------------------------------------------------------------------- model folders (33.13a, 33.23)


def test_save_pretrained_copies_only_card_images_inside_both_folders(shapes_checkpoint, tmp_path):
    """Issue 33.13a: a card showing ../secret_outside.png must not make saving write outside."""
    source = tmp_path / "src" / "m"
    shutil.copytree(shapes_checkpoint, source)
    shape_image("red", "circle", "left").save(tmp_path / "src" / "secret_outside.png")
    shape_image("red", "circle", "left").save(source / "figure.png")
    (source / "MODEL_CARD.md").write_text(
        f"# m\n![x](../secret_outside.png) ![y](figure.png) ![z]({tmp_path / 'src' / 'secret_outside.png'})\n"
    )
    target = Captioner.from_pretrained(source).save_pretrained(tmp_path / "exp_out" / "m")
    assert (target / "figure.png").is_file() and (target / "MODEL_CARD.md").is_file()
    assert sorted(p.name for p in (tmp_path / "exp_out").iterdir()) == ["m"]


def test_a_model_path_that_is_a_symlink_loop_is_a_local_error(tmp_path, monkeypatch):
    """Issue 33.23: not reported as a Hub repo that could not be resolved."""
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    os.symlink("missing", "gone")
    with pytest.raises(ModelNotFoundError, match="model path loop: a symbolic link loop"):
        Captioner.from_pretrained("loop")
    with pytest.raises(ModelNotFoundError, match="model path gone: a broken symbolic link"):
        Captioner.from_pretrained("gone")
