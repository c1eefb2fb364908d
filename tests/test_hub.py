"""Hugging Face Hub models without a network: repo ids resolved from a cache laid out the way
huggingface_hub lays it out (HF_HUB_OFFLINE=1), save_pretrained's folder, push_to_hub's upload."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

from captioner import Captioner, ModelNotFoundError, save_model

from .shapes import all_examples

REPO = "someuser/captioner-shapes"
COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40
IMAGES = [img for img, _, _ in all_examples()[::6]]


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: list[str]) -> Path:
    """What snapshot_download leaves behind: blobs named by their etag (sha256 for LFS files, the
    git blob id for others), snapshots/<commit>/<file> symlinks into blobs, refs/<name> -> commit."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        content = file.read_bytes()
        etag = hashlib.sha256(content).hexdigest() if file.suffix == ".safetensors" else git_blob_id(content)
        (storage / "blobs" / etag).write_bytes(content)
        (snapshot / file.name).symlink_to(Path("../../blobs") / etag)
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty offline Hub cache (huggingface_hub reads these settings once, at import)."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: tests never reach the network
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def other_checkpoint(trained_shapes_model, tmp_path_factory) -> Path:
    """The same model with a different decoder (untrained) and metadata: a second revision."""
    model, vocab, _ = trained_shapes_model
    other = type(model)(model.config, len(vocab), encoder_weights="random")
    other.encoder.load_state_dict(model.encoder.state_dict())
    return save_model(tmp_path_factory.mktemp("other"), other.eval(), vocab, metadata={"revision": "v1"})


def captions(captioner: Captioner) -> list[str]:
    return [r.text for r in captioner.caption(IMAGES, beam_size=2)]


def test_repo_id_resolves_from_the_offline_cache(hub_cache, shapes_checkpoint, other_checkpoint):
    snapshot = add_to_hub_cache(hub_cache, REPO, shapes_checkpoint, COMMIT, ["main"])
    add_to_hub_cache(hub_cache, REPO, other_checkpoint, OTHER_COMMIT, ["v1"])
    local = Captioner.from_pretrained(shapes_checkpoint, device="cpu")

    from_hub = Captioner.from_pretrained(REPO, device="cpu")
    assert from_hub.path == snapshot
    assert from_hub.config["metadata"] == {"trained_on": "synthetic shapes (tests)"}
    assert captions(from_hub) == captions(local)

    for revision in ("v1", OTHER_COMMIT):  # a tag / branch, and a commit hash
        tagged = Captioner.from_pretrained(REPO, device="cpu", revision=revision)
        assert tagged.path.name == OTHER_COMMIT and tagged.config["metadata"] == {"revision": "v1"}


def test_repo_id_not_in_the_offline_cache_is_a_clear_error(hub_cache):
    with pytest.raises(
        ModelNotFoundError,
        match="'nobody/no-such-model' is neither a local model folder nor a Hugging Face Hub repo",
    ):
        Captioner.from_pretrained("nobody/no-such-model", device="cpu")
    with pytest.raises(ModelNotFoundError, match="at revision 'v9'"):
        Captioner.from_pretrained("nobody/no-such-model", device="cpu", revision="v9")


def test_a_local_folder_wins_over_a_repo_id_of_the_same_name(
    hub_cache, shapes_checkpoint, other_checkpoint, tmp_path, monkeypatch
):
    add_to_hub_cache(hub_cache, REPO, shapes_checkpoint, COMMIT, ["main"])
    shutil.copytree(other_checkpoint, tmp_path / REPO)
    monkeypatch.chdir(tmp_path)
    captioner = Captioner.from_pretrained(REPO, device="cpu")
    assert captioner.path == Path(REPO) and captioner.config["metadata"] == {"revision": "v1"}
    with pytest.raises(ValueError, match="revision='main' applies to Hub repo ids"):
        Captioner.from_pretrained(REPO, device="cpu", revision="main")


def test_save_pretrained_writes_a_folder_that_loads_back_the_same(shapes_checkpoint, tmp_path):
    source = shutil.copytree(shapes_checkpoint, tmp_path / "source")
    (source / "MODEL_CARD.md").write_text("# Shapes\n\n![where it looks](figures/attention.png)\n")
    (source / "figures").mkdir()
    (source / "figures" / "attention.png").write_bytes(b"\x89PNG fake figure")
    half = Captioner.from_pretrained(source, device="cpu")
    save_model(source, half.model, half.vocab, metadata=half.config["metadata"], dtype=torch.float16)
    original = Captioner.from_pretrained(source, device="cpu")

    saved = original.save_pretrained(tmp_path / "saved")
    assert sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()) == [
        "MODEL_CARD.md",
        "config.json",
        "figures/attention.png",
        "model.safetensors",
    ]
    assert (saved / "MODEL_CARD.md").read_text() == (source / "MODEL_CARD.md").read_text()
    config = json.loads((saved / "config.json").read_text())
    assert config["weights_dtype"] == "float16"  # stored as it was loaded: the file stays small
    assert {t.dtype for t in load_file(str(saved / "model.safetensors")).values()} >= {torch.float16}
    reloaded = Captioner.from_pretrained(saved, device="cpu")
    assert captions(reloaded) == captions(original)
    assert config["metadata"] == original.config["metadata"]

    fp32 = original.save_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert json.loads((fp32 / "config.json").read_text())["weights_dtype"] == "float32"


def test_a_quantized_captioner_is_not_saved(shapes_checkpoint, tmp_path):
    from captioner.model.onnx_decoder import quantize_decoder

    quantized = Captioner.from_pretrained(shapes_checkpoint, device="cpu")
    quantized.model.decoder = quantize_decoder(quantized.model.decoder)  # what quantize=True does
    with pytest.raises(ValueError, match="int8-quantized"):
        quantized.save_pretrained(tmp_path / "q")


def test_push_to_hub_uploads_the_model_folder_with_its_card(shapes_checkpoint, tmp_path, monkeypatch):
    source = shutil.copytree(shapes_checkpoint, tmp_path / "source")
    (source / "MODEL_CARD.md").write_text("# Shapes model\n\nCIDEr 9.87 on held-out shapes.\n")
    captioner = Captioner.from_pretrained(source, device="cpu")
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        loaded = Captioner.from_pretrained(folder, device="cpu")  # what the Hub will serve loads
        calls.append(
            ("upload_folder", {"repo_id": repo_id, "files": files, "captions": captions(loaded), **kwargs})
        )
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{COMMIT}",
            commit_message="",
            commit_description="",
            oid=COMMIT,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = captioner.push_to_hub(REPO, private=True, commit_message="shapes model")

    assert url == f"https://huggingface.co/{REPO}/commit/{COMMIT}"
    (name, create), (name2, upload) = calls
    assert (name, name2) == ("create_repo", "upload_folder")
    assert create == {"repo_id": REPO, "private": True, "exist_ok": True}
    assert upload["repo_id"] == REPO and upload["commit_message"] == "shapes model"
    assert sorted(upload["files"]) == ["MODEL_CARD.md", "README.md", "config.json", "model.safetensors"]
    readme = upload["files"]["README.md"].decode()
    assert readme.startswith("---\nlibrary_name: captioner\npipeline_tag: image-to-text\n")
    assert "CIDEr 9.87 on held-out shapes." in readme and f"Captioner.from_pretrained('{REPO}')" in readme
    assert upload["captions"] == captions(captioner)
