"""The COCO-sized synthetic dataset generator, run small: real COCO format, trainable."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from captioner.data.config import DataConfig
from captioner.data.datasets import load_dataset
from captioner.model.config import ModelConfig
from captioner.training.config import TrainConfig
from captioner.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_small_instance_is_real_coco_and_trains(tmp_path):
    root = tmp_path / "coco"
    subprocess.run(
        [sys.executable, "scripts/make_synthetic_coco.py", str(root), "--images", "40"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    captions = root / "annotations" / "captions_train2017.json"
    coco = COCO(str(captions))
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) == 200  # COCO's 5 per image
    lengths = [len(a["caption"].split()) for a in coco.dataset["annotations"]]
    assert 8 < sum(lengths) / len(lengths) < 13 and min(lengths) >= 5
    assert json.loads(captions.read_text())["images"][0]["file_name"] == "000000000001.jpg"

    data = DataConfig(
        kind="coco",
        train=str(captions),
        train_images=str(root / "train2017"),
        val=str(captions),
        val_images=str(root / "train2017"),
        max_val_images=8,
    )
    assert len(load_dataset(data)["train"]) == 40
    cfg = TrainConfig(
        data=data,
        model=ModelConfig(image_size=64, embed_dim=16, hidden_dim=32, attention_dim=16, annotation_dim=32),
        output_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        epochs=1,
        batch_size=8,
        min_word_count=2,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    summary = train(cfg)
    assert summary["vocab_size"] > 20 and summary["feature_extraction"]["images"] == 48
