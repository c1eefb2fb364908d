import json
import random
import shutil

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.evaluation import metrics as evaluation
from captioner.evaluation.metrics import (
    METRICS,
    NO_JAVA_WARNING,
    score_captions,
    write_coco_results,
    write_metrics,
)
from captioner.training.cider import CiderD

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java not installed")

REFERENCES = {
    "1": ["A dog runs across the grass.", "A brown dog is running on a lawn."],
    "2": ["Two children play football in a park.", "Kids are playing soccer outside."],
    "3": ["A man rides a red bicycle down the street.", "A cyclist on a city road."],
}


@needs_java
def test_prediction_equal_to_a_reference_scores_full_bleu():
    predictions = {i: refs[0] for i, refs in REFERENCES.items()}
    scores = score_captions(predictions, REFERENCES, meteor=False)
    assert list(scores) == [m for m in METRICS if m != "METEOR"]
    assert scores["BLEU-4"] == pytest.approx(100.0, abs=1e-3)
    assert scores["ROUGE-L"] > 50 and scores["CIDEr"] > 0


@needs_java
def test_bleu1_by_hand():
    # 3 of 4 candidate words match and the lengths are equal, so no brevity penalty.
    scores = score_captions({"a": "A dog runs fast."}, {"a": ["a dog runs home"]}, meteor=False)
    assert scores["BLEU-1"] == pytest.approx(75.0, abs=1e-4)


@needs_java
@pytest.mark.slow  # METEOR's Java start-up loads a large paraphrase table: ~7 s of CPU
def test_meteor_runs_and_its_java_process_is_closed(monkeypatch):
    started = []

    class RecordingMeteor(evaluation.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self.meteor_p)

    monkeypatch.setattr(evaluation, "Meteor", RecordingMeteor)
    predictions = {i: refs[0] for i, refs in REFERENCES.items()}
    scores = score_captions(predictions, REFERENCES)
    assert list(scores) == list(METRICS)
    assert scores["METEOR"] > 90
    assert len(started) == 1 and started[0].poll() is not None


def test_without_java_falls_back_to_python_tokenizer(monkeypatch):
    monkeypatch.setattr(evaluation.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="Java not found") as record:
        scores = score_captions({"a": "A dog runs fast."}, {"a": ["a dog runs home"]})
    assert str(record[0].message) == NO_JAVA_WARNING
    assert "METEOR" not in scores
    assert scores["BLEU-1"] == pytest.approx(75.0, abs=1e-4)
    with pytest.raises(RuntimeError, match="SPICE needs Java"):
        score_captions({"a": "x"}, {"a": ["x"]}, spice=True)


def test_mismatched_ids_are_named():
    with pytest.raises(ValueError, match="missing for 1 image ids: 3"):
        score_captions({"1": "a", "2": "b"}, REFERENCES)
    with pytest.raises(ValueError, match="given for unknown 1 image ids: 9"):
        score_captions({"1": "a", "2": "b", "3": "c", "9": "d"}, REFERENCES)
    with pytest.raises(ValueError, match="references for image '1'"):
        score_captions({"1": "a"}, {"1": []})


def test_write_coco_results(tmp_path):
    path = tmp_path / "out" / "captions_val2014_results.json"
    write_coco_results(path, [{"image_id": 42, "caption": "a dog", "score": 0.5}])
    assert json.loads(path.read_text()) == [{"image_id": 42, "caption": "a dog"}]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind

    with pytest.raises(ValueError, match=r"predictions\[0\] needs an 'image_id'"):
        write_coco_results(path, [{"caption": "a dog"}])
    assert json.loads(path.read_text())[0]["image_id"] == 42  # untouched by the failed write


def test_write_metrics(tmp_path):
    write_metrics(tmp_path / "metrics.json", {"BLEU-4": np.float64(21.5), "CIDEr": 60})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"BLEU-4": 21.5, "CIDEr": 60.0}


# ----------------------------------------------------------------------------- CIDEr-D


def small_corpus() -> tuple[list[list[list[str]]], list[list[str]]]:
    """Eight images with 3-5 references each from a small vocabulary, and one candidate each."""
    rng = random.Random(0)
    words = "a the dog cat man woman runs sits on grass street red blue big small ball".split()
    corpus = [
        [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(rng.randint(3, 5))]
        for _ in range(8)
    ]
    candidates = [[rng.choice(words) for _ in range(rng.randint(1, 10))] for _ in corpus]
    candidates[0] = corpus[0][1]  # one exact match
    candidates[1] = []  # and one empty caption
    return corpus, candidates


def test_cider_d_matches_pycocoevalcap():
    corpus, candidates = small_corpus()
    mean, per_image = Cider().compute_score(
        {i: [" ".join(r) for r in refs] for i, refs in enumerate(corpus)},
        {i: [" ".join(c)] for i, c in enumerate(candidates)},
    )
    ours = CiderD(corpus).scores(candidates, corpus)
    assert ours.shape == (len(corpus),)
    assert ours.mean() == pytest.approx(mean, abs=1e-6)
    np.testing.assert_allclose(ours, per_image, atol=1e-6)


def test_cider_d_prefers_matching_captions():
    corpus, _ = small_corpus()
    scorer = CiderD(corpus)
    refs = corpus[2]
    good, random_caption = scorer.scores([refs[0], ["blue", "cat", "on", "a", "ball"]], [refs, refs])
    assert good > random_caption >= 0
    # A batch repeats each image's references for several samples; results do not depend on it.
    repeated = scorer.scores([refs[0]] * 3, [refs] * 3)
    np.testing.assert_allclose(repeated, good)


def test_cider_d_rejects_bad_input():
    with pytest.raises(ValueError, match="corpus_references is empty"):
        CiderD([])
    scorer = CiderD([[["a", "dog"]]])
    with pytest.raises(TypeError, match="token lists, got the string 'a dog'"):
        scorer.scores(["a dog"], [[["a", "dog"]]])
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.scores([["a"], ["b"]], [[["a"]]])
