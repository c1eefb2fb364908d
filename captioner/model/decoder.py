"""LSTM decoder with soft attention (Xu et al. 2015, section 3.1.2)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from captioner.model.attention import HardAttention, build_attention

State = tuple[torch.Tensor, torch.Tensor]
IMAGENET_CLASSES = 1000  # the evidence the semantic attributes read (captioner.model.evidence)


def attribute_input(probabilities: torch.Tensor) -> torch.Tensor:
    """ImageNet probabilities (B, 1000) -> what attribute_proj reads: their square roots, which
    keep the confident labels' lead but lift the second and third guesses out of the noise floor
    (probabilities themselves are nearly one-hot; log-probabilities are dominated by the ~990
    classes that are not there)."""
    return probabilities.clamp_min(0.0).sqrt()


class Decoder(Protocol):
    """What decoding (captioner.model.decoding) needs of a decoder: AttentionDecoder has it, and so has
    DecoderEnsemble (captioner.model.ensemble), whose tensors carry a members axis. `step` takes
    each image's annotations and keys once (N images) and R = N x W rows of words and state, each
    image's W rows consecutive."""

    def prepare(
        self, features: torch.Tensor, attributes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def init_state(self, features: torch.Tensor, focus: torch.Tensor | None = None) -> State: ...

    def step(
        self,
        features: torch.Tensor,
        keys: torch.Tensor,
        words: torch.Tensor,
        state: State,
        focus: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]: ...


def reads_attributes(decoder: object) -> bool:
    """Whether a decoder's prepare wants each image's ImageNet probabilities (semantic_attributes);
    decoders that know nothing of them (e.g. a runtime's) do not."""
    return bool(getattr(decoder, "reads_attributes", False))


class AttentionDecoder(nn.Module):
    """Writes a caption one word at a time while attending over the annotation grid.

    The backbone's annotation vectors (D = 1280 or 2048) are first projected to
    `annotation_dim` (512, the D of the paper's VGG features): this keeps the per-word cost,
    which dominates beam search on a CPU, small. `annotation_dim=None` attends over the
    backbone's vectors as they are (an ablation).

    Per step: attention from h_{t-1}; gating scalar beta = sigmoid(f_beta(h_{t-1})) scales the
    context z_t (gate=False: z_t unscaled, an ablation); the LSTM reads [E y_{t-1}; z_t]; the
    deep output layer predicts y_t from L_o(tanh(E y_{t-1} + L_h h_t + L_z z_t)), or, with
    deep_output=False, a plain L_o(h_t) (the common simplification, kept for comparison).

    semantic_attributes=True (You et al. 2016; Hendricks et al. 2016): the image's ImageNet label
    distribution, projected by `attribute_proj`, is added to every annotation vector in prepare.
    The context z_t (alphas sum to 1) then carries it at every step into the LSTM and the deep
    output, and h0/c0 through the mean; `step` is unchanged. attribute_proj starts at zero, so a
    decoder fine-tuned from one without attributes starts exactly where that one was.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        annotation_dim: int | None = 512,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention_dim: int = 512,
        attention: str = "additive",
        dropout: float = 0.5,
        input_dropout: float = 0.0,
        deep_output: bool = True,
        gate: bool = True,
        semantic_attributes: bool = False,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        if annotation_dim is None:
            self.feature_proj: nn.Module = nn.Identity()
        else:
            self.feature_proj = nn.Linear(feature_dim, annotation_dim)
            feature_dim = annotation_dim
        self.attribute_proj: nn.Linear | None = None
        if semantic_attributes:
            self.attribute_proj = nn.Linear(IMAGENET_CLASSES, feature_dim)
            nn.init.zeros_(self.attribute_proj.weight)
            nn.init.zeros_(self.attribute_proj.bias)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.attention = build_attention(attention, feature_dim, hidden_dim, attention_dim)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.f_beta = nn.Linear(hidden_dim, feature_dim) if gate else None
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.deep_output = deep_output
        if deep_output:
            self.out_hidden = nn.Linear(hidden_dim, embed_dim)  # L_h
            self.out_context = nn.Linear(feature_dim, embed_dim)  # L_z
        self.dropout = nn.Dropout(dropout)
        self.input_dropout = nn.Dropout(input_dropout)  # on words and annotations: Flickr8k is small
        self.classifier = nn.Linear(embed_dim if deep_output else hidden_dim, vocab_size)  # L_o
        self.word_tables = True  # False: decode through nn.LSTMCell (to measure what the tables gain)
        self._tables: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # _word_tables()
        self.register_load_state_dict_post_hook(lambda module, keys: module.forget_tables())

    def forget_tables(self) -> None:
        """Drop the word tables built from the weights (see _word_tables): done by train(), eval()
        and load_state_dict; call it after changing the weights in place any other way."""
        self._tables = None

    @property
    def reads_attributes(self) -> bool:
        """Whether prepare wants the image's ImageNet probabilities (semantic_attributes)."""
        return self.attribute_proj is not None

    def train(self, mode: bool = True) -> AttentionDecoder:
        self.forget_tables()  # eval() after training: the optimizer changed the weights in place
        return super().train(mode)

    def prepare(
        self,
        features: torch.Tensor,  # (B, L, D)
        attributes: torch.Tensor | None = None,  # (B, 1000) ImageNet probabilities
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image work done once: backbone features (B, L, D) (and, with semantic attributes,
        the ImageNet probabilities) -> annotations (B, L, A) and the attention keys."""
        annotations = self.feature_proj(features)
        if (attributes is None) != (self.attribute_proj is None):
            raise ValueError(
                "attributes: this decoder reads semantic attributes, pass the ImageNet probabilities"
                if attributes is None
                else "attributes: this decoder has no semantic attributes (semantic_attributes=False)"
            )
        if attributes is not None and self.attribute_proj is not None:
            if attributes.shape != (features.shape[0], IMAGENET_CLASSES):
                raise ValueError(
                    f"attributes must be (B={features.shape[0]}, {IMAGENET_CLASSES}) ImageNet "
                    f"probabilities, got {tuple(attributes.shape)}"
                )
            annotations = annotations + self.attribute_proj(attribute_input(attributes))[:, None, :]
        annotations = self.input_dropout(annotations)
        return annotations, self.attention.prepare(annotations)

    def init_state(self, features: torch.Tensor, focus: torch.Tensor | None = None) -> State:
        """h0 and c0 from the mean annotation vector (with a focus bias (B, L): the average
        weighted by softmax(bias), the attention that bias alone would give)."""
        if focus is None:
            mean = features.mean(dim=1)  # (B, D)
        else:
            mean = torch.bmm(torch.softmax(focus, dim=1).unsqueeze(1), features).squeeze(1)
        return torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def step(
        self,
        features: torch.Tensor,  # (N, L, A) annotations from prepare()
        keys: torch.Tensor,  # attention keys from prepare()
        words: torch.Tensor,  # (R,) previous word ids, R = N x W: each image's W rows together
        state: State,  # (R, H) each
        focus: torch.Tensor | None = None,  # (R, L) added to the attention scores
    ) -> tuple[torch.Tensor, State, torch.Tensor, torch.Tensor]:
        """One word for R rows: W per image (beam search's beams share their image's grid, read
        once a step). Returns logits (R, V), the new state, alpha (R, L) and the gate (R,): how
        much the image fed this word, 0-1, the mean over the A channels of beta =
        sigmoid(f_beta(h_{t-1})) (1 without a gate: the context passes unscaled)."""
        embedded = self.input_dropout(self.embedding(words))  # (R, E)
        state, context, alpha, beta = self._recur(features, keys, embedded, state, focus, words)
        gate = beta.mean(dim=-1) if beta is not None else alpha.new_ones(alpha.shape[0])
        return self._output(embedded, state[0], context), state, alpha, gate

    def _recur(self, features, keys, embedded, state: State, focus=None, words=None):
        """Attention from h_{t-1}, gated context z_t, then the LSTM update."""
        h, c = state
        context, alpha = self.attention(features, h, keys=keys, bias=focus)
        beta = None
        if self.f_beta is not None:
            beta = torch.sigmoid(self.f_beta(h))  # (B, A)
            context = beta * context  # gated z_t
        tables = self._word_tables() if words is not None else None
        if tables is None:
            h, c = self.lstm(torch.cat([embedded, context], dim=1), (h, c))
            return (h, c), context, alpha, beta
        word_gates, context_weight = tables
        gates = torch.addmm(word_gates[words], context, context_weight.t())  # (B, 4H)
        gates = torch.addmm(gates, h, self.lstm.weight_hh.t())
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)  # nn.LSTMCell's order
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return (h, c), context, alpha, beta

    def _word_tables(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For decoding without gradients: each word's share of the LSTM's gates, W_ih[:, :E] E y
        + b_ih + b_hh (V, 4H), and the context's columns of W_ih (4H, A), contiguous.

        One step of decoding is memory-bound on a CPU: it streams every weight matrix once for a
        few rows. The embedding's 4H x E block of W_ih is a quarter of those bytes; looked up per
        word instead, a step reads (B, 4H) of it. Built once per set of weights: forgotten by
        train()/eval() (which come after an optimizer's in-place updates) and load_state_dict, and
        keyed on the tensors' storage, dtype and device (.to() and .half() make new ones); None
        where it does not apply: with gradients, in train mode, a quantized LSTM, or with
        `word_tables` off.
        """
        lstm = self.lstm
        if (
            not self.word_tables
            or torch.is_grad_enabled()
            or self.training
            or type(lstm) is not nn.LSTMCell
            or lstm.bias_ih is None
            or lstm.bias_hh is None
        ):
            return None
        sources = (self.embedding.weight, lstm.weight_ih, lstm.bias_ih, lstm.bias_hh)
        key = tuple((t.data_ptr(), t.dtype, t.device) for t in sources)
        cached = self._tables
        if cached is None or cached[0] != key:
            embed_dim = self.embedding.weight.shape[1]
            word_gates = torch.addmm(
                lstm.bias_ih + lstm.bias_hh, self.embedding.weight, lstm.weight_ih[:, :embed_dim].t()
            )
            cached = (key, (word_gates, lstm.weight_ih[:, embed_dim:].contiguous()))
            self._tables = cached
        return cached[1]

    def _output(self, embedded, h, context) -> torch.Tensor:
        """Deep output layer: L_o(tanh(E y_{t-1} + L_h h_t + L_z z_t)), or plain L_o(h_t)."""
        if not self.deep_output:
            return self.classifier(self.dropout(h))
        deep = torch.tanh(embedded + self.out_hidden(h) + self.out_context(context))
        return self.classifier(self.dropout(deep))

    def forward(
        self,
        features: torch.Tensor,  # (B, L, D)
        captions: torch.Tensor,  # (B, T): <start> w1 .. wn <end> <pad>..
        lengths: torch.Tensor,  # (B,) tokens incl. <start> and <end>
        image_index: torch.Tensor | None = None,  # (B,) row of `features` for each caption
        return_locations: bool = False,  # hard attention: also the cells attended
        attributes: torch.Tensor | None = None,  # (B, 1000) per row of `features` (see prepare)
    ) -> tuple[torch.Tensor, ...]:
        """Teacher forcing. Returns logits (B, T-1, V) and alphas (B, T-1, L), zero past the end;
        with `return_locations`, also the cells s_t the hard attention used (B, T-1), -1 where
        the context was the expectation and past the end.

        The batch is sorted by length so that step t only runs the captions still going:
        no compute is spent on padding. With `image_index`, `features` holds each image once
        and is projected once, however many captions the image has.
        """
        annotations, keys = self.prepare(features, attributes)
        if image_index is not None:
            annotations, keys = annotations[image_index], keys[image_index]
        batch, num_cells = captions.shape[0], annotations.shape[1]
        steps = lengths.to(torch.long) - 1  # predictions per caption
        order = torch.argsort(steps, descending=True, stable=True)
        features, keys, captions, steps = annotations[order], keys[order], captions[order], steps[order]
        state = self.init_state(features)
        max_steps = int(steps[0])
        embedded = self.input_dropout(self.embedding(captions[:, :max_steps]))  # (B, T, E)
        hidden = features.new_zeros(batch, max_steps, state[0].shape[1])
        contexts = features.new_zeros(batch, max_steps, features.shape[2])
        alphas = features.new_zeros(batch, max_steps, num_cells)
        active = steps.unsqueeze(1) > torch.arange(max_steps, device=steps.device)  # (B, T)
        locations = captions.new_full((batch, max_steps), -1)
        for t, n in enumerate(active.sum(dim=0).tolist()):
            state = (state[0][:n], state[1][:n])
            state, context, alpha, _ = self._recur(features[:n], keys[:n], embedded[:n, t], state)
            hidden[:n, t], contexts[:n, t], alphas[:n, t] = state[0], context, alpha
            location = self.attention.location if isinstance(self.attention, HardAttention) else None
            if return_locations and location is not None:
                locations[:n, t] = location
        # The output layer runs once over all real positions: one large matrix product.
        logits = features.new_zeros(batch, max_steps, self.vocab_size)
        logits[active] = self._output(embedded[active], hidden[active], contexts[active])
        inverse = torch.argsort(order)
        if return_locations:
            return logits[inverse], alphas[inverse], locations[inverse]
        return logits[inverse], alphas[inverse]
