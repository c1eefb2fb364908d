"""Fine-tuning the encoder's last stages: from cached activations (the default) or from photos.

Real pretrained encoder, real stage caches on disk, real training runs on the shapes world.
"""

import dataclasses

import pytest
import torch

from captioner import CaptionModel
from captioner.model.folder import save_model
from captioner.training.distributed import Dist
from captioner.training.inputs import Inputs, prepare_data, step_batch
from captioner.training.loop import train
from captioner.training.stages import CrossEntropy

from .shapes import all_examples, write_coco_dataset
from .test_training import make_config

CPU = torch.device("cpu")
HEAD = 8  # efficientnet_lite0's stages: 0 the stem, 1-7 the block groups, 8 the head


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_coco_dataset(tmp_path_factory.mktemp("coco-shapes"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stage-cache")


def encoder_gradients(model, data, inputs, rows, cfg) -> dict[str, torch.Tensor]:
    ((rows, x),) = inputs.batches([rows])
    batch = step_batch(rows, x, [data.encoded[r] for r in rows], inputs.from_stage, CPU)
    model.zero_grad()
    loss, _ = CrossEntropy(cfg, model, data, Dist(), CPU, steps_per_epoch=1).loss(batch)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.encoder.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [7, HEAD])
def test_stage_cached_step_gives_the_gradients_of_a_photo_step(dataset, cache_dir, tmp_path, stage):
    """The same batch, dropout off: the tuned stages' gradients from the cached activations
    equal those from the photos (to the fp16 rounding of the cache)."""
    cfg = make_config(dataset, tmp_path / "run", cache_dir, fine_tune_from=stage)
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    torch.manual_seed(0)
    model = CaptionModel(cfg.model, len(data.vocab))
    model.encoder.set_trainable(stage)
    model.train(False)
    gradients = {}
    for source in ("cache", "photos"):
        inputs = Inputs(model, data, CPU, str(cache_dir), False, 0, Dist(), False, fine_tune_inputs=source)
        assert inputs.from_stage == (stage if source == "cache" else 0)
        gradients[source] = encoder_gradients(model, data, inputs, [0, 5, 9, 14], cfg)
    tuned = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert gradients["cache"].keys() == gradients["photos"].keys() == tuned
    assert any(name.startswith("body.conv_head") for name in tuned)
    for name, expected in gradients["photos"].items():
        actual = gradients["cache"][name]
        assert expected.norm() > 0, name
        # fp16 rounding of the cached activations moves a tensor's gradient by ~0.5%, up to ~1.5%
        assert (actual - expected).norm() <= 3e-2 * expected.norm(), name
    every = [torch.cat([g.flatten() for g in gradients[s].values()]) for s in ("cache", "photos")]
    assert (every[0] - every[1]).norm() <= 1e-2 * every[1].norm()


def test_stage_cache_is_made_once_and_mirrored_photos_get_their_own(dataset, cache_dir, tmp_path):
    cfg = make_config(dataset, tmp_path / "run", cache_dir, fine_tune_from=HEAD, hflip=True)
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    model = CaptionModel(cfg.model, len(data.vocab))
    model.encoder.set_trainable(HEAD)
    first = Inputs(model, data, CPU, str(cache_dir), True, 0, Dist(), False)
    again = Inputs(model, data, CPU, str(cache_dir), True, 0, Dist(), False)
    assert again.extract_stats["images"] == 0 and again.extract_stats["mirrored"]["images"] == 0
    assert first.cache.folder.name.startswith(f"efficientnet_lite0-128px-stage{HEAD}-")
    assert first.mirrored.folder.name == first.cache.folder.name + "-hflip"
    plain = first.cache.batch([0])
    assert not torch.allclose(first.mirrored.batch([0]), plain)
    ((_, x),) = first.batches([[0, 1]], mirror=torch.tensor([True, False]).numpy())
    torch.testing.assert_close(x[0], first.mirrored.batch([0])[0])
    torch.testing.assert_close(x[1], first.cache.batch([1])[0])


def test_fine_tuning_the_whole_encoder_needs_photos(dataset, cache_dir, tmp_path):
    cfg = make_config(dataset, tmp_path / "run", cache_dir, fine_tune_from=0, epochs=1, scst_epochs=0)
    with pytest.raises(ValueError, match="fine_tune_from 0 tunes the whole encoder.*photos"):
        train(cfg)


def test_init_from_refuses_another_architecture(dataset, cache_dir, tmp_path):
    cfg = make_config(dataset, tmp_path / "run", cache_dir, epochs=1, scst_epochs=0)
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    other = dataclasses.replace(cfg.model, hidden_dim=32)
    folder = save_model(tmp_path / "other", CaptionModel(other, len(data.vocab)), data.vocab)
    with pytest.raises(ValueError, match=r"init_from .*other.*hidden_dim.*\(32, 64\)"):
        train(dataclasses.replace(cfg, init_from=str(folder)))


@pytest.mark.slow
def test_tuning_the_head_solves_what_the_frozen_encoder_cannot(dataset, cache_dir, tmp_path):
    """An encoder whose head is blinded (zero weights, its batch norm set to output 0.5: every image
    gets the same grid) cannot tell the shapes apart when frozen: it writes one caption for all.
    Started from that model (init_from), tuning the head from its cached input learns to tell
    them apart in 160 steps; the exported model carries the tuned encoder."""
    from captioner import Captioner

    cfg = make_config(
        dataset,
        tmp_path / "unused",
        cache_dir,
        epochs=40,
        scst_epochs=0,
        patience=40,
        lr=5e-3,
        encoder_lr=3e-4,
        ema_decay=0.0,
        dropout=0.0,
    )
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words)
    torch.manual_seed(0)  # the starting decoder does not depend on what earlier tests drew
    blind = CaptionModel(cfg.model, len(data.vocab))
    head_bn = blind.encoder.body.bn2
    with torch.no_grad():
        blind.encoder.body.conv_head.weight.zero_()
        head_bn.weight.fill_(1.0), head_bn.bias.fill_(0.5)  # ReLU6(0.5): gradients pass
        head_bn.running_mean.zero_(), head_bn.running_var.fill_(1.0)
    start = save_model(tmp_path / "blind", blind, data.vocab)

    exact, distinct = {}, {}
    for name, tune in (("frozen", None), ("tuned", HEAD)):
        run = dataclasses.replace(
            cfg, output_dir=str(tmp_path / name), init_from=str(start), fine_tune_from=tune
        )
        train(run)
        captioner = Captioner.from_pretrained(tmp_path / name / "best", device="cpu")
        captions = [r.text for r in captioner.caption([img for img, _, _ in all_examples()])]
        exact[name] = sum(c == text for c, (_, text, _) in zip(captions, all_examples(), strict=True))
        distinct[name] = len(set(captions))
    assert distinct["frozen"] == 1 and exact["frozen"] <= 1, (exact, distinct)  # one caption for all 16
    assert distinct["tuned"] >= 4 and exact["tuned"] >= 4, (exact, distinct)  # 6 and 6 when written
    assert captioner.model.encoder.body.conv_head.weight.abs().sum() > 0


