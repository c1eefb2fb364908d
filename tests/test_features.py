"""The feature cache: keyed by what determines the features, resumable, loud about bad images.

Reuse of the cache by a second train() run is checked in test_training.py.
"""

import copy
import errno
import os
import re
import shutil
import sys
import threading

import numpy as np
import pytest
import torch

from captioner.data.feature_cache import FeatureCache, FeatureCacheError, encoder_key
from captioner.data.images import ImageLoadError
from captioner.files import DiskFullError, reserve_space
from captioner.model.encoder import Encoder

from .shapes import write_coco_dataset


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder("efficientnet_lite0", image_size=128).eval()


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    _, image_dir = write_coco_dataset(tmp_path_factory.mktemp("shapes"))
    return sorted(image_dir.glob("*.jpg"))


@pytest.fixture(scope="module")
def fresh_grids(encoder, image_paths) -> torch.Tensor:
    """What the encoder computes for every image, in fp32, without any cache."""
    from captioner.data.images import load_image

    with torch.inference_mode():
        return encoder(torch.stack([encoder.transform(load_image(p)) for p in image_paths]))


def test_cache_key_names_backbone_input_size_and_grid(encoder, image_paths, tmp_path):
    assert re.fullmatch(r"efficientnet_lite0-128px-4x4-[0-9a-f]{8}", encoder_key(encoder))
    larger = Encoder("efficientnet_lite0", image_size=160, weights="random")
    coarser = Encoder("efficientnet_lite0", image_size=128, grid_size=2, weights="random")
    folders = {FeatureCache(tmp_path, e, image_paths).folder for e in (encoder, larger, coarser)}
    assert len(folders) == 3
    # Another image list under the same encoder is another file in the same folder.
    whole = FeatureCache(tmp_path, encoder, image_paths)
    part = FeatureCache(tmp_path, encoder, image_paths[:8])
    assert whole.folder == part.folder and whole.features_file != part.features_file


def test_an_encoder_with_other_weights_never_reads_these_grids(encoder, image_paths, tmp_path):
    """A fine-tuned encoder (say, an exported model's) computes other grids than the ImageNet
    backbone of the same shape: its cache is another folder."""
    tuned = copy.deepcopy(encoder)
    with torch.no_grad():
        tuned.stages[-1][0].weight.mul_(1.01)
    assert (
        FeatureCache(tmp_path, tuned, image_paths).folder
        != FeatureCache(tmp_path, encoder, image_paths).folder
    )
    # A stage cache depends only on the stages below its stage.
    assert (
        FeatureCache(tmp_path, tuned, image_paths, stage=8).folder
        == FeatureCache(tmp_path, encoder, image_paths, stage=8).folder
    )
    assert (
        FeatureCache(tmp_path, tuned, image_paths, stage=8).folder
        != FeatureCache(tmp_path, encoder, image_paths, stage=7).folder
    )


@pytest.mark.parametrize("stage", [6, 8])
def test_stage_cache_holds_what_enters_the_stage(encoder, image_paths, fresh_grids, tmp_path, stage):
    """The encoder's stages from K on, run on the cached activations entering stage K, give the
    grids of the photos (to fp16 rounding of the activations)."""
    cache = FeatureCache(tmp_path, encoder, image_paths, stage=stage)
    assert re.fullmatch(rf"efficientnet_lite0-128px-stage{stage}-[0-9a-f]{{8}}", cache.folder.name)
    cache.extract(batch_size=8, num_workers=0, progress=False)
    activations = cache.batch(range(16))
    assert activations.shape == (16, *encoder.stage_input_shape(stage))
    with torch.inference_mode():
        grids = encoder(activations, from_stage=stage)
    torch.testing.assert_close(grids, fresh_grids, rtol=1e-2, atol=1e-2)


def test_mirrored_cache_holds_the_grids_of_the_mirrored_photos(encoder, image_paths, fresh_grids, tmp_path):
    from PIL import ImageOps

    from captioner.data.images import load_image

    mirrored = FeatureCache(tmp_path, encoder, image_paths, mirrored=True)
    plain = FeatureCache(tmp_path, encoder, image_paths)
    assert mirrored.folder.name == f"{plain.folder.name}-hflip"
    assert mirrored.extract(batch_size=8, num_workers=0, progress=False)["copied"] == 0  # not plain rows
    with torch.inference_mode():
        expected = encoder(
            torch.stack([encoder.transform(ImageOps.mirror(load_image(p))) for p in image_paths])
        )
    assert torch.allclose(mirrored.batch(range(16)), expected, rtol=2e-3, atol=2e-3)
    # Not the plain grids, and not the plain grids mirrored cell by cell either.
    assert not torch.allclose(expected, fresh_grids, atol=1e-2)
    side = encoder.grid_size
    cellwise = fresh_grids.view(16, side, side, -1).flip(2).reshape(16, side * side, -1)
    assert not torch.allclose(expected, cellwise, atol=1e-2)


