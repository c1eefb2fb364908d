"""Issue #37: the ImageNet evidence (captioner.model.evidence) and the decoding that listens to it."""

from __future__ import annotations

from captioner.model.evidence import imagenet_words


def test_imagenet_words_map_breeds_fridge_and_never_person():
    classes = imagenet_words().classes
    assert len(classes) == 1000
    assert all(c.coco == "dog" for c in classes[151:269])  # the 118 dog breeds
    fridge = next(c for c in classes if c.label == "refrigerator")
    assert fridge.coco == "refrigerator" and "refrigerator" in fridge.words
    assert not any(c.coco == "person" for c in classes)
    assert next(c for c in classes if c.label == "ballplayer").implies_person
    assert next(c for c in classes if c.label == "tabby").coco == "cat"
