"""Beam search (beam 1: greedy), greedy and sampled decoding with gradients, and the real
learning test on the shapes world."""

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from captioner import Captioner, Vocabulary
from captioner.model.decoder import AttentionDecoder
from captioner.model.decoding import BANNED_IDS, Hypothesis, beam_search, decode_tensors
from captioner.model.options import DecodeOptions

from .shapes import all_examples

END = Vocabulary.end_id


def _random_decoder(vocab_size=12, feature_dim=32, seed=0):
    """A small untrained decoder: with few words it says <end> now and then, at random steps."""
    torch.manual_seed(seed)
    return AttentionDecoder(
        vocab_size, feature_dim, annotation_dim=16, embed_dim=16, hidden_dim=24, attention_dim=16, dropout=0.0
    ).eval()


def _random_features(batch, num_cells=9, feature_dim=32, seed=4):
    """Strong, varied features, so that the images' captions differ and end at different steps."""
    return 10 * torch.randn(batch, num_cells, feature_dim, generator=torch.Generator().manual_seed(seed))


class BigramDecoder(nn.Module):
    """Scripted next-word probabilities that depend only on the previous word.

    Same interface as AttentionDecoder, so beam search can be checked against hand-computed
    answers. `table[prev][next] = p`; every other word gets a negligible probability.
    """

    def __init__(self, vocab_size: int, table: dict[int, dict[int, float]]):
        super().__init__()
        logits = torch.full((vocab_size, vocab_size), -30.0)
        for prev, row in table.items():
            for word, p in row.items():
                logits[prev, word] = math.log(p)
        self.register_buffer("table", logits)
        self.vocab_size = vocab_size

    def prepare(self, features):
        return features, features

    def init_state(self, features, focus=None):
        zeros = features.new_zeros(features.shape[0], 1)
        return zeros, zeros

    def step(self, features, keys, words, state, focus=None):
        num_cells = features.shape[1]
        num_rows = len(words)  # no gate: the context passes unscaled
        return (
            self.table[words],
            state,
            features.new_full((num_rows, num_cells), 1.0 / num_cells),
            features.new_ones(num_rows),
        )


X, Y, Z = 4, 5, 6  # word ids after the four special tokens


def _search(decoder, features, beam_size=3, focus=None, **options) -> list[list[Hypothesis]]:
    """Beam search; unlike the API's default, repeated n-grams are allowed and captions are ranked
    by plain log-probability unless asked."""
    options = DecodeOptions(
        beam_size=beam_size, **{"no_repeat_ngram_size": 0, "length_penalty": 0.0, **options}
    )
    return beam_search(decoder, features, options, focus)


def _greedy(decoder, features, max_length, **options) -> list[Hypothesis]:
    """Greedy decoding: beam search with one beam."""
    return [hyps[0] for hyps in _search(decoder, features, 1, max_length=max_length, **options)]


@dataclass
class Decoded:
    tokens: list[int]
    log_prob: float
    finished: bool
    alphas: torch.Tensor


def _decoded(tokens, log_probs, mask, alphas) -> list[Decoded]:
    """decode_tensors' padded rows -> one caption per row (words without <end>)."""
    rows = []
    for seq, logp, m, alpha in zip(tokens.tolist(), log_probs, mask, alphas, strict=True):
        length = int(m.sum())
        finished = length > 0 and seq[length - 1] == END
        words = length - 1 if finished else length
        rows.append(Decoded(seq[:words], float(logp[:length].sum()), finished, alpha[:words]))
    return rows


def _sampled(decoder, features, max_length, greedy=False, **sampling) -> list[Decoded]:
    with torch.no_grad():
        return _decoded(*decode_tensors(decoder, features, max_length, greedy=greedy, **sampling))


def _allowed_log_probs(logits):
    """Log-softmax over the words a caption may contain: never <pad>, <start> or <unk>."""
    return torch.log_softmax(logits.index_fill(-1, torch.tensor(BANNED_IDS), float("-inf")), dim=-1)


