"""LSTM decoder with soft attention (Xu et al. 2015, section 3.1.2)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import build_attention

State = tuple[torch.Tensor, torch.Tensor]


class AttentionDecoder(nn.Module):
    """Writes a caption one word at a time while attending over the annotation grid.

    The backbone's annotation vectors (D = 1280 or 2048) are first projected to
    `annotation_dim` (512, the D of the paper's VGG features): this keeps the per-word cost,
    which dominates beam search on a CPU, small.

    Per step: attention from h_{t-1}; gating scalar beta = sigmoid(f_beta(h_{t-1})) scales the
    context z_t; the LSTM reads [E y_{t-1}; z_t]; the deep output layer predicts
    y_t from L_o(tanh(E y_{t-1} + L_h h_t + L_z z_t)).
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        annotation_dim: int = 512,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        attention: str = "additive",
        dropout: float = 0.5,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.feature_proj = nn.Linear(feature_dim, annotation_dim)
        feature_dim = annotation_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = build_attention(attention, feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, feature_dim)
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.out_hidden = nn.Linear(hidden_dim, embed_dim)  # L_h
        self.out_context = nn.Linear(feature_dim, embed_dim)  # L_z
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, vocab_size)  # L_o

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image work done once: backbone features (B, L, D) -> annotations (B, L, A)
        and the attention keys."""
        annotations = self.feature_proj(features)
        return annotations, self.attention.prepare(annotations)

    def init_state(self, features: torch.Tensor) -> State:
        """h0 and c0 from the mean annotation vector."""
        mean = features.mean(dim=1)  # (B, D)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def step(
        self,
        features: torch.Tensor,  # (B, L, A) annotations from prepare()
        keys: torch.Tensor,  # attention keys from prepare()
        words: torch.Tensor,  # (B,) previous word ids
        state: State,
    ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One word: returns logits (B, V), the new state and alpha (B, L)."""
        h, c = state
        context, alpha = self.attention(features, h, keys=keys)
        context = torch.sigmoid(self.f_beta(h)) * context  # gated z_t, (B, D)
        embedded = self.embedding(words)  # (B, E)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))
        deep = torch.tanh(embedded + self.out_hidden(h) + self.out_context(context))
        return self.classifier(self.dropout(deep)), (h, c), alpha

    def forward(
        self,
        features: torch.Tensor,  # (B, L, D)
        captions: torch.Tensor,  # (B, T): <start> w1 .. wn <end> <pad>..
        lengths: torch.Tensor,  # (B,) tokens incl. <start> and <end>
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. Returns logits (B, T-1, V) and alphas (B, T-1, L), zero past the end.

        The batch is sorted by length so that step t only runs the captions still going:
        no compute is spent on padding.
        """
        batch, num_cells = features.shape[:2]
        steps = lengths.to(torch.long) - 1  # predictions per caption
        order = torch.argsort(steps, descending=True)
        features, captions, steps = features[order], captions[order], steps[order]
        features, keys = self.prepare(features)
        state = self.init_state(features)
        max_steps = int(steps[0])
        logits = features.new_zeros(batch, max_steps, self.vocab_size)
        alphas = features.new_zeros(batch, max_steps, num_cells)
        active_counts = (steps.unsqueeze(0) > torch.arange(max_steps, device=steps.device)[:, None])
        active_counts = active_counts.sum(dim=1).tolist()
        for t, n in enumerate(active_counts):
            state = (state[0][:n], state[1][:n])
            step_logits, state, alpha = self.step(features[:n], keys[:n], captions[:n, t], state)
            logits[:n, t] = step_logits
            alphas[:n, t] = alpha
        inverse = torch.argsort(order)
        return logits[inverse], alphas[inverse]
