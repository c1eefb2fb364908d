"""Several decoders, trained apart on the same annotation grid, that write one caption together.

Each member reads the same grid and keeps its own LSTM state; at every word the ensemble
averages the members' word log-probabilities (a product of experts: a word wins only if every
member finds it likely). Independently trained models make partly independent mistakes, so
the average usually scores a little above each of them (the README has measurements), at the
cost of running every decoder. `DecoderEnsemble` has the decoding interface of
`AttentionDecoder` (prepare, init_state, step), so greedy, beam search and sampling run it
unchanged; the members' tensors are stacked on a second axis, so a beam's row indexing moves
every member's state at once. Ensembles are an inference-time wrapper, built from trained
models (`scripts/export_model.py A B target`, `folder.load_ensemble`), never trained: it has
no teacher-forcing forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from captioner.model.decoder import AttentionDecoder, State


class DecoderEnsemble(nn.Module):
    def __init__(self, members: Sequence[AttentionDecoder]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 decoders, got {len(members)}")
        self.members = nn.ModuleList(members)

    def _decoders(self) -> list[AttentionDecoder]:
        """The members as what they are (an nn.ModuleList hands them out typed as nn.Module)."""
        return cast("list[AttentionDecoder]", list(self.members))

    @property
    def reads_attributes(self) -> bool:
        """Whether the members read semantic attributes (they share one architecture)."""
        return any(member.reads_attributes for member in self._decoders())

    def prepare(
        self, features: torch.Tensor, attributes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (B, L, D) (and semantic attributes (B, 1000), which every member
        reads alike) -> every member's annotations (B, M, L, A) and keys."""
        prepared = [member.prepare(features, attributes) for member in self._decoders()]
        return torch.stack([a for a, _ in prepared], 1), torch.stack([k for _, k in prepared], 1)

    def init_state(self, annotations: torch.Tensor, focus: torch.Tensor | None = None) -> State:
        """Each member's h0 and c0 from its own annotations: (B, M, H) each."""
        states = [member.init_state(annotations[:, i], focus) for i, member in enumerate(self._decoders())]
        return torch.stack([h for h, _ in states], 1), torch.stack([c for _, c in states], 1)

    def step(
        self,
        annotations: torch.Tensor,
        keys: torch.Tensor,
        words: torch.Tensor,
        state: State,
        focus: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
        """One word: the members' mean word log-probabilities (B, V; decoding renormalises
        them), the new states, and the members' mean attention (B, L) and gate (B,), which the
        attention maps and CaptionResult.gate then show."""
        log_probs, hidden, cells, alphas, gates = [], [], [], [], []
        for i, member in enumerate(self._decoders()):
            logits, (h, c), alpha, gate = member.step(
                annotations[:, i], keys[:, i], words, (state[0][:, i], state[1][:, i]), focus
            )
            log_probs.append(F.log_softmax(logits, dim=-1))
            hidden.append(h)
            cells.append(c)
            alphas.append(alpha)
            gates.append(gate)
        state = (torch.stack(hidden, 1), torch.stack(cells, 1))
        return torch.stack(log_probs).mean(0), state, torch.stack(alphas).mean(0), torch.stack(gates).mean(0)
