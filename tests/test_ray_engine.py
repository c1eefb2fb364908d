"""captioner caption --engine ray: the same records as the plain run, a killed actor loses and
repeats nothing after --merge, reruns skip done images, clear errors. A small local Ray (2 CPUs)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from captioner.cli.main import main
from captioner.serving.records import path_key

from .shapes import shape_image
from .test_batch import MAX_PIXELS, make_photos

ROOT = Path(__file__).resolve().parents[1]
ACTOR_TITLE = b"ray::MapWorker(MapBatches(CaptionActor))"


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray for the module: 2 CPUs, a 300 MB object store, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def caption(*args: object) -> int:
    return main(["caption", *map(str, args), "--no-progress", "--num-workers", "0"])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def comparable(record: dict) -> tuple:
    """A record, its path as a key and its score to 3 decimals (batches differ between runs)."""
    score = None if record["score"] is None else round(record["score"], 3)
    return (
        path_key(record["path"]),
        record["caption"],
        score,
        record["width"],
        record["height"],
        record["error"],
    )


def shapes_folder(root: Path, count: int) -> Path:
    folder = root / "shapes"
    folder.mkdir()
    colours, shapes, sides = ("red", "green", "blue", "yellow"), ("circle", "square"), ("left", "right")
    for i in range(count):
        image = shape_image(colours[i % 4], shapes[i // 4 % 2], sides[i // 8 % 2], 128 + i)
        image.save(folder / f"{i:03d}.png")
    return folder


def actor_pids() -> set[int]:
    """The processes running our Ray Data actors (Ray names them by the class they run)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(ACTOR_TITLE):
                pids.add(int(entry.name))
        except OSError:
            continue  # ended while we looked
    return pids


@pytest.mark.slow
def test_ray_gives_the_plain_runs_records_and_a_rerun_skips_them(
    ray_session, shapes_checkpoint, tmp_path, capsys
):
    with pytest.MonkeyPatch.context() as patch:  # as root, a denied file is simulated in-process only:
        photos = make_photos(tmp_path, patch)  # leave it readable, so both runs see the same files
    model = ["--model", shapes_checkpoint, "--max-pixels", MAX_PIXELS, "--batch-size", 2]
    assert caption(photos, "-o", tmp_path / "plain.jsonl", *model) == 0
    out = tmp_path / "out"
    assert caption(photos, "-o", out, "--engine", "ray", "--concurrency", 2, *model) == 0
    assert main(["caption", "--merge", str(out), "-o", str(tmp_path / "merged.jsonl")]) == 0
    plain, merged = records(tmp_path / "plain.jsonl"), records(tmp_path / "merged.jsonl")
    assert sorted(map(comparable, merged)) == sorted(map(comparable, plain))
    assert any(r["error"] for r in merged) and any(r["caption"] for r in merged)

    capsys.readouterr()
    assert caption(photos, "-o", out, "--engine", "ray", *model) == 0  # everything done: Ray not needed
    assert f"captioned 0, failed 0, skipped {sum(not r['error'] for r in plain)}" in capsys.readouterr().out
    shape_image("blue", "circle", "left", 200).save(photos / "new.png")
    assert caption(photos, "-o", out, "--engine", "ray", *model) == 0
    assert "captioned 1, failed 0" in capsys.readouterr().out
    parts = sorted(out.glob("part-*.jsonl"))
    assert [r["path"] for r in records(parts[-1])] == [str(photos / "new.png")]


@pytest.mark.slow
def test_a_killed_actor_loses_and_repeats_nothing_after_merge(ray_session, shapes_checkpoint, tmp_path):
    folder, out = shapes_folder(tmp_path, 64), tmp_path / "out"
    args = [folder, "-o", out, "--engine", "ray", "--model", shapes_checkpoint, "--batch-size", 1]
    args += ["--beam-size", 8, "--concurrency", 1]  # slow enough batches to land the kill mid-run
    status: list[int] = []
    run = threading.Thread(target=lambda: status.append(caption(*args)))
    run.start()
    part, killed = out / "part-00000.jsonl", set()
    deadline = time.monotonic() + 300
    while run.is_alive() and not killed and time.monotonic() < deadline:
        if part.exists() and part.read_text():  # after the first records: mid-run
            written_before = len(part.read_text().splitlines())
            killed = actor_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    run.join(timeout=600)
    assert killed and written_before < 64, "the run ended before an actor could be killed"
    assert status == [0]
    merged = tmp_path / "merged.jsonl"
    assert main(["caption", "--merge", str(out), "-o", str(merged)]) == 0
    captioned = records(merged)
    assert sorted(r["path"] for r in captioned) == sorted(str(p) for p in folder.iterdir())
    assert all(r["error"] is None and r["caption"] for r in captioned)


