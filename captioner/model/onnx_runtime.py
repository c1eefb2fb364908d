"""What the ONNX Runtime paths share (captioner.model.onnx_encoder, onnx_decoder): where exported
graphs are cached, how sessions are opened, and how many threads they use.

A graph is made from a module's weights on first use and cached as $CAPTIONER_CACHE/onnx
(default $XDG_CACHE_HOME/captioner/onnx, else ~/.cache/captioner/onnx) under a digest of the
weights and the versions that shape the graph; later loads read it. Nothing goes into the model
folder, so any folder works and a read-only install too: if the cache cannot be written, the
exported bytes stay in memory.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from captioner.files import atomic_write

THREADS_ENV = "CAPTIONER_ORT_THREADS"


class _TorchThreads:
    """torch's thread count saved by torch_on_one_thread, shared by nested and concurrent uses."""

    lock = threading.Lock()
    users = 0
    saved = 1


@contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """torch's own operations on one thread while onnxruntime runs the heavy ones on all of them.

    After each parallel operation torch's idle OpenMP workers spin for a while (milliseconds on
    AMD Zen, whose PAUSE instruction is slow) on the cores onnxruntime's next run needs: on 2
    threads a one-photo caption() took 45.0 ms with this against 49.9 without (medians of 6
    processes; docs/benchmarks.md, "torch's idle threads"). torch's setting is process-wide, so
    torch work in other threads also runs on one thread meanwhile; default_threads() still
    reports the count from before.
    """
    with _TorchThreads.lock:
        if _TorchThreads.users == 0:
            _TorchThreads.saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _TorchThreads.users += 1
    try:
        yield
    finally:
        with _TorchThreads.lock:
            _TorchThreads.users -= 1
            if _TorchThreads.users == 0:
                torch.set_num_threads(_TorchThreads.saved)


def cache_dir() -> Path:
    """$CAPTIONER_CACHE, else $XDG_CACHE_HOME/captioner, else ~/.cache/captioner."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def default_threads() -> int:
    """Intra-op threads: $CAPTIONER_ORT_THREADS if set, else as many as torch uses in this process
    (torch.get_num_threads(): $OMP_NUM_THREADS, torch.set_num_threads or the cores; inside
    torch_on_one_thread, as many as before it). On an idle 2-core machine two threads caption a
    photo in 43 ms against 63 on one; with the other core busy, one is as fast or faster
    (docs/benchmarks.md, "Threads"): a shared machine sets 1."""
    value = os.environ.get(THREADS_ENV, "")
    if not value:
        with _TorchThreads.lock:
            return _TorchThreads.saved if _TorchThreads.users else torch.get_num_threads()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
    return int(value)


def hash_tensors(digest: Any, module: torch.nn.Module) -> Any:
    """Feed the module's tensors (names, dtypes, shapes, values) into a hashlib digest."""
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def weights_digest(module: torch.nn.Module, *settings: object) -> str:
    """A digest of the module's tensors, the settings that shape its graph, and the torch and
    onnxruntime versions: what names its cached graph."""
    import onnxruntime

    versions = (torch.__version__, onnxruntime.__version__)
    digest = hashlib.sha256(":".join(map(str, (*versions, *settings))).encode())
    return str(hash_tensors(digest, module).hexdigest()[:16])


def load_or_export(
    name: str, export: Callable[[], bytes], directory: Path | None = None
) -> tuple[Path | bytes, str]:
    """The graph cached as `name`, and where it came from: ("cache"), exported and written to the
    cache ("exported"), or exported and kept in memory, the cache not being writable ("memory")."""
    path = (directory or cache_dir()) / "onnx" / name
    if path.is_file():
        return path, "cache"
    model = export()
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(model))
    except OSError:
        return model, "memory"
    return path, "exported"


def ort_session(model: Path | bytes, threads: int | None = None) -> Any:
    """A CPU onnxruntime session: all graph optimisations (the blocked-convolution layout needs
    them), sequential execution, `threads` intra-op threads that sleep rather than spin when idle
    (spinning threads take a shared core from the decoder and other processes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
