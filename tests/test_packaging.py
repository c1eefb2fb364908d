"""The installed package is a working package: a wheel, installed into a fresh environment and
run from outside the checkout, captions with the shipped model (API, batch command, app) and
has the benchmark command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image
from skimage import data

from captioner.evaluation.coco_objects import COCO_SYNONYMS
from captioner.model.folder import CONFIG_FILE, WEIGHTS_FILE

from .app_server import OFFLINE_ENV, free_port

ROOT = Path(__file__).resolve().parents[1]
# The shipped model sees the astronaut as a person (a random one would not): which word it picks
# depends on the model, so any word the grounding evaluation counts as a person will do.
PERSON_WORDS = set(COCO_SYNONYMS["person"])
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Build the wheel from a copy of the sources and install it, alone, into a new venv that sees
    this interpreter's packages (torch, gradio...; captioner itself comes only from the wheel)."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for folder in ("captioner", "weights"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
    )
    wheel = next(wheels.glob("captioner-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    see_packages_of_this_interpreter(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return {"python": python, "bin": env_dir / "bin", "site": Path(site), "cwd": elsewhere, "wheel": wheel}


def see_packages_of_this_interpreter(env_dir: Path) -> None:
    """Put this interpreter's site-packages on the new venv's path with a .pth file. Unlike
    `system_site_packages`, which shows the *base* interpreter's packages, this is right inside a
    venv or a conda env as well as outside both. Paths only: this interpreter's own .pth hooks
    (an editable install of captioner) stay out, so the wheel is the only captioner there."""
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    new_site = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(new_site) / "_outer_site_packages.pth").write_text("\n".join(sorted(ours)) + "\n")


def run(installed, *command: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTIONER_WEIGHTS")}
    return subprocess.run(
        command,
        cwd=installed["cwd"],
        env=env | OFFLINE_ENV,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_the_wheel_carries_the_shipped_model_and_type_information(installed):
    package = installed["site"] / "captioner"
    for name in (CONFIG_FILE, WEIGHTS_FILE, "MODEL_CARD.md"):
        assert (package / "weights" / name).is_file(), name
    assert (package / "py.typed").is_file()
    assert (installed["bin"] / "captioner").is_file() and (installed["bin"] / "captioner-caption").is_file()


def test_installed_api_captions_with_the_shipped_model_from_anywhere(installed):
    script = (
        "import json, sys, captioner\n"
        "from captioner import Captioner\n"
        "cap = Captioner.from_pretrained(device='cpu')\n"
        "print(json.dumps({'file': captioner.__file__, 'model': str(cap.path),\n"
        "                  'caption': cap.caption(sys.argv[1]).text}))\n"
    )
    photo = installed["cwd"] / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    result = run(installed, str(installed["python"]), "-c", script, str(photo), check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(installed["site"]), out["file"]
    assert Path(out["model"]) == installed["site"] / "captioner" / "weights"
    assert PERSON_WORDS & set(out["caption"].split()), out["caption"]


def test_installed_command_captions_a_folder(installed):
    photos = installed["cwd"] / "photos"
    photos.mkdir()
    Image.fromarray(data.chelsea()).save(photos / "cat.jpg")
    result = run(
        installed,
        str(installed["bin"] / "captioner"),
        "caption",
        "photos",
        "-o",
        "out.jsonl",
        "--no-progress",
        "--num-workers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (installed["cwd"] / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["path"].endswith("cat.jpg") and rows[0]["caption"]
    alias = run(installed, str(installed["bin"] / "captioner-caption"), "--help")
    assert alias.returncode == 0 and "--beam-size" in alias.stdout


def test_installed_benchmark_command_needs_no_checkout(installed):
    """`captioner benchmark` is part of the package (captioner.benchmark), not a checkout's script."""
    result = run(installed, str(installed["bin"] / "captioner"), "benchmark", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--checkpoint", "--dev-cider", "torch,onnx"):  # its own flags, the encoder choices
        assert flag in result.stdout, flag
    module = run(
        installed,
        str(installed["python"]),
        "-c",
        "import captioner.serving.benchmark as b; print(b.__file__)",
        check=True,
    )
    assert Path(module.stdout.strip()).is_relative_to(installed["site"]), module.stdout


def test_installed_app_serves_the_shipped_model(installed):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTIONER_WEIGHTS")}
    server = subprocess.Popen(
        [str(installed["bin"] / "captioner"), "app", "--port", str(port)],
        cwd=installed["cwd"],
        env=env | OFFLINE_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                direct.open(url, timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the installed app did not answer at {url}"
                time.sleep(0.5)
        photo = installed["cwd"] / "app-photo.png"
        Image.fromarray(data.astronaut()).save(photo)
        caption, alternatives, attention = Client(url, verbose=False).predict(
            handle_file(str(photo)), 3, 20, 0.6, api_name="/caption"
        )
        assert PERSON_WORDS & set(caption.split()), caption
        assert len(attention) == len(caption.split()) and alternatives["data"]
    finally:
        server.terminate()
        server.wait(timeout=30)
