"""Turning annotation grids into captions: greedy, beam search and sampling.

All three run a whole batch of images at once. They always stop (at `max_length` words at
the latest) and always return a caption, even if `<end>` is never produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .decoder import AttentionDecoder
from .vocabulary import Vocabulary


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    log_prob: float  # sum of the log-probabilities of the tokens (and of <end> if finished)
    score: float  # what beam search ranks by: log_prob, length-normalised if asked
    alphas: torch.Tensor  # (len(tokens), L): the attention that produced each word
    finished: bool  # False when max_length cut the caption before <end>


def _log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax over the words a caption may contain: never <pad> or <start>."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    logits[:, [Vocabulary.pad_id, Vocabulary.start_id]] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _length_normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / max(length, 1) ** length_penalty if length_penalty else log_prob


def decode_tensors(
    decoder: AttentionDecoder,
    features: torch.Tensor,  # (B, L, D)
    max_length: int = 20,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy or sampled decoding that keeps the autograd graph (self-critical training uses it).

    Returns tokens (B, T) padded with <pad>, log_probs (B, T) of the chosen tokens, mask (B, T)
    true for real tokens (the words and the final <end>), and alphas (B, T, L).
    """
    batch = features.shape[0]
    features, keys = decoder.prepare(features)
    state = decoder.init_state(features)
    words = features.new_full((batch,), Vocabulary.start_id, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool, device=features.device)
    tokens, log_probs, masks, alphas = [], [], [], []
    for _ in range(max_length):
        logits, state, alpha = decoder.step(features, keys, words, state)
        logp = _log_probs(logits, 1.0 if greedy else temperature)  # (B, V)
        if greedy:
            words = logp.argmax(dim=-1)
        else:
            filtered = logp
            if top_k:
                kth = logp.topk(top_k, dim=-1).values[:, -1:]
                filtered = logp.masked_fill(logp < kth, float("-inf"))
            words = torch.multinomial(filtered.exp(), 1).squeeze(1)
        chosen = logp.gather(1, words.unsqueeze(1)).squeeze(1)
        log_probs.append(chosen.masked_fill(~alive, 0.0))
        words = words.masked_fill(~alive, Vocabulary.pad_id)
        tokens.append(words)
        masks.append(alive)
        alphas.append(alpha)
        alive = alive & (words != Vocabulary.end_id)
        if not alive.any():
            break
    return (torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1),
            torch.stack(alphas, 1))


def _to_hypotheses(tokens, log_probs, mask, alphas) -> list[Hypothesis]:
    hypotheses = []
    for seq, logp, m, alpha in zip(tokens.tolist(), log_probs, mask, alphas, strict=True):
        length = int(m.sum())
        finished = length > 0 and seq[length - 1] == Vocabulary.end_id
        words = length - 1 if finished else length
        total = float(logp[:length].sum())
        hypotheses.append(Hypothesis(seq[:words], total, total, alpha[:words].cpu(), finished))
    return hypotheses


@torch.no_grad()
def greedy_decode(decoder: AttentionDecoder, features: torch.Tensor,
                  max_length: int = 20) -> list[Hypothesis]:
    return _to_hypotheses(*decode_tensors(decoder, features, max_length, greedy=True))


@torch.no_grad()
def sample(decoder: AttentionDecoder, features: torch.Tensor, max_length: int = 20,
           temperature: float = 1.0, top_k: int = 0) -> list[Hypothesis]:
    """One sampled caption per image (repeat the features for several)."""
    out = decode_tensors(decoder, features, max_length, False, temperature, top_k)
    return _to_hypotheses(*out)


@torch.no_grad()
def beam_search(
    decoder: AttentionDecoder,
    features: torch.Tensor,  # (B, L, D)
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = 0.0,
    n_best: int | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over all images x beams in one tensor batch.

    A beam that emits <end> moves to its image's finished list and its slot is refilled from
    the other beams' expansions. An image is done once it has `beam_size` finished captions;
    beams still alive at `max_length` count as (unfinished) candidates, so there is always an
    answer. Ranking: log_prob / length**length_penalty (0 = plain log-probability).
    Returns, per image, the `n_best` (default: beam_size) hypotheses, best first.
    """
    batch, num_cells = features.shape[:2]
    k = beam_size
    n_best = n_best or k
    device = features.device
    annotations, keys = decoder.prepare(features)
    feats = annotations.repeat_interleave(k, dim=0)  # (B*K, L, A)
    keys = keys.repeat_interleave(k, dim=0)
    state = decoder.init_state(feats)
    words = torch.full((batch * k,), Vocabulary.start_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    tokens = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    alphas = torch.empty(batch * k, 0, num_cells, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)

    for _ in range(max_length):
        logits, state, alpha = decoder.step(feats, keys, words, state)
        logp = _log_probs(logits)
        vocab = logp.shape[-1]
        candidates = (beam_scores.unsqueeze(-1) + logp.view(batch, k, vocab)).view(batch, -1)
        top_scores, top_index = candidates.topk(k, dim=1)  # (B, K)
        origin = (top_index // vocab + offsets).view(-1)  # flat index of the parent beam
        words = (top_index % vocab).view(-1)
        tokens = torch.cat([tokens[origin], words.unsqueeze(1)], dim=1)
        alphas = torch.cat([alphas[origin], alpha[origin].unsqueeze(1)], dim=1)
        state = (state[0][origin], state[1][origin])

        ended = (words.view(batch, k) == Vocabulary.end_id) & torch.isfinite(top_scores)
        if ended.any():
            for b, j in ended.nonzero().tolist():
                row, score = b * k + j, float(top_scores[b, j])
                length = tokens.shape[1]
                finished[b].append(Hypothesis(
                    tokens[row, :-1].tolist(), score,
                    _length_normalised(score, length, length_penalty),
                    alphas[row, :-1].cpu(), True,
                ))
        beam_scores = top_scores.masked_fill(ended, float("-inf"))
        done = torch.tensor([len(f) >= k for f in finished], device=device)
        beam_scores[done] = float("-inf")
        if not torch.isfinite(beam_scores).any():
            break

    for b in range(batch):  # max_length reached: unfinished beams are candidates too
        if len(finished[b]) >= n_best:
            continue
        for j in range(k):
            score = float(beam_scores[b, j])
            if score != float("-inf"):
                row = b * k + j
                finished[b].append(Hypothesis(
                    tokens[row].tolist(), score,
                    _length_normalised(score, tokens.shape[1], length_penalty),
                    alphas[row].cpu(), False,
                ))
    return [sorted(f, key=lambda h: h.score, reverse=True)[:n_best] for f in finished]
