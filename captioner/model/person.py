"""Is there a person in the photo? A tiny detector on the encoder's ImageNet evidence (issue #37 f).

ImageNet has no person class, yet 37 of the shipped model's 55 invented objects on coco-mini are
people: the Flickr8k language model starts almost every caption with one. Following Fang et al.
2015 (visual-concept detectors trained on caption words), a logistic regression reads the
ImageNet evidence (captioner.model.evidence) and says whether the photo's captions would mention a
person; decoding can then lower person words where it says no (DecodeOptions.person_penalty).

Its input is the centred log-probabilities of the 1000 ImageNet classes: the classifier's logits
(a linear map of the pooled features) up to scale, read off the same (B, 1000) evidence every
other path already carries. Trained on Flickr8k train photos by scripts/train_person_detector.py
(label: at least 2 of the 5 captions mention a person), shipped as person_detector.json.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from captioner.model.evidence import imagenet_words

DETECTOR_FILE = Path(__file__).with_name("person_detector.json")
PERSON_THRESHOLD = 0.5  # below it the detector says "no person"


def detector_inputs(probabilities: torch.Tensor) -> torch.Tensor:
    """ImageNet class probabilities (B, 1000) -> centred log-probabilities (B, 1000)."""
    log_probs = probabilities.float().clamp_min(1e-30).log()
    return log_probs - log_probs.mean(dim=1, keepdim=True)


@functools.cache
def load_detector(path: Path = DETECTOR_FILE) -> tuple[torch.Tensor, float]:
    """The shipped detector: weights (1000,) and bias. ValueError naming the file if malformed."""
    table = json.loads(Path(path).read_text(encoding="utf-8"))
    weights = torch.tensor(table.get("weights", []), dtype=torch.float32)
    if weights.shape != (1000,) or not isinstance(table.get("bias"), float):
        raise ValueError(f"{path}: a person detector needs 1000 'weights' and a float 'bias'")
    return weights, table["bias"]


def person_probability(probabilities: torch.Tensor, path: Path = DETECTOR_FILE) -> torch.Tensor:
    """ImageNet class probabilities (B, 1000) -> probability that each photo shows a person (B,)."""
    weights, bias = load_detector(path)
    return torch.sigmoid(detector_inputs(probabilities) @ weights.to(probabilities.device) + bias)


@functools.lru_cache(maxsize=4)
def person_word_ids(vocabulary: tuple[str, ...]) -> torch.Tensor:
    """Vocabulary ids of the words that name a person (man, girls, skier, ...)."""
    table = imagenet_words().word_category
    return torch.tensor([i for i, w in enumerate(vocabulary) if table.get(w) == "person"], dtype=torch.long)


def person_bias(probabilities: torch.Tensor, vocabulary: Sequence[str], penalty: float) -> torch.Tensor:
    """Per image, a log-probability bias over the vocabulary (B, V) for beam search: -penalty on
    person words where the detector's probability is below PERSON_THRESHOLD, else 0."""
    absent = (person_probability(probabilities) < PERSON_THRESHOLD).float().cpu()  # (B,)
    bias = torch.zeros(probabilities.shape[0], len(vocabulary))
    bias[:, person_word_ids(tuple(vocabulary))] = -penalty * absent[:, None]
    return bias


def fit_detector(inputs: torch.Tensor, labels: torch.Tensor, l2: float = 0.1) -> tuple[torch.Tensor, float]:
    """Logistic regression (deterministic L-BFGS) on standardised inputs (N, D) with labels (N,)
    of 0/1, the classes weighted equally (most Flickr8k photos show people, most everyday photos
    elsewhere do not). Returns weights (D,) and bias for the raw inputs."""
    if inputs.shape[0] != labels.shape[0] or not 0 < float(labels.mean()) < 1:
        raise ValueError("fit_detector: needs one label per input row and both classes present")
    mean, std = inputs.mean(0), inputs.std(0) + 1e-6
    scaled = (inputs - mean) / std
    w = torch.zeros(inputs.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    balance = (1 - labels.mean()) / labels.mean()  # positives weighted down to equal priors
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.binary_cross_entropy_with_logits(scaled @ w + b, labels, pos_weight=balance)
        value = value + l2 * (w**2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    weights = w.detach() / std
    return weights, float(b.detach() - (weights * mean).sum())
