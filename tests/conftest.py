import atexit
import os
import shutil
import tempfile

# Tests start servers, torchrun ranks and training subprocesses beside the test process; on a
# small machine one thread each avoids OpenMP oversubscription (10x slowdowns were measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The ONNX Runtime encoder caches its exported graphs: in a folder of the test session's own,
# shared by its subprocesses, not in the user's ~/.cache.
if "CAPTIONER_CACHE" not in os.environ:
    os.environ["CAPTIONER_CACHE"] = tempfile.mkdtemp(prefix="captioner-tests-")
    atexit.register(shutil.rmtree, os.environ["CAPTIONER_CACHE"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from captioner import CaptionModel, ModelConfig, Vocabulary, save_model  # noqa: E402

from .shapes import all_examples, train_decoder  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The small model used by most tests: real pretrained Lite0 features, small decoder.
TINY = ModelConfig(
    image_size=128, embed_dim=64, hidden_dim=128, attention_dim=64, annotation_dim=128, dropout=0.0
)


@pytest.fixture(scope="session")
def shapes_vocab() -> Vocabulary:
    return Vocabulary.build([c for _, c, _ in all_examples()], min_count=1)


@pytest.fixture(scope="session")
def trained_shapes_model(shapes_vocab):
    """A model that has learned the shapes world: (model, vocab, training losses)."""
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**vars(TINY)), len(shapes_vocab))
    losses = train_decoder(model, shapes_vocab, all_examples(), steps=300)
    return model, shapes_vocab, losses


@pytest.fixture(scope="session")
def shapes_checkpoint(trained_shapes_model, tmp_path_factory) -> Path:
    """The trained shapes model saved as a checkpoint folder."""
    model, vocab, _ = trained_shapes_model
    return save_model(
        tmp_path_factory.mktemp("checkpoint"),
        model,
        vocab,
        metadata={"trained_on": "synthetic shapes (tests)"},
    )