@pytest.fixture(scope="module")
def shapes_features(trained_shapes_model):
    model, _, _ = trained_shapes_model
    pixels = torch.stack([model.encoder.transform(img) for img, _, _ in all_examples()])
    with torch.no_grad():
        return model.encoder(pixels)


# ----------------------------------------------------------------------------- greedy vs beam


@pytest.mark.parametrize("source", ["random", "shapes"])
def test_beam_of_one_is_greedy(source, trained_shapes_model, shapes_features):
    if source == "random":
        decoder, features = _random_decoder(), _random_features(6)
    else:
        decoder, features = trained_shapes_model[0].decoder, shapes_features
    greedy = _sampled(decoder, features, 12, greedy=True)  # decode_tensors' greedy path
    beams = _search(decoder, features, beam_size=1, max_length=12)
    for g, [b] in zip(greedy, beams, strict=True):
        assert b.tokens == g.tokens and b.finished == g.finished
        assert b.log_prob == pytest.approx(g.log_prob, abs=1e-4)
        torch.testing.assert_close(b.alphas, g.alphas)
    assert any(g.finished for g in greedy)
    if source == "random":  # covers captions cut at max_length too
        assert not all(g.finished for g in greedy)


@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_search_equals_one_image_at_a_time(beam_size):
    decoder = _random_decoder()
    features = _random_features(6)
    batched = _search(decoder, features, beam_size, max_length=10)
    for b in range(len(features)):
        alone = _search(decoder, features[b : b + 1], beam_size, max_length=10)[0]
        assert [h.tokens for h in batched[b]] == [h.tokens for h in alone]
        assert [h.finished for h in batched[b]] == [h.finished for h in alone]
        assert [h.score for h in batched[b]] == pytest.approx([h.score for h in alone], abs=1e-4)
        for h, a in zip(batched[b], alone, strict=True):
            torch.testing.assert_close(h.alphas, a.alphas)
    # the batch mixes images that are done early (beam_size captions ended) and images that
    # still have live beams when max_length cuts them
    finished_counts = [sum(h.finished for h in hyps) for hyps in batched]
    assert beam_size in finished_counts and min(finished_counts) < beam_size, finished_counts


def test_beam_search_n_best_are_ranked_distinct_and_rescore_exactly():
    decoder = _random_decoder()
    features = _random_features(4)
    results = _search(decoder, features, beam_size=4, max_length=8)
    for b, hyps in enumerate(results):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)  # n-best, best first
        assert len({tuple(h.tokens) for h in hyps}) == 4  # distinct captions
        for h in hyps:
            assert h.alphas.shape == (len(h.tokens), 9)
            assert all(t > Vocabulary.unk_id for t in h.tokens)  # never <pad>/<start>/<end>/<unk>
            assert h.finished or len(h.tokens) == 8
            # the reported log-prob is the model's: re-score the caption with teacher forcing
            ids = [Vocabulary.start_id, *h.tokens, *([END] if h.finished else [])]
            with torch.no_grad():
                logits, _ = decoder(features[b : b + 1], torch.tensor([ids]), torch.tensor([len(ids)]))
            logp = _allowed_log_probs(logits[0]).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum()
            assert h.log_prob == pytest.approx(float(logp), abs=1e-4)
    top = _search(decoder, features, beam_size=4, max_length=8, n_best=2)
    assert [[h.tokens for h in hyps] for hyps in top] == [[h.tokens for h in hyps[:2]] for hyps in results]


