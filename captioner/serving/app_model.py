"""The web app's model, loaded and run in a process of its own.

Start-up is mostly imports (gradio for the page; torch, timm and the model's modules for the
model) and the model's load, all bound to one core by Python's GIL. In one process they queue
behind each other; in two they run side by side on a 2-core machine, so the page and the model
are both ready in about the time of the slower one. The model process then warms up (a first
caption is slower than the next) unless a caption is already waiting, and answers one caption
at a time: the app's queue runs one anyway.

By default the model process runs torch on one core fewer than the machine has (at least one),
leaving one to the page's process. On a busy 2-core machine, two torch threads were much slower
than one (loading the model 2.9-3.5 s against 0.8 s, a caption 0.3-0.7 s against 0.2-0.3 s):
a thread that waits for its descheduled twin wastes its turn.

The app's process never imports torch: the model process reads the photo too (load_image) and
sends back a copy at display size with the caption, as `Captioned`, plain numpy and strings with
the attribute names of captioner.model.results.CaptionResult.

Every caption comes with its evidence (what the encoder's ImageNet classifier saw, issue #37)
when the model has an ImageNet classifier: it costs ~10% of a caption's time, and the app is
where a person looks at why the model said what it said.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioner.model.options import DecodeOptions

WARM_UP_SIZE = 64  # pixels: the encoder sees every photo at its own input size anyway
DISPLAY_SIZE = 512  # overlays are drawn on a copy this big: fast, and every thumbnail alike


class UnreadableImage(ValueError):
    """The photo could not be read (captioner.data.images.ImageLoadError in the model process)."""


def default_threads() -> int:
    """Torch threads for the model process: $OMP_NUM_THREADS if set, else all cores but one."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) - 1)


def display_copy(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """The image scaled (up or down) to `size` px on its long side, so all overlays match."""
    scale = size / max(image.size)
    new_size = (max(round(image.width * scale), 1), max(round(image.height * scale), 1))
    return image.resize(new_size, Image.Resampling.LANCZOS)


@dataclass
class Alternative:
    text: str
    score: float
    log_prob: float


@dataclass
class Seen:
    """What the encoder's ImageNet classifier saw of a label or a word's category
    (captioner.model.evidence.Evidence, torch-free); `seen`: enough to count as evidence."""

    label: str
    category: str | None
    probability: float
    seen: bool

    @classmethod
    def of(cls, evidence: Any) -> Seen:
        from captioner.model.evidence import ABSENT_BELOW

        probability = float(evidence.probability)
        return cls(evidence.label, evidence.category, probability, probability >= ABSENT_BELOW)


@dataclass
class Captioned:
    """A caption as the app needs it (CaptionResult's fields, without torch to unpickle)."""

    text: str
    words: list[str]
    score: float
    log_prob: float
    attention: np.ndarray
    alternatives: list[Alternative] = field(default_factory=list)
    finished: bool = True
    notes: list[str] = field(default_factory=list)
    gate: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    evidence: list[Seen] | None = None  # the top labels, best first; None: the model has none
    word_evidence: list[Seen | None] = field(default_factory=list)  # per word
    word_categories: list[str | None] = field(default_factory=list)  # the object each word names

    @classmethod
    def of(cls, result: Any) -> Captioned:
        evidence = getattr(result, "evidence", None)
        return cls(
            result.text,
            list(result.words),
            float(result.score),
            float(result.log_prob),
            np.asarray(result.attention),
            [Alternative(a.text, float(a.score), float(a.log_prob)) for a in result.alternatives],
            bool(result.finished),
            list(result.notes),
            np.asarray(result.gate),
            None if evidence is None else [Seen.of(e) for e in evidence],
            [None if e is None else Seen.of(e) for e in result.word_evidence or []],
            object_categories(result.words) if evidence is not None else [],
        )


def object_categories(words: list[str]) -> list[str | None]:
    """The COCO category each caption word names (person, dog, ...), or None."""
    from captioner.model.evidence import imagenet_words

    return [imagenet_words().word_category.get(word) for word in words]


def has_evidence(captioner: Any) -> bool:
    """Whether the model can say what its ImageNet classifier saw (its head is built now, once):
    not a backbone without one, nor a model whose training tuned the stages it reads."""
    from captioner.model.evidence import EvidenceError

    try:
        captioner.evidence_head()
    except EvidenceError:
        return False
    return True


class ModelProcess:
    """Stands for a Captioner (`caption`, the About text) whose model loads and runs in a child
    process. `ready` is set once it has loaded or failed; if it failed (or the process died),
    `failed` is set, which stops the app's server, and `error` says why."""

    def __init__(self, folder: Path, device: str | None, quantize: bool | None, threads: int | None = None):
        self.ready, self.failed = threading.Event(), threading.Event()
        self.error: str | None = None
        self.about: str = ""
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=serve_model,
            args=(child, folder, device, quantize, threads or default_threads()),
            name="captioner-model",
            daemon=True,
        )
        self._lock = threading.Lock()

    def start(self) -> None:
        self._process.start()
        threading.Thread(target=self._wait_until_loaded, name="model-loaded", daemon=True).start()

    def _wait_until_loaded(self) -> None:
        try:
            kind, payload = self._pipe.recv()
        except (EOFError, OSError):
            kind, payload = "failed", self._died()
        if kind == "ready":
            self.about = payload
        else:
            self.error = payload
            self.failed.set()
        self.ready.set()

    def _died(self) -> str:
        self._process.join(timeout=5)
        return f"the model process stopped (exit code {self._process.exitcode})"

    def loaded(self) -> ModelProcess:
        """Itself, once the model has loaded (waits for it); RuntimeError if it could not load."""
        self.ready.wait()
        if self.error is not None:
            raise RuntimeError(f"the model did not load: {self.error}")
        return self

    def describe(self) -> str:
        """The About panel's Markdown (waits for the model)."""
        return self.loaded().about

    def caption(
        self,
        image: Any,
        options: DecodeOptions | None = None,
        *,
        focus: Any = None,
        focus_strength: float | None = None,
    ) -> Captioned:
        """Captioner.caption for one image (a path, a PIL image...), in the model process; its
        TypeError and ValueError (a bad box or strength) come back as such."""
        return self.caption_file(image, options, focus=focus, focus_strength=focus_strength)[2]

    def caption_file(
        self,
        image: Any,
        options: DecodeOptions | None = None,
        *,
        focus: Any = None,
        focus_strength: float | None = None,
        max_pixels: int | None = None,
    ) -> tuple[Image.Image, tuple[int, int], Captioned]:
        """(the photo at display size, its size, its caption): the photo is read in the model
        process (UnreadableImage if it cannot be), so this process needs no torch."""
        self.loaded()
        with self._lock:
            try:
                self._pipe.send((image, options, focus, focus_strength, max_pixels))
                kind, payload = self._pipe.recv()
            except (EOFError, OSError) as err:
                self.error = self._died()
                self.failed.set()
                raise RuntimeError(self.error) from err
        if kind == "ok":
            return payload
        errors = {"ImageLoadError": UnreadableImage, "TypeError": TypeError, "ValueError": ValueError}
        raise errors.get(kind, RuntimeError)(payload)

    def stop(self) -> None:
        self._pipe.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()


