"""Language-side training from captions without photos (captioner.training.language, issue #37 (e))."""

import json
from dataclasses import replace

import pytest
import torch

from captioner.data.config import DataConfig
from captioner.model.folder import load_model
from captioner.training.language import (
    CONFIG_FILE,
    LANGUAGE_MODULES,
    MODEL_DIR,
    STATE_FILE,
    LanguageConfig,
    export_last_step,
    prepare_language_data,
    text_loss,
    train_language,
)

from .shapes import write_coco_dataset

# Sentences the shapes model never saw, with its words: the language side must learn them.
NEW_SENTENCES = [
    "a blue square on the left of a red circle",
    "the green circle on the right",
    "a yellow square",
]


@pytest.fixture
def language_run(shapes_checkpoint, tmp_path):
    """A small run's config: the shapes model, its photos as the paired data, new text."""
    captions, images = write_coco_dataset(tmp_path / "paired")
    text = tmp_path / "text.json"
    annotations = [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(NEW_SENTENCES * 4)]
    text.write_text(json.dumps({"images": [], "annotations": annotations}))
    return LanguageConfig(
        init_from=str(shapes_checkpoint),
        text_captions=str(text),
        data=DataConfig(kind="coco", train=str(captions), train_images=str(images)),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        held_out_text=0,
        steps=30,
        batch_size=8,
        lr=3e-3,
        checkpoint_every=10,
    )


def lm_loss(cfg: LanguageConfig, folder) -> float:
    model, vocab, _ = load_model(folder)
    data = prepare_language_data(cfg, model, vocab)
    from captioner.training.inputs import caption_batch

    captions, lengths, _ = caption_batch([[ids] for ids in data.text])
    with torch.no_grad():
        return float(text_loss(model.decoder, data.neutral, captions, lengths))


@pytest.mark.slow
def test_language_training_lowers_the_text_loss_and_leaves_the_visual_path_alone(language_run):
    cfg = language_run
    before = lm_loss(cfg, cfg.init_from)
    train_language(cfg)
    out = f"{cfg.output_dir}/{MODEL_DIR}"
    assert lm_loss(cfg, out) < 0.5 * before
    start, _, _ = load_model(cfg.init_from)
    trained, _, config = load_model(out)
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    assert changed and all(k.split(".")[1] in LANGUAGE_MODULES for k in changed)  # decoder.<module>...
    assert {"decoder.embedding.weight", "decoder.classifier.weight"} <= changed
    assert config["metadata"]["language_training"]["steps"] == cfg.steps


@pytest.mark.slow
def test_the_config_is_saved_next_to_the_state_and_the_run_resumes_to_the_same_weights(
    language_run, tmp_path
):
    cfg = replace(language_run, steps=6, checkpoint_every=2)
    whole = replace(cfg, output_dir=str(tmp_path / "whole"))
    train_language(whole)
    train_language(replace(cfg, stop_after_step=4))
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert LanguageConfig.from_dict(saved) == replace(cfg, stop_after_step=4)
    assert (tmp_path / "run" / STATE_FILE).is_file() and not (tmp_path / "run" / MODEL_DIR).exists()
    with pytest.raises(ValueError, match="lr"):
        train_language(replace(cfg, resume=True, lr=1e-2))
    with pytest.raises(ValueError, match="already holds"):
        train_language(cfg)
    assert export_last_step(cfg.output_dir) == tmp_path / "run" / MODEL_DIR  # a run stopped early
    _, _, exported = load_model(tmp_path / "run" / MODEL_DIR)
    assert exported["metadata"]["steps"] == 4
    train_language(replace(cfg, resume=True))
    resumed, _, _ = load_model(tmp_path / "run" / MODEL_DIR)
    straight, _, _ = load_model(tmp_path / "whole" / MODEL_DIR)
    for name, value in straight.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, atol=1e-6), name


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="text_captions"):
        LanguageConfig().check()
    with pytest.raises(ValueError, match="steps"):
        LanguageConfig(text_captions="x.json", steps=0).check()
    with pytest.raises(ValueError, match="lr"):
        LanguageConfig(text_captions="x.json", lr=-1.0).check()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    from captioner.training.language import read_text_captions

    with pytest.raises(ValueError, match="bad.json"):
        read_text_captions(bad)
