"""Turning annotation grids into captions.

`beam_search` is how every caption the library shows is found (beam 1 is greedy decoding);
`decode_tensors` decodes greedily or by sampling while keeping the autograd graph, for
self-critical training. Both run a whole batch of images at once, always stop (at `max_length`
words at the latest) and always return a caption, even if `<end>` is never produced.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captioner.model.constraints import Constraints
from captioner.model.decoder import Decoder
from captioner.model.options import DecodeOptions
from captioner.model.vocabulary import Vocabulary


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    log_prob: float  # sum of the log-probabilities of the tokens (and of <end> if finished)
    score: float  # what beam search ranks by: log_prob, length-normalised if asked
    alphas: torch.Tensor  # (len(tokens), L): the attention that produced each word
    finished: bool  # False when max_length cut the caption before <end>
    gates: torch.Tensor  # (len(tokens),) the gate of each word's step
    met: int = 0  # constraints the caption meets (constrained beam search ranks by it first)


# Never written: <pad> and <start> are not words, and "<unk>" tells a reader nothing (the model
# still learns rare words' share of probability in training; decoding picks the best real word).
BANNED_IDS = [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]


def _log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax over the words a caption may contain (never BANNED_IDS)."""
    logits = logits / temperature if temperature != 1.0 else logits
    return F.log_softmax(logits + _banned(logits.shape[-1], logits.dtype, logits.device), dim=-1)