def test_extraction_resumes_after_an_interruption(encoder, image_paths, fresh_grids, tmp_path):
    cache = FeatureCache(tmp_path, encoder, image_paths)
    with pytest.raises(RuntimeError, match="incomplete"):
        cache.batch([0])
    stats = cache.extract(batch_size=8, num_workers=0, progress=False)
    assert (stats["images"], stats["already_cached"]) == (16, 0)
    assert cache.is_complete()
    first = np.array(cache.load())
    assert torch.allclose(cache.batch(range(16)), fresh_grids, rtol=2e-3, atol=2e-3)  # fp16 storage

    # An interruption: rows never marked done (and their half-written data is garbage).
    lost = [3, 7, 12]
    done = np.memmap(cache.done_file, dtype=np.uint8, mode="r+", shape=(16,))
    done[lost] = 0
    done.flush()
    features = np.memmap(cache.features_file, dtype=np.float16, mode="r+", shape=cache.shape)
    features[lost] = 1e4
    features.flush()
    del done, features

    resumed = FeatureCache(tmp_path, encoder, image_paths)
    assert resumed.missing_rows().tolist() == lost
    stats = resumed.extract(batch_size=8, num_workers=0, progress=False)
    assert (stats["images"], stats["already_cached"]) == (3, 13)
    again = np.array(resumed.load())
    kept = [r for r in range(16) if r not in lost]
    assert np.array_equal(again[kept], first[kept])  # untouched rows were not recomputed
    assert torch.allclose(resumed.batch(range(16)), fresh_grids, rtol=2e-3, atol=2e-3)
    # batch() returns rows in the order asked for, whatever order it reads them in
    assert torch.equal(resumed.batch([12, 0, 7]), resumed.batch(range(16))[[12, 0, 7]])

    assert resumed.extract(num_workers=0, progress=False)["images"] == 0


def test_a_new_image_list_copies_what_other_caches_computed(
    encoder, image_paths, fresh_grids, tmp_path, monkeypatch
):
    """Images shared with an earlier list (the dev half of a train+dev cache) are not re-encoded."""
    first = FeatureCache(tmp_path / "cache", encoder, image_paths[:10])
    first.extract(batch_size=8, num_workers=0, progress=False)
    monkeypatch.chdir(image_paths[0].parent)  # the same images, named by relative paths
    overlapping = [p.name for p in image_paths[4:16]]  # 6 shared, 6 new
    cache = FeatureCache(tmp_path / "cache", encoder, overlapping)
    stats = cache.extract(batch_size=8, num_workers=0, progress=False)
    assert (stats["copied"], stats["images"]) == (6, 6)
    assert np.array_equal(np.array(cache.load())[:6], np.array(first.load())[4:10])
    assert torch.allclose(cache.batch(range(12)), fresh_grids[4:16], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl file locks on Windows")
def test_a_second_process_waits_while_another_creates_the_same_cache(
    encoder, image_paths, fresh_grids, tmp_path
):
    """Two evaluations started together once truncated each other's new cache: creation is locked."""
    import fcntl

    cache = FeatureCache(tmp_path, encoder, image_paths[:6])
    cache.folder.mkdir(parents=True)
    with open(cache.stem.with_suffix(".lock"), "a") as held:  # another process creating the cache
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=cache.extract, kwargs={"num_workers": 0, "progress": False}, daemon=True
        )  # a hang fails the test, not the whole run
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not cache.done_file.exists()  # waiting, nothing written
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert not worker.is_alive() and cache.is_complete()
    assert torch.allclose(cache.batch(range(6)), fresh_grids[:6], rtol=2e-3, atol=2e-3)