def test_n_best_does_not_change_the_best_caption():
    """`y y y` (unfinished at max_length) outscores the finished `x`: asking for fewer
    alternatives must not change which caption wins."""
    decoder = BigramDecoder(
        7, {Vocabulary.start_id: {Y: 0.6, X: 0.4}, X: {END: 0.6, X: 0.4}, Y: {Y: 0.9, Z: 0.1}}
    )
    features = torch.zeros(1, 4, 8)
    full = _search(decoder, features, beam_size=2, max_length=3)[0]
    assert [h.tokens for h in full] == [[Y, Y, Y], [X]]
    assert [h.finished for h in full] == [False, True]
    assert full[0].log_prob == pytest.approx(math.log(0.6 * 0.9 * 0.9), abs=1e-6)
    assert full[1].log_prob == pytest.approx(math.log(0.4 * 0.6), abs=1e-6)
    best = _search(decoder, features, beam_size=2, max_length=3, n_best=1)[0]
    assert [h.tokens for h in best] == [[Y, Y, Y]]


def test_length_penalty_prefers_the_longer_caption():
    """`x` has the higher log-probability (0.35 vs 0.27), `y z` the higher per-word one."""
    decoder = BigramDecoder(
        7,
        {
            Vocabulary.start_id: {X: 0.7, Y: 0.3},
            X: {END: 0.5, X: 0.3, Y: 0.2},
            Y: {Z: 0.95, END: 0.05},
            Z: {END: 0.95, Z: 0.05},
        },
    )
    features = torch.zeros(2, 4, 8)
    plain = _search(decoder, features, beam_size=2, max_length=10)[0]
    assert [h.tokens for h in plain] == [[X], [Y, Z]]
    assert [h.score for h in plain] == pytest.approx([math.log(0.35), math.log(0.3 * 0.95 * 0.95)], abs=1e-6)
    normalised = _search(decoder, features, beam_size=2, max_length=10, length_penalty=1.0)[0]
    assert [h.tokens for h in normalised] == [[Y, Z], [X]]
    # score = log_prob / (words + <end>) ** length_penalty; log_prob itself is unchanged
    assert normalised[0].score == pytest.approx(math.log(0.3 * 0.95 * 0.95) / 3, abs=1e-6)
    assert normalised[1].score == pytest.approx(math.log(0.35) / 2, abs=1e-6)
    assert normalised[1].log_prob == pytest.approx(plain[0].log_prob)
    assert all(h.finished for h in plain + normalised)


# ----------------------------------------------------------------------------- stopping


def test_a_decoder_that_never_ends_stops_at_max_length(trained_shapes_model, shapes_features):
    model, vocab, _ = trained_shapes_model
    endless = copy.deepcopy(model)
    with torch.no_grad():
        endless.decoder.classifier.bias[END] = float("-inf")
    features = shapes_features[:3]
    for h in _greedy(endless.decoder, features, max_length=9):
        assert not h.finished and len(h.tokens) == 9 and END not in h.tokens
    for hyps in _search(endless.decoder, features, beam_size=3, max_length=9):
        assert len(hyps) == 3
        assert all(not h.finished and len(h.tokens) == 9 for h in hyps)
        assert all(math.isfinite(h.score) for h in hyps)
    results = Captioner(endless, vocab, device="cpu").caption(
        [img for img, _, _ in all_examples()[:2]], beam_size=3, max_length=9
    )
    assert all(not r.finished and len(r.words) == 9 and r.attention.shape == (9, 4, 4) for r in results)
    # the unmodified model does finish
    assert all(h.finished for h in _greedy(model.decoder, features, max_length=9))


# ----------------------------------------------------------------------------- sampling


def test_sampling_returns_valid_tokens_within_top_k():
    decoder = _random_decoder(vocab_size=30)
    features = _random_features(8)
    torch.manual_seed(1)
    for temperature, top_k in [(1.0, 0), (1.5, 0), (0.7, 3)]:
        for b, h in enumerate(_sampled(decoder, features, 10, temperature=temperature, top_k=top_k)):
            assert all(Vocabulary.unk_id < t < 30 for t in h.tokens)
            assert h.finished or len(h.tokens) == 10
            if top_k:  # every word, and <end>, was among the k most likely at its step
                ids = [Vocabulary.start_id, *h.tokens, *([END] if h.finished else [])]
                with torch.no_grad():
                    logits, _ = decoder(features[b : b + 1], torch.tensor([ids]), torch.tensor([len(ids)]))
                logp = _allowed_log_probs(logits[0])  # <pad>, <start> and <unk> are never candidates
                ranks = (logp > logp.gather(1, torch.tensor(ids[1:])[:, None])).sum(1)
                assert (ranks < top_k).all()
    tokens, log_probs, mask, alphas = decode_tensors(decoder, features, 10, greedy=False, samples_per_image=3)
    assert tokens.shape[0] == 24 and log_probs.shape == mask.shape == tokens.shape
    assert (tokens[~mask] == Vocabulary.pad_id).all() and (log_probs[~mask] == 0).all()


