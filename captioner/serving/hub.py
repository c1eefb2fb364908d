"""Where models live: the shipped default, local folders and Hugging Face Hub repositories.

A model folder (model.safetensors + config.json + MODEL_CARD.md) is already shaped like a Hub
repository, so `save_pretrained` writes that folder and `push_to_hub` uploads it, with the card
also as README.md (the file the Hub shows). huggingface_hub is imported only when a repo id is
actually resolved or pushed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CARD_FILE = "MODEL_CARD.md"
HUB_CARD_FILE = "README.md"
MODEL_FILES = ["config.json", "model.safetensors", CARD_FILE]
_LOCAL_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s:]+)\)")  # ![alt](file.png), not URLs
_HUB_CARD_HEADER = """---
library_name: captioner
pipeline_tag: image-to-text
tags:
- image-captioning
- show-attend-and-tell
---
"""


class ModelNotFoundError(FileNotFoundError):
    """No model at a path, and no Hub repository of that name could be resolved."""


def default_weights() -> Path:
    """The shipped model: inside the installed package (wheel), else weights/ of the checkout."""
    package = Path(__file__).resolve().parents[1]  # captioner/
    installed = package / "weights"
    return installed if (installed / "config.json").is_file() else package.parent / "weights"


def looks_like_repo_id(name: str) -> bool:
    """'user/model' or 'model': what huggingface_hub accepts as a repo id (no path syntax)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(name: str | Path, revision: str | None = None) -> Path:
    """A local model folder or file as given (a path that exists always wins); otherwise a Hub
    repo id, downloaded into (or, offline, found in) the huggingface_hub cache."""
    path = Path(name)
    link = _unusable_link(path)
    if link:
        raise ModelNotFoundError(f"model path {name}: {link}")
    if path.exists() or isinstance(name, Path) or not looks_like_repo_id(str(name)):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repo ids, not to the local path {name}")
        return path
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(str(name), revision=revision, allow_patterns=MODEL_FILES)
    except Exception as err:  # offline and not cached, no such repo, no network, gated...
        raise ModelNotFoundError(
            f"{name!r} is neither a local model folder nor a Hugging Face Hub repo that could be "
            f"resolved{f' at revision {revision!r}' if revision else ''} "
            f"({type(err).__name__}: {err})"
        ) from err
    return Path(str(folder))


def _unusable_link(path: Path) -> str | None:
    """Why a path that goes through a symbolic link leads nowhere, or None: such a name is a
    local path the user meant, not a Hub repo id."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop (a link that points back to itself)"
        if os.path.islink(path):
            return "a broken symbolic link (its target does not exist)"
    return None


def find_model(path: str | Path | None, revision: str | None = None, default: Path | None = None) -> Path:
    """The model folder `Captioner.from_pretrained(path)` loads: `path` (a folder, file or Hub
    repo id), else $CAPTIONER_WEIGHTS, else `default` (the shipped model). Cheap: no torch, so
    the app can fail fast, and serve its page while the model loads."""
    folder = resolve_model(
        path or os.environ.get("CAPTIONER_WEIGHTS") or default or default_weights(), revision
    )
    if (folder.is_dir() and not (folder / "config.json").exists()) or (path is None and not folder.exists()):
        raise ModelNotFoundError(
            f"no trained model in {folder} (expected config.json and model.safetensors). "
            "Train one with `captioner train` (scripts/train.py) and pass its output folder, "
            "e.g. Captioner.from_pretrained('runs/my-run/best'), or set CAPTIONER_WEIGHTS."
        )
    return folder


def copy_card(source: Path | None, directory: Path) -> None:
    """Copy the model card of the folder `source` into `directory`, with the local images it
    shows: only those inside `source` whose copy lands inside `directory` (a card that links
    ../x.png or /etc/x.png must not make saving read or write outside the two folders)."""
    card = source / CARD_FILE if source else None
    if not (source and card and card.is_file()) or card.resolve() == (directory / CARD_FILE).resolve():
        return
    shutil.copyfile(card, directory / CARD_FILE)
    for image in _LOCAL_IMAGE.findall(card.read_text(encoding="utf-8")):
        original, copy = source / image, directory / image
        inside = original.resolve().is_relative_to(source.resolve()) and copy.resolve().is_relative_to(
            directory.resolve()
        )
        if inside and original.is_file() and not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, copy)


def hub_card(directory: Path, repo_id: str) -> str:
    """README.md for the Hub: metadata header, then the model card (or a short generated one)."""
    card = directory / CARD_FILE
    body = (
        card.read_text(encoding="utf-8")
        if card.is_file()
        else (
            f"# {repo_id}\n\nA Show, Attend and Tell image captioning model for "
            "[captioner](https://github.com/captioner/captioner). No model card was written for it.\n"
        )
    )
    usage = (
        f"\n\n## Usage\n\n```python\nfrom captioner import Captioner\n\n"
        f"cap = Captioner.from_pretrained({repo_id!r})\nprint(cap.caption('photo.jpg').text)\n```\n"
    )
    return _HUB_CARD_HEADER + body.rstrip("\n") + usage


def upload_model_folder(
    write: Callable[[Path], Path],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload captioner model",
) -> str:
    """Create the repo if needed and upload the model folder `write(tmp)` makes, plus README.md;
    returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="captioner-push-") as tmp:
        folder = write(Path(tmp))
        (folder / HUB_CARD_FILE).write_text(hub_card(folder, repo_id), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message
        )
    return str(getattr(commit, "commit_url", commit))