@pytest.mark.slow
def test_self_critical_training_after_cross_entropy_keeps_tuning_the_encoder(dataset, cache_dir, tmp_path):
    """The same seeded run with and without an SCST epoch: identical up to the end of cross-entropy,
    so any difference in the tuned head's final weights is SCST's, and the frozen trunk never moves."""
    from .test_training import assert_same_metrics, metrics_rows, state_tensors

    ends = {}
    for name, scst_epochs in (("xe", 0), ("xe+scst", 1)):
        run = make_config(
            dataset,
            tmp_path / name,
            cache_dir,
            epochs=1,
            scst_epochs=scst_epochs,
            fine_tune_from=HEAD,
            encoder_lr=1e-3,
            ema_decay=0.0,
        )
        train(run)
        ends[name] = state_tensors(tmp_path / name)
    head, stem = "model.encoder.body.conv_head.weight", "model.encoder.body.conv_stem.weight"
    assert not torch.equal(ends["xe"][head], ends["xe+scst"][head])
    assert torch.equal(ends["xe"][stem], ends["xe+scst"][stem])
    xe_rows, both_rows = metrics_rows(tmp_path / "xe"), metrics_rows(tmp_path / "xe+scst")
    assert [r["stage"] for r in both_rows] == ["xe", "scst"]
    assert_same_metrics(both_rows[:1], xe_rows)  # the runs part only where SCST begins