def test_sampling_with_top_k_1_is_greedy():
    decoder = _random_decoder()
    features = _random_features(6)
    greedy = _greedy(decoder, features, max_length=12)
    for temperature in (1.0, 0.5, 2.0):
        sampled = _sampled(decoder, features, 12, temperature=temperature, top_k=1)
        assert [h.tokens for h in sampled] == [h.tokens for h in greedy]
    sampled = _sampled(decoder, features, 12, top_k=1)
    assert [h.log_prob for h in sampled] == pytest.approx([h.log_prob for h in greedy], abs=1e-5)


# ----------------------------------------------------------------------------- the real learning test


@pytest.mark.parametrize("beam_size", [1, 3])
def test_trained_model_captions_and_looks_at_the_shape(beam_size, trained_shapes_model):
    """The model learned the shapes world: exact captions for all 16 images, and when it says
    the colour it looks at the half of the image where the shape is."""
    model, vocab, losses = trained_shapes_model
    assert losses[-1] < 0.2 * losses[0]
    examples = all_examples()
    results = Captioner(model, vocab, device="cpu").caption(
        [img for img, _, _ in examples], beam_size=beam_size
    )
    assert [r.text for r in results] == [caption for _, caption, _ in examples]
    for result, (_, caption, side) in zip(results, examples, strict=True):
        colour = result.attention[1]  # "a <colour> ..."
        half = colour.shape[1] // 2
        left, right = colour[:, :half].sum(), colour[:, half:].sum()
        shape_half, other_half = (left, right) if side == "left" else (right, left)
        assert shape_half > other_half, (caption, left, right)
        column = int(colour.argmax()) % colour.shape[1]
        assert (column < half) == (side == "left"), (caption, colour.round(2))
        assert result.finished


def test_unk_is_never_written_even_when_the_model_prefers_it():
    """A caption that says "<unk>" tells the reader nothing: every decoder picks the best real word."""
    decoder = _random_decoder()
    with torch.no_grad():
        decoder.classifier.bias[Vocabulary.unk_id] = 50.0  # <unk> far above everything else
    features = _random_features(4)
    unbanned = decoder.classifier(torch.zeros(1, 16)).argmax(dim=-1)
    assert int(unbanned) == Vocabulary.unk_id  # without the ban, greedy would say <unk>
    torch.manual_seed(0)
    hypotheses = [
        *_sampled(decoder, features, 6, greedy=True),
        *_sampled(decoder, features, 6),
        *(h for hyps in _search(decoder, features, beam_size=3, max_length=6) for h in hyps),
    ]
    assert len(hypotheses) == 4 + 4 + 12
    assert sum(len(h.tokens) for h in hypotheses) > 20  # real words were written instead
    assert all(Vocabulary.unk_id not in h.tokens for h in hypotheses)


# ----------------------------------------------------------------------------- repetition


