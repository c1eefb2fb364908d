"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D of sampled captions.

The baseline is the mean reward of the other samples of the same image (Luo 2020), so no extra
greedy decode is needed and the advantage is zero-mean per image.

Captions are scored with their `<end>` word, and references too: a sample cut off at the length
limit, or one that stops mid-phrase ("... in front of a"), then misses the final n-grams of every
reference and earns less than a finished sentence with the same words. Without it SCST learns to
end captions on high-CIDEr fragments.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from captioner.model.vocabulary import END, Vocabulary
from captioner.training.cider import CiderD

Tokens = Sequence[str]


def end_marked(references: Sequence[Tokens]) -> list[list[str]]:
    """One image's tokenised references, each followed by `<end>`."""
    return [[*ref, END] for ref in references]


def reward_scorer(corpus_references: Iterable[Sequence[Tokens]]) -> CiderD:
    """CIDEr-D with document frequencies from the end-marked training references."""
    return CiderD(end_marked(refs) for refs in corpus_references)


def sampled_words(tokens: torch.Tensor, vocab: Vocabulary) -> list[list[str]]:
    """Sampled id rows -> words, with `<end>` kept for the captions that finished."""
    return [vocab.decode(seq) + ([END] if Vocabulary.end_id in seq else []) for seq in tokens.tolist()]


def scst_loss(
    tokens: torch.Tensor,  # (B*S, T) sampled captions, from decode_tensors(greedy=False)
    log_probs: torch.Tensor,  # (B*S, T) their log-probabilities, with the autograd graph
    mask: torch.Tensor,  # (B*S, T)
    references: Sequence[Sequence[Tokens]],  # per image: its tokenised references (no <end>)
    cider: CiderD,  # from reward_scorer()
    vocab: Vocabulary,
    samples: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss -(r - b) log p(w) over `samples` sampled captions per image."""
    if samples < 2:
        raise ValueError("SCST with a mean-of-others baseline needs at least 2 samples per image")
    words = sampled_words(tokens, vocab)
    marked = [end_marked(refs) for refs in references]
    rewards = cider.scores(words, [marked[i // samples] for i in range(len(words))])
    rewards = rewards.reshape(-1, samples)  # (B, S)
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (samples - 1)
    advantage = torch.as_tensor(
        (rewards - baseline).reshape(-1), dtype=log_probs.dtype, device=log_probs.device
    )
    mask = mask.to(log_probs.dtype)
    loss = -(advantage.unsqueeze(1) * log_probs * mask).sum() / mask.sum()
    return loss, {"reward": float(np.mean(rewards)), "scst_loss": loss.item()}