@functools.lru_cache(maxsize=8)
def _banned(vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(V,): -inf at BANNED_IDS, 0 elsewhere; made once (a step of beam search is ~40 small ops,
    each of which costs a few microseconds on a CPU whatever its size)."""
    with torch.inference_mode(False):  # a normal tensor, which training's autograd may read too
        mask = torch.zeros(vocab, dtype=dtype, device=device)
        mask[BANNED_IDS] = float("-inf")
    return mask


def _block_repeated_ngrams(logp: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """Forbid, per row, each word that would complete an n-gram the caption already holds
    ("a man in a red shirt and a man in a red shirt" cannot happen with n = 3)."""
    if n <= 0 or tokens.shape[1] < n - 1:
        return
    for row, seq in enumerate(tokens.tolist()):
        prefix = seq[len(seq) - n + 1 :] if n > 1 else []
        banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i : i + n - 1] == prefix]
        if banned:
            logp[row, banned] = float("-inf")


def _length_normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / max(length, 1) ** length_penalty if length_penalty else log_prob


def _prepare(decoder: Decoder, features: torch.Tensor, attributes: torch.Tensor | None):
    """decoder.prepare, with the attributes only when there are some: a decoder without semantic
    attributes may not take the argument at all."""
    return decoder.prepare(features) if attributes is None else decoder.prepare(features, attributes)


def decode_tensors(
    decoder: Decoder,
    features: torch.Tensor,  # (B, L, D)
    max_length: int = 20,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    samples_per_image: int = 1,
    no_repeat_ngram_size: int = 0,
    focus: torch.Tensor | None = None,  # (B, L) attention bias (captioner.model.focus)
    attributes: torch.Tensor | None = None,  # (B, 1000) semantic attributes (AttentionDecoder.prepare)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy or sampled decoding that keeps the autograd graph (self-critical training uses it).

    With samples_per_image = S, rows come image by image: (B*S) rows, the S samples of image 0
    first. Returns tokens (B*S, T) padded with <pad>, log_probs (B*S, T) of the chosen tokens,
    mask (B*S, T) true for real tokens (the words and the final <end>), and alphas (B*S, T, L).
    """
    features, keys = _prepare(decoder, features, attributes)  # one grid per image, read by its S rows
    state = decoder.init_state(features, focus)
    if samples_per_image > 1:
        state = (
            state[0].repeat_interleave(samples_per_image, 0),
            state[1].repeat_interleave(samples_per_image, 0),
        )
        focus = focus.repeat_interleave(samples_per_image, dim=0) if focus is not None else None
    batch = state[0].shape[0]
    words = features.new_full((batch,), Vocabulary.start_id, dtype=torch.long)
    alive = torch.ones(batch, dtype=torch.bool, device=features.device)
    tokens: list[torch.Tensor] = []
    log_probs, masks, alphas = [], [], []
    for _ in range(max_length):
        logits, state, alpha, _ = decoder.step(features, keys, words, state, focus)
        logp = _log_probs(logits, 1.0 if greedy else temperature)  # (B, V)
        if no_repeat_ngram_size and tokens:
            _block_repeated_ngrams(logp, torch.stack(tokens, 1), no_repeat_ngram_size)
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
    return (torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(masks, 1), torch.stack(alphas, 1))


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    features: torch.Tensor,  # (B, L, D)
    options: DecodeOptions,
    focus: torch.Tensor | None = None,  # (B, L) attention bias (captioner.model.focus)
    word_bias: torch.Tensor | None = None,  # (B, V) added to every step's log-probabilities
    constraints: Constraints | None = None,  # words each image's caption must contain
    attributes: torch.Tensor | None = None,  # (B, 1000) semantic attributes (AttentionDecoder.prepare)
) -> list[list[Hypothesis]]:
    """Per image, its best captions, best first: beam search over all images x beams in one
    tensor batch (options.beam_size 1 is greedy decoding).

    A beam that emits <end> moves to its image's finished list and its slot is refilled from
    the other beams' expansions. An image is done once it has `beam_size` finished captions
    (it then leaves the batch); beams still alive at `max_length` count as (unfinished)
    candidates, so there is always an answer.
    Ranking: log_prob / length**length_penalty (0 = plain log-probability).
    no_repeat_ngram_size = n > 0: no caption contains the same n-gram twice.
    word_bias: per image, a log-probability bias on words (captioner.model.evidence.evidence_bias).
    constraints: constrained beam search (Anderson et al. 2017; captioner.model.constraints):
    each image keeps one beam of beam_size per subset of met constraints ("state"); an
    expansion moves to the state of the constraints its caption then meets, and each state keeps
    its best. Captions meeting every constraint rank first and count towards `beam_size`
    finished; the others are fallbacks. Without constraints there is one state: plain search.
    attributes: the ImageNet probabilities a decoder with semantic attributes reads; they enter
    its annotations once, in prepare, so the beams inherit them with the annotations.
    Returns, per image, the `n_best` (default: beam_size) hypotheses.
    """
    batch, num_cells = features.shape[:2]
    k, n_best, length_penalty = options.beam_size, options.per_image, options.length_penalty
    device = features.device
    states = constraints.states if constraints is not None else 1
    word_bits = constraints.word_bits.to(device) if constraints is not None else None  # (B, V)
    goal = list(constraints.counts) if constraints is not None else [0] * batch  # constraints to meet
    width = states * k  # rows per image from step 1 on: state s holds rows s*K .. s*K + K-1
    # Until the first word all beams of an image are identical: step 0 runs one row per image.
    feats, keys = _prepare(decoder, features, attributes)  # (n, L, A): one grid per image searching
    state = decoder.init_state(feats, focus)
    words = torch.full((batch,), Vocabulary.start_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, 1, device=device)  # (n, beams) for the n images still searching
    met = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (n, beams): constraints met, as bits
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    alphas = torch.empty(batch, 0, num_cells, device=device)
    gates = torch.empty(batch, 0, device=device)  # of each word's step, read off h_{t-1}
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    searching = list(range(batch))  # image of each row block; done images leave the batch

    def answers(b: int) -> int:  # finished captions of image b that meet all its constraints
        return sum(h.met == goal[b] for h in finished[b])

    for step in range(options.max_length):
        logits, state, alpha, gate = decoder.step(feats, keys, words, state, focus)
        logp = _log_probs(logits)
        _block_repeated_ngrams(logp, tokens, options.no_repeat_ngram_size)
        if word_bias is not None:
            logp = logp + word_bias
        (n, beams), vocab = beam_scores.shape, logp.shape[-1]
        candidates = (beam_scores.unsqueeze(-1) + logp.view(n, beams, vocab)).view(n, -1)
        if word_bits is None:
            top_scores, top_index = candidates.topk(k, dim=1)  # (n, K)
        else:  # each state's best K among the expansions that land in it
            target = (met.unsqueeze(-1) | word_bits[searching].unsqueeze(1)).view(n, -1)  # (n, beams*V)
            best = [candidates.masked_fill(target != s, float("-inf")).topk(k, dim=1) for s in range(states)]
            top_scores, top_index = (
                torch.cat([b.values for b in best], 1),
                torch.cat([b.indices for b in best], 1),
            )
            met = torch.arange(states, device=device).repeat_interleave(k).expand(n, -1)  # (n, W)
        origin = (top_index // vocab + beams * torch.arange(n, device=device)[:, None]).view(-1)
        words = (top_index % vocab).view(-1)  # row i*W + j: beam j of searching[i]
        tokens = torch.cat([tokens[origin], words.unsqueeze(1)], dim=1)
        alphas = torch.cat([alphas[origin], alpha[origin].unsqueeze(1)], dim=1)
        gates = torch.cat([gates[origin], gate[origin].unsqueeze(1)], dim=1)
        state = (state[0][origin], state[1][origin])
        if step == 0:
            focus = focus.repeat_interleave(width, dim=0) if focus is not None else None
            word_bias = word_bias.repeat_interleave(width, dim=0) if word_bias is not None else None
            met = met.expand(n, width) if word_bits is None else met

        # scores are log-probabilities (plus finite biases): -inf marks a dead beam, never +inf or NaN
        ended = (words.view(n, width) == Vocabulary.end_id) & (top_scores > float("-inf"))
        beam_scores = top_scores.masked_fill(ended, float("-inf"))
        live = (beam_scores > float("-inf")).any(dim=1)
        if ended.any():
            length = tokens.shape[1]
            for i, j in ended.nonzero().tolist():
                row, score = i * width + j, float(top_scores[i, j])
                finished[searching[i]].append(
                    Hypothesis(
                        tokens[row, :-1].tolist(),
                        score,
                        _length_normalised(score, length, length_penalty),
                        alphas[row, :-1].cpu(),
                        True,
                        gates[row, :-1].cpu(),
                        int(met[i, j]).bit_count(),
                    )
                )
            live &= torch.tensor([answers(b) < k for b in searching], device=device)
        if not live.all():  # drop the images that are done: no more work is spent on them
            keep = live.nonzero().squeeze(1)
            if len(keep) == 0:
                searching = []
                break
            rows = (width * keep[:, None] + torch.arange(width, device=device)).view(-1)
            feats, keys, words, state = feats[keep], keys[keep], words[rows], (state[0][rows], state[1][rows])
            focus = focus[rows] if focus is not None else None
            word_bias = word_bias[rows] if word_bias is not None else None
            tokens, alphas, gates = tokens[rows], alphas[rows], gates[rows]
            beam_scores, met = beam_scores[keep], met[keep]
            searching = [searching[i] for i in keep.tolist()]

    for i, b in enumerate(searching):  # max_length reached: live beams are candidates too
        if answers(b) >= k:  # not n_best: asking for fewer must not change the best
            continue
        for j in range(beam_scores.shape[1]):
            score = float(beam_scores[i, j])
            if score != float("-inf"):
                row = i * beam_scores.shape[1] + j
                finished[b].append(
                    Hypothesis(
                        tokens[row].tolist(),
                        score,
                        _length_normalised(score, tokens.shape[1], length_penalty),
                        alphas[row].cpu(),
                        False,
                        gates[row].cpu(),
                        int(met[i, j]).bit_count(),
                    )
                )
    return [sorted(f, key=lambda h: (h.met, h.score), reverse=True)[:n_best] for f in finished]