def serve_model(pipe: Any, folder: Path, device: str | None, quantize: bool | None, threads: int) -> None:
    """The model process: load, say "ready" with the About text (or "failed" with why), warm up
    unless a caption is waiting, then caption until the app closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the app's to handle; it closes the pipe
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read when torch loads, below
    captioner = load(pipe, folder, device, quantize)
    if captioner is None:
        return
    evidence = has_evidence(captioner)
    if not pipe.poll():
        warm_up(captioner, evidence)
    from captioner.data.images import load_image

    while True:
        try:
            image, options, focus, strength, max_pixels = pipe.recv()
        except (EOFError, OSError):
            return
        try:
            picture = load_image(image, max_pixels or captioner.max_pixels)
            extra = {} if strength is None else {"focus_strength": strength}
            result = captioner.caption(picture, options, focus=focus, evidence=evidence, **extra)
            reply: tuple[str, Any] = ("ok", (display_copy(picture), picture.size, Captioned.of(result)))
        except Exception as err:  # noqa: BLE001 (sent to the app, which decides what the user sees)
            reply = (type(err).__name__, str(err))
        pipe.send(reply)


def load(pipe: Any, folder: Path, device: str | None, quantize: bool | None) -> Any:
    """The Captioner, after telling the app "ready"; None after telling it why it failed."""
    from captioner.model.folder import CheckpointError
    from captioner.serving.captioner import Captioner
    from captioner.serving.model_card import describe_model

    try:
        captioner = Captioner.from_pretrained(folder, device=device, quantize=quantize)
    except CheckpointError as err:
        pipe.send(("failed", f"cannot start without a model: {err}"))
        return None
    except (RuntimeError, AssertionError) as err:  # e.g. --device cuda on a machine without one
        pipe.send(("failed", f"device {device!r} is not usable here: {err}"))
        return None
    pipe.send(("ready", describe_model(folder, captioner)))
    return captioner


def warm_up(captioner: Any, evidence: bool = False) -> None:
    """One caption of a blank photo: the first call sets up kernels the later ones reuse."""
    captioner.caption(Image.new("RGB", (WARM_UP_SIZE, WARM_UP_SIZE), (128, 128, 128)), evidence=evidence)
