"""Training stochastic "hard" attention (Xu et al. 2015, section 4.1).

With s = (s_1 .. s_T) the sampled locations and y the caption, the model maximises the
variational lower bound L_s = sum_s p(s | a) log p(y | s, a) <= log p(y | a), whose gradient
is estimated from one sample s~ per caption (eq. 12):

    dL_s/dW ~= d log p(y | s~, a)/dW                                  word likelihood, context a_{s~}
             + (log p(y | s~, a) - b) d log p(s~ | a)/dW                REINFORCE over the locations
             + lambda_e dH[s~]/dW                                       entropy of alpha

with b a moving average of the reward log p(y | s~, a): b_k = decay b_{k-1} + (1 - decay) r_k
(`--hard_baseline_decay`, 0.9 as in the paper; b starts at the first batch's mean reward
rather than 0, so the first advantages are not all hugely negative). With probability
`--hard_expectation_probability` (0.5, the paper's) a batch uses the expected context
sum_i alpha_i a_i instead, i.e. trains as soft attention. `hard_attention_loss` is a surrogate
whose gradient is this estimate (negated, to minimise), scaled like the cross-entropy: per word.

Self-critical training treats the locations as part of the policy: a sampled caption's
log-probability is that of its words plus that of the locations drawn for them, and both share
the caption's CIDEr-D advantage (`sampled_locations`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from captioner.model.attention import HardAttention
from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist
from captioner.training.inputs import StepBatch
from captioner.training.losses import caption_loss


def hard_attention_of(net: torch.nn.Module) -> HardAttention | None:
    """The training model's hard attention module (through a DDP wrapper), or None if soft."""
    model = getattr(net, "module", net)
    attention = getattr(model.decoder, "attention", None)
    return attention if isinstance(attention, HardAttention) else None


def caption_log_likelihoods(logits: torch.Tensor, captions: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """The REINFORCE reward: log p(y_n | s~_n, a) of each caption (N,), summed over its words.

    logits (N, T-1, V) from teacher forcing, captions (N, T). No gradient: a reward is a number."""
    targets = captions[:, 1 : logits.shape[1] + 1]  # (N, T-1)
    nll = F.cross_entropy(
        logits.detach().transpose(1, 2).float(), targets, ignore_index=pad_id, reduction="none"
    )  # (N, T-1), 0 at padding
    return -nll.sum(dim=1)


def location_log_probs(alphas: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """log alpha_t[s_t] (N, T) of the drawn locations (N, T); 0 where none was drawn (-1)."""
    drawn = locations >= 0
    chosen = alphas.gather(2, locations.clamp_min(0).unsqueeze(2)).squeeze(2)  # (N, T)
    return torch.where(drawn, chosen.clamp_min(1e-30).log(), torch.zeros_like(chosen))


def reinforce_term(
    alphas: torch.Tensor, locations: torch.Tensor, advantages: torch.Tensor, token_count: float
) -> torch.Tensor:
    """-(1/tokens) sum_n (r_n - b) log p(s~_n | a): minimising it moves alpha towards the
    locations of the captions that were explained better than the baseline, away from the rest."""
    per_caption = location_log_probs(alphas, locations).sum(dim=1)  # (N,) log p(s~_n | a)
    return -(advantages.detach() * per_caption).sum() / token_count


def attention_entropy(alphas: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Mean entropy H(alpha_t) in nats over the real words (`words` (N, T) true for them)."""
    entropy = -(alphas * alphas.clamp_min(1e-30).log()).sum(dim=-1)  # (N, T)
    return entropy[words].mean()


def next_baseline(attention: HardAttention, rewards_mean: float, decay: float) -> float:
    """This batch's baseline b_{k-1} (the first batch: its own mean reward), and the update
    b_k = decay b_{k-1} + (1 - decay) r_k of the running value kept in `attention`'s buffers."""
    first = int(attention.baseline_updates) == 0
    baseline = rewards_mean if first else float(attention.reward_baseline)
    updated = rewards_mean if first else decay * baseline + (1 - decay) * rewards_mean
    attention.reward_baseline.fill_(updated)
    attention.baseline_updates.add_(1)
    return baseline


def hard_attention_loss(
    cfg: TrainConfig,
    net: torch.nn.Module,
    batch: StepBatch,
    dist: Dist,
    device: torch.device,
    token_count: float,
    caption_count: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One cross-entropy-stage batch of a hard-attention model. Draws, from the global torch RNG
    (saved in the run state), whether the batch uses the expected context, then the locations."""
    attention = hard_attention_of(net)
    if attention is None:
        raise ValueError("hard_attention_loss: the model's attention is soft, not hard")
    expectation = bool(torch.rand(()) < cfg.hard_expectation_probability)
    with attention.locating("expectation" if expectation else "sample"):
        logits, alphas, locations = net(
            batch.inputs,
            batch.captions,
            batch.lengths,
            batch.image_index,
            from_stage=batch.from_stage,
            return_locations=True,
        )
    loss, stats = caption_loss(
        logits,
        batch.captions,
        alphas,
        cfg.alpha_reg,
        cfg.label_smoothing,
        token_count=token_count,
        caption_count=caption_count,
    )
    words = batch.captions[:, 1 : logits.shape[1] + 1] != 0  # (N, T-1)
    entropy = attention_entropy(alphas, words)
    loss = loss - cfg.hard_entropy_weight * entropy
    stats |= {"attention_entropy": entropy.item(), "sampled_batches": float(not expectation)}
    if expectation:
        return loss, stats
    rewards = caption_log_likelihoods(logits, batch.captions)  # (N,)
    total, count = dist.all_sum([float(rewards.sum()), float(len(rewards))], device)
    baseline = next_baseline(attention, total / count, cfg.hard_baseline_decay)
    loss = loss + reinforce_term(alphas, locations, rewards - baseline, token_count)
    return loss, stats | {"location_reward": total / count, "location_baseline": baseline}


@contextmanager
def sampled_locations(net: torch.nn.Module) -> Iterator[list[torch.Tensor] | None]:
    """For self-critical training: within the block a hard-attention model samples its
    locations (whatever its train/eval mode) and the yielded list collects them, one (B,) tensor
    per decoding step. Yields None for a soft-attention model."""
    attention = hard_attention_of(net)
    if attention is None:
        yield None
        return
    drawn: list[torch.Tensor] = []
    handle = attention.register_forward_hook(lambda module, args, output: drawn.append(module.location))
    try:
        with attention.locating("sample"):
            yield drawn
    finally:
        handle.remove()