def test_no_repeat_ngram_size_blocks_a_repeated_phrase():
    """A bigram model that loops `x y x y ...`: with n = 2 no caption says `x y` twice, with
    n = 3 none says `x y x` twice; the blocked word gives way to the next-best one."""
    table = {
        Vocabulary.start_id: {X: 0.9, Z: 0.1},
        X: {Y: 0.8, END: 0.2},
        Y: {X: 0.6, Z: 0.3, END: 0.1},
        Z: {END: 0.9, Z: 0.1},
    }
    decoder = BigramDecoder(7, table)
    features = torch.zeros(2, 4, 8)
    (loop,) = _greedy(decoder, features[:1], max_length=8)
    assert loop.tokens == [X, Y, X, Y, X, Y, X, Y] and not loop.finished  # it never stops
    (two,) = _greedy(decoder, features[:1], max_length=8, no_repeat_ngram_size=2)
    assert two.tokens == [X, Y, X] and two.finished  # x -> y would repeat "x y": <end> instead
    assert two.log_prob == pytest.approx(math.log(0.9 * 0.8 * 0.6 * 0.2), abs=1e-5)
    (three,) = _greedy(decoder, features[:1], max_length=8, no_repeat_ngram_size=3)
    assert three.tokens == [X, Y, X, Y, Z] and three.finished  # y -> x would repeat "x y x"
    assert three.log_prob == pytest.approx(math.log(0.9 * 0.8 * 0.6 * 0.8 * 0.3 * 0.9), abs=1e-5)

    for n in (2, 3):
        for hyps in _search(decoder, features, beam_size=3, max_length=8, no_repeat_ngram_size=n):
            assert len(hyps) == 3
            for h in hyps:
                grams = list(zip(*(h.tokens[i:] for i in range(n)), strict=False))
                assert len(grams) == len(set(grams)), (n, h.tokens)
                words = [Vocabulary.start_id, *h.tokens] + ([END] if h.finished else [])
                exact = sum(
                    math.log(table[a].get(b, math.exp(-30)))  # the decoder's floor
                    for a, b in zip(words, words[1:], strict=False)
                )
                assert h.log_prob == pytest.approx(exact, abs=1e-4)


def test_captioner_blocks_repeated_trigrams_by_default(trained_shapes_model):
    """A model that can't say <end> rambles on and repeats itself unless told not to."""
    model, vocab, _ = trained_shapes_model
    endless = copy.deepcopy(model)
    with torch.no_grad():
        endless.decoder.classifier.bias[END] = float("-inf")
    captioner = Captioner(endless, vocab, device="cpu")
    images = [img for img, _, _ in all_examples()[:4]]

    def repeats(words):
        trigrams = list(zip(words, words[1:], words[2:], strict=False))
        return len(trigrams) - len(set(trigrams))

    for beam_size in (1, 3):
        allowed = captioner.caption(images, beam_size=beam_size, max_length=16, no_repeat_ngram_size=0)
        default = captioner.caption(images, beam_size=beam_size, max_length=16)
        assert sum(repeats(r.words) for r in allowed) > 0
        assert all(repeats(r.words) == 0 and len(r.words) == 16 for r in default)


# ----------------------------------------------------------------------------- attention and gates


def _teacher_forced(decoder, features, hypotheses, focus=None):
    """Each caption's words fed through the decoder: the attention (B, T, L) and gate (B, T) of
    the step that wrote each word (padded rows: meaningless after their words)."""
    tokens = torch.full((len(hypotheses), max(len(h.tokens) for h in hypotheses)), Vocabulary.pad_id)
    for row, h in enumerate(hypotheses):
        tokens[row, : len(h.tokens)] = torch.tensor(h.tokens)
    annotations, keys = decoder.prepare(features)
    state = decoder.init_state(annotations, focus)
    words = torch.full((len(hypotheses),), Vocabulary.start_id)
    alphas, gates, expected_gates = [], [], []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            if hasattr(decoder, "f_beta"):  # the gate of word t: mean of sigmoid(f_beta(h_{t-1}))
                expected_gates.append(torch.sigmoid(decoder.f_beta(state[0])).mean(dim=1))
            _, state, alpha, gate = decoder.step(annotations, keys, words, state, focus)
            alphas.append(alpha)
            gates.append(gate)
            words = tokens[:, t]
    if expected_gates:
        torch.testing.assert_close(torch.stack(gates, 1), torch.stack(expected_gates, 1))
    return torch.stack(alphas, 1), torch.stack(gates, 1)


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("focused", [False, True])
def test_beam_search_reports_the_attention_and_gate_of_each_word(beam_size, focused):
    """Teacher forcing the words decoding chose goes through the same states: the attention and
    the gate beam search reports for each word are the decoder's for that word."""
    decoder, features = _random_decoder(), _random_features(6)
    focus = None
    if focused:
        focus = torch.zeros(6, features.shape[1])
        focus[:, :3] = 4.0  # a strong pull towards the first three cells
    best = [hyps[0] for hyps in _search(decoder, features, beam_size, max_length=12, focus=focus)]
    alphas, gates = _teacher_forced(decoder, features, best, focus)
    for row, h in enumerate(best):
        torch.testing.assert_close(alphas[row, : len(h.tokens)], h.alphas, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gates[row, : len(h.tokens)], h.gates)
        assert ((h.gates > 0) & (h.gates < 1)).all()
    if focused:  # the focus changed where the model looked
        unfocused, _ = _teacher_forced(decoder, features, best)
        assert not torch.allclose(unfocused, alphas)