def test_unreadable_image_stops_extraction_and_the_rest_is_kept(encoder, image_paths, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [*image_paths[:4], broken]
    cache = FeatureCache(tmp_path / "cache", encoder, paths)
    with pytest.raises(ImageLoadError, match="1 images could not be read") as err:
        cache.extract(batch_size=2, num_workers=0, progress=False)
    assert "broken.jpg" in str(err.value)
    assert cache.missing_rows().tolist() == [4]  # the readable images need not be redone
    with pytest.raises(RuntimeError, match="incomplete"):
        cache.load()


def test_a_cache_can_be_filled_in_part_and_read_where_filled(encoder, image_paths, tmp_path):
    """extract(rows=...) computes just those rows (say, the first 2,000 of a COCO-sized list) and
    batch() reads them before the rest exists; asking for a missing row is a clear error."""
    cache = FeatureCache(tmp_path / "cache", encoder, image_paths[:6])
    stats = cache.extract(num_workers=0, progress=False, rows=[1, 3])
    assert stats["images"] == 2 and cache.missing_rows().tolist() == [0, 2, 4, 5]
    full = FeatureCache(tmp_path / "full", encoder, image_paths[:6])
    full.extract(num_workers=0, progress=False)
    assert torch.equal(cache.batch([3, 1]), full.batch([3, 1]))
    with pytest.raises(RuntimeError, match="incomplete: it lacks some of rows"):
        cache.batch([1, 2])


# ----------------------------------------------------------------------------- disks and damaged files


def allocated(path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.skipif(sys.platform == "win32", reason="st_blocks: POSIX only")
def test_the_cache_file_gets_its_disk_blocks_before_rows_are_written(encoder, image_paths, tmp_path):
    """A sparse memory-mapped file on a disk that fills up kills the process with SIGBUS ("Bus
    error", exit 135, no message): the whole file is allocated first. (What this proves: the
    blocks are reserved, so writing the rows needs no new ones; it does not fill a disk.)"""
    cache = FeatureCache(tmp_path, encoder, image_paths)
    cache.extract(num_workers=0, progress=False, rows=[0])  # one row of 16 written
    assert cache.features_file.stat().st_size == cache.nbytes
    assert allocated(cache.features_file) >= cache.nbytes
    assert allocated(cache.done_file) >= len(image_paths)


def test_a_cache_larger_than_the_free_space_is_refused_before_anything_is_allocated(
    encoder, image_paths, tmp_path
):
    """Asked for 41 TB (an absurd list size on this small fixture), extraction stops at once
    with the size and the path, and no file was allocated."""
    cache = FeatureCache(tmp_path, encoder, image_paths)
    cache.shape = (10**9, *cache.shape[1:])
    message = rf"disk full: needs 40960.00 GB at {re.escape(str(cache.features_file))} \([0-9.]+ [GM]B free\)"
    with pytest.raises(DiskFullError, match=message + ".*--cache-dir"):
        cache.extract(num_workers=0, progress=False)
    assert not cache.done_file.exists()  # not created: the next run tries again
    assert not cache.features_file.exists() or allocated(cache.features_file) == 0
    with pytest.raises(DiskFullError, match="disk full: needs"):
        reserve_space(tmp_path / "huge.bin", shutil.disk_usage(tmp_path).free + 10**9)
    assert not (tmp_path / "huge.bin").exists()


@pytest.mark.parametrize("damaged", [".f16", ".done"])
def test_a_truncated_cache_file_is_named_with_what_to_do(encoder, image_paths, tmp_path, damaged):
    """A cache copied half-way (or cut by a full disk): was `ValueError: mmap length is greater
    than file size`."""
    FeatureCache(tmp_path, encoder, image_paths[:4]).extract(num_workers=0, progress=False)
    cache = FeatureCache(tmp_path, encoder, image_paths[:4])
    path = cache.stem.with_suffix(damaged)
    os.truncate(path, path.stat().st_size // 2)
    message = rf"feature cache file {re.escape(str(path))} is [0-9,]+ bytes, expected [0-9,]+ .*delete"
    for use in (cache.load, lambda: cache.batch([0])):
        with pytest.raises(FeatureCacheError, match=message):
            use()
    if damaged == ".f16":  # extraction goes on only with rows to do (and must not pad the file)
        done = np.memmap(cache.done_file, dtype=np.uint8, mode="r+")
        done[3] = 0
        done.flush()
        del done
    with pytest.raises(FeatureCacheError, match=message):
        cache.extract(num_workers=0, progress=False)
    assert path.stat().st_size < (cache.nbytes if damaged == ".f16" else len(cache.paths))


def test_a_cache_folder_that_cannot_be_written_is_named(encoder, image_paths, tmp_path, monkeypatch):
    """A new --cache-dir on a read-only file system (or where a file stands) was a raw OSError.
    The read-only mount is simulated (tests run as root, and cannot mount); the file is real."""
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a folder")
    message = rf"cannot write the feature cache in {re.escape(str(in_the_way))}.*give a writable folder"
    with pytest.raises(FeatureCacheError, match=message + r" \(--cache-dir\)"):
        FeatureCache(in_the_way / "cache", encoder, image_paths[:2]).extract(num_workers=0, progress=False)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(FeatureCacheError, match=r"\(Read-only file system\): give a writable folder"):
        FeatureCache(tmp_path / "ro", encoder, image_paths[:2]).extract(num_workers=0, progress=False)
