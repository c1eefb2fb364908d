"""Self-critical training: the loss's sign and baseline, and that it really raises CIDEr-D.

The train() SCST stage (runs, resumes exactly, logs `reward`) is covered in test_training.py.
"""

import numpy as np
import pytest
import torch

from captioner import CaptionModel, ModelConfig, Vocabulary
from captioner.model.decoding import decode_tensors
from captioner.model.vocabulary import tokenize
from captioner.training.scst import end_marked, reward_scorer, sampled_words, scst_loss

from .conftest import TINY
from .shapes import all_examples, train_decoder


@pytest.fixture(scope="module")
def shapes_references() -> list[list[list[str]]]:
    return [[tokenize(caption)] for _, caption, _ in all_examples()]


def _tokens(vocab: Vocabulary, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-caption tensors as decode_tensors returns them: words + <end>, <pad> after."""
    ids = [vocab.encode(c)[1:] for c in captions]  # drop <start>, keep <end>
    width = max(len(i) for i in ids) + 2
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return tokens, mask


def test_scst_loss_favours_the_sample_closest_to_the_references(shapes_vocab, shapes_references):
    cider = reward_scorer(shapes_references)
    references = [[tokenize("a red circle on the left")]]  # one image
    samples = ["a red circle on the left", "a red square on the left", "a blue square on the right"]
    tokens, mask = _tokens(shapes_vocab, samples)
    log_probs = torch.full(tokens.shape, -1.0, requires_grad=True)

    loss, stats = scst_loss(tokens, log_probs, mask, references, cider, shapes_vocab, samples=3)
    loss.backward()

    rewards = cider.scores([[*tokenize(s), "<end>"] for s in samples], [end_marked(references[0])] * 3)
    assert rewards[0] > rewards[1] > rewards[2]
    assert stats["reward"] == pytest.approx(rewards.mean())
    # d loss / d log p = -advantage / #tokens on real tokens: gradient descent makes the exact
    # caption more likely and the wrong ones less likely; padding gets no gradient.
    advantage = -(log_probs.grad * mask).sum(1) / mask.sum(1) * mask.sum()
    baseline = (rewards.sum() - rewards) / 2  # mean of the other samples
    assert advantage.numpy() == pytest.approx(rewards - baseline, rel=1e-5)
    assert advantage[0] > 0 > advantage[2]
    assert float(advantage.sum()) == pytest.approx(0.0, abs=1e-5)  # zero-mean per image
    assert torch.all(log_probs.grad[~mask] == 0)


def test_unfinished_and_fragment_samples_earn_less_than_the_finished_sentence(
    shapes_vocab, shapes_references
):
    """The <end> word takes part in the reward: a caption cut off at the length limit, or one
    that stops mid-phrase, misses the references' final n-grams."""
    cider = reward_scorer(shapes_references)
    references = [[tokenize("a red circle on the left")]]
    samples = ["a red circle on the left", "a red circle on the left", "a red circle on the"]
    tokens, mask = _tokens(shapes_vocab, samples)
    tokens[1, 6], mask[1, 6] = 0, False  # row 1: the same words, cut before <end>
    log_probs = torch.zeros(tokens.shape, requires_grad=True)
    scst_loss(tokens, log_probs, mask, references, cider, shapes_vocab, samples=3)[0].backward()
    advantage = -(log_probs.grad * mask).sum(1) / mask.sum(1) * mask.sum()
    assert advantage[0] > 0 and advantage[0] > advantage[1] and advantage[0] > advantage[2]
    words = sampled_words(tokens, shapes_vocab)
    assert words[0] == [*tokenize(samples[0]), "<end>"] and words[1] == tokenize(samples[0])
    finished, unfinished, fragment = cider.scores(words, [end_marked(references[0])] * 3)
    assert finished == pytest.approx(10.0)
    assert max(unfinished, fragment) < finished - 0.25


def test_scst_loss_needs_two_samples(shapes_vocab, shapes_references):
    tokens, mask = _tokens(shapes_vocab, ["a red circle on the left"])
    with pytest.raises(ValueError, match="at least 2 samples"):
        scst_loss(
            tokens,
            torch.zeros(tokens.shape),
            mask,
            [[["a"]]],
            reward_scorer(shapes_references),
            shapes_vocab,
            samples=1,
        )


@pytest.mark.slow
def test_scst_steps_raise_the_reward_of_a_partly_trained_model(shapes_vocab, shapes_references):
    examples = all_examples()
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(**vars(TINY)), len(shapes_vocab))
    train_decoder(model, shapes_vocab, examples, steps=15)  # knows the words, not the captions
    with torch.no_grad():
        features = model.encoder(torch.stack([model.encoder.transform(img) for img, _, _ in examples]))
    cider = reward_scorer(shapes_references)
    decoder = model.decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    torch.manual_seed(1)
    rewards = []
    for _ in range(24):
        tokens, log_probs, mask, _ = decode_tensors(decoder, features, 16, greedy=False, samples_per_image=5)
        loss, stats = scst_loss(tokens, log_probs, mask, shapes_references, cider, shapes_vocab, 5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(stats["reward"])
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    assert last > first + 2.0, f"mean CIDEr-D of samples went {first:.2f} -> {last:.2f}"