def test_a_decoder_without_the_gate_reports_a_gate_of_one():
    torch.manual_seed(0)
    decoder = AttentionDecoder(
        12, 32, annotation_dim=16, embed_dim=16, hidden_dim=24, attention_dim=16, dropout=0.0, gate=False
    ).eval()
    for h in _greedy(decoder, _random_features(2), max_length=5):
        assert h.tokens and torch.equal(h.gates, torch.ones(len(h.tokens)))


# ----------------------------------------------------------------------------- decoding without gradients


def _greedy_tensors(decoder, features, grad: bool):
    with torch.set_grad_enabled(grad):
        tokens, log_probs, _, alphas = decode_tensors(decoder, features, max_length=12)
    return tokens, log_probs.detach(), alphas.detach()


@pytest.mark.parametrize("attention", ["additive", "multiplicative"])
def test_decoding_without_gradients_equals_the_lstm_cells_path(attention):
    """Without gradients a step looks up each word's share of the LSTM gates instead of
    multiplying its embedding (AttentionDecoder._word_tables): same words, same numbers."""
    torch.manual_seed(0)
    decoder = AttentionDecoder(
        40,
        32,
        annotation_dim=16,
        embed_dim=16,
        hidden_dim=24,
        attention_dim=16,
        attention=attention,
        dropout=0.0,
    ).eval()
    features = _random_features(6)
    tokens, log_probs, alphas = _greedy_tensors(decoder, features, grad=True)
    fast_tokens, fast_log_probs, fast_alphas = _greedy_tensors(decoder, features, grad=False)
    assert torch.equal(tokens, fast_tokens)
    torch.testing.assert_close(fast_log_probs, log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_alphas, alphas, atol=1e-5, rtol=1e-5)


def test_decoding_without_gradients_follows_weight_updates():
    """Training changes the weights between validations: the looked-up gates must follow."""
    decoder = _random_decoder(vocab_size=40)
    features = _random_features(4)
    _, before, _ = _greedy_tensors(decoder, features, grad=False)  # builds the tables for these weights
    optimizer = torch.optim.SGD(decoder.parameters(), lr=1.0)
    decoder.train()
    captions = torch.randint(4, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    logits, _ = decoder(features, captions, torch.full((4,), 6))
    nn.functional.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten()).backward()
    optimizer.step()  # in place, as every optimizer updates
    decoder.eval()
    tokens, log_probs, _ = _greedy_tensors(decoder, features, grad=True)
    fast_tokens, fast_log_probs, _ = _greedy_tensors(decoder, features, grad=False)
    assert not torch.allclose(log_probs, before, atol=1e-3)  # the step changed what it says
    assert torch.equal(tokens, fast_tokens)
    torch.testing.assert_close(fast_log_probs, log_probs, atol=1e-5, rtol=1e-5)