def test_an_empty_source_a_bad_uri_and_a_missing_input_are_one_line_errors(tmp_path, capsys):
    pytest.importorskip("pyarrow")  # lists URIs; comes with ray
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "empty": "no image files in",
        "nosuch://bucket/photos": "nosuch://bucket/photos: cannot list it",
        tmp_path / "missing": f"{tmp_path / 'missing'}: no such file or folder",
    }
    for source, message in cases.items():
        capsys.readouterr()
        assert caption(source, "-o", tmp_path / "out", "--engine", "ray") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not list(tmp_path.glob("out/part-*"))  # nothing written


@pytest.mark.slow
def test_an_unreachable_cluster_is_a_one_line_error_at_once(tmp_path, shapes_checkpoint):
    pytest.importorskip("ray")
    shape_image("red", "circle", "left", 128).save(tmp_path / "one.png")
    args = ["one.png", "-o", "out", "--engine", "ray", "--ray-address", "127.0.0.1:1"]
    result = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", *args, "--model", str(shapes_checkpoint)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,  # ray.init alone would wait for many minutes
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: cannot reach the Ray cluster at 127.0.0.1:1: [Errno 111] Connection refused"
    ]


def test_without_ray_everything_else_works_and_the_engine_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if not installed: `import ray` fails
        "import captioner\n"
        "from captioner.cli.main import main\n"
        "from captioner.serving.ray_engine import RayEngineError, import_ray\n"
        "try:\n    import_ray()\nexcept RayEngineError as err:\n    print(err)\n"
        "main(['caption', '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert 'pip install "captioner[ray]"' in result.stdout.splitlines()[0]
    assert "--engine {local,ray}" in result.stdout and result.returncode == 0


@pytest.mark.slow
def test_the_actor_captions_bytes_and_uris_as_the_plain_run_captions_files(
    shapes_checkpoint, tmp_path, capsys
):
    """CaptionActor alone (what each Ray actor runs): files given as bytes (read_binary_files'
    batches) or as file:// URIs give the plain run's records."""
    pytest.importorskip("pyarrow")
    import numpy as np

    from captioner.serving.ray_engine import CaptionActor, list_sources

    with pytest.MonkeyPatch.context() as patch:
        photos = make_photos(tmp_path, patch)
    plain_args = ["--model", shapes_checkpoint, "--max-pixels", MAX_PIXELS]
    assert caption(photos, "-o", tmp_path / "plain.jsonl", *plain_args) == 0
    by_path = {r["path"]: r for r in records(tmp_path / "plain.jsonl")}
    files = [p for p in by_path if os.path.isfile(p)]  # not the broken link
    actor = CaptionActor(model=str(shapes_checkpoint), max_pixels=MAX_PIXELS)

    batch = {"path": np.array(files), "bytes": np.array([Path(p).read_bytes() for p in files], dtype=object)}
    from_bytes = [json.loads(line) for line in actor(batch)["record"]]
    assert [r["path"] for r in from_bytes] == files
    assert [comparable(r) for r in from_bytes] == [comparable(by_path[p]) for p in files]

    uris = sorted(list_sources([f"file://{photos}"]))  # every image-extension file, hidden ones not
    assert [u.removeprefix("file://") for u in uris] == sorted(p for p in files if not p.endswith(".dat"))
    from_uris = [json.loads(line) for line in actor({"path": np.array(uris)})["record"]]
    assert [r["caption"] for r in from_uris] == [by_path[u.removeprefix("file://")]["caption"] for u in uris]
