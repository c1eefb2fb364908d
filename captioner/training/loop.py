"""Training: cross-entropy with teacher forcing, then optionally self-critical (SCST) fine-tuning.

One `TrainConfig` describes a run and is saved in its run folder. `train()` reads top to
bottom: set up, then for each stage and epoch: train one epoch, validate, save, stop early. The
run state (captioner.training.run_state) is written atomically every N steps and every epoch, so
`resume=True` continues exactly where a killed run left off; the best epoch's weights are kept
as a model folder (captioner.model.folder) in the run folder's best/. Under torchrun it trains with
DistributedDataParallel (nccl on GPUs, gloo on CPU).
"""

from __future__ import annotations

import json
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from captioner.evaluation.metrics import score_captions
from captioner.files import atomic_write
from captioner.model.caption_model import CaptionModel
from captioner.model.folder import WEIGHTS_FILE, architecture, load_model, save_model
from captioner.model.options import DecodeOptions
from captioner.model.results import caption_features
from captioner.training.config import TrainConfig
from captioner.training.distributed import Dist, setup_distributed
from captioner.training.inputs import (
    BATCH_BY,
    Inputs,
    PreparedData,
    epoch_batches,
    mirrored_rows,
    prepare_data,
    step_batch,
)
from captioner.training.metrics_log import MetricsLog
from captioner.training.optimizer import make_average, make_optimizer
from captioner.training.run_folder import check_run_folder, claim_run_folder
from captioner.training.run_state import (
    BEST_FOLDER,
    STATE_FILE,
    TRAIN_CONFIG_FILE,
    Progress,
    check_state_fits,
    load_run_state,
    read_progress,
    read_run_vocabulary,
    save_run_state,
)
from captioner.training.stages import STAGES, Stage


@dataclass
class Run:
    """What every part of a run shares."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: CaptionModel
    net: torch.nn.Module  # what the training pass calls: the model, or its DDP wrapper
    data: PreparedData
    inputs: Inputs
    folder: Path
    progress: Progress
    scaler: torch.amp.GradScaler

    def save_state(
        self,
        optimizer: torch.optim.Optimizer,
        average: AveragedModel | None,
        sums: dict[str, float] | None = None,
        seconds: float = 0.0,
    ) -> None:
        """Called by every rank at the same steps. Mid-epoch, `sums` (this rank's running loss
        sums) are saved summed over ranks, so a resumed epoch logs the metrics of a whole one."""
        if sums is not None:
            self.progress.epoch_sums = self.dist.sum_dict(sums, self.device)
            self.progress.epoch_seconds = seconds
        if self.dist.is_main:
            save_run_state(
                self.folder / STATE_FILE, self.model, optimizer, self.data.vocab, self.progress, average
            )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run. Returns a summary with the best validation scores."""
    check_config(cfg)
    with ExitStack() as held:  # the run folder's lock, until the run ends
        return run_stages(set_up(cfg, held))


def run_stages(run: Run) -> dict[str, Any]:
    """Each stage's epochs, from where the run is: train, validate, save, stop early."""
    cfg, progress, model, d = run.cfg, run.progress, run.model, run.dist
    resumed_stage = progress.stage if cfg.resume and (run.folder / STATE_FILE).exists() else None
    stage_names = [name for name in STAGES if name == "xe" or cfg.scst_epochs > 0]
    for name in stage_names[stage_names.index(progress.stage) :] if not progress.done else []:
        if name != progress.stage:  # a new stage starts from the best weights of the last one
            load_best(model, run.folder, d)
            progress.start_stage(name)
        stage: Stage = STAGES[name](cfg, run.net, run.data, d, run.device, steps_per_epoch(run))
        optimizer, average = make_optimizer(cfg, model, stage.lr), make_average(cfg, model)
        if name == resumed_stage:
            load_run_state(run.folder / STATE_FILE, model, optimizer, average)
            if d.is_main:
                print(
                    f"resumed {run.folder / STATE_FILE}: stage {name} epoch {progress.epoch} "
                    f"step {progress.step_in_epoch}"
                )
        elif name != stage_names[0]:
            run.save_state(optimizer, average)
        while progress.epoch < stage.epochs and progress.bad_epochs < stage.patience:
            totals, seconds = train_one_epoch(run, stage, optimizer, average)
            if totals is None:  # stop_after_step reached
                return summarise(run, stopped=True)
            # What is validated and saved (AveragedModel's .module, typed nn.Module, copies the model).
            evaluated = model if average is None else cast(CaptionModel, average.module)
            metrics = validate(evaluated, run) if run.data.val_rows else {}
            finish_epoch(run, stage, evaluated, totals, seconds, metrics, optimizer)
            run.save_state(optimizer, average)
    if not progress.done:
        progress.done = True
        run.save_state(optimizer, average)
    return summarise(run)


def check_config(cfg: TrainConfig) -> None:
    """Refuse a bad config before anything is read or written."""
    if cfg.batch_by not in BATCH_BY:
        raise ValueError(f"batch_by {cfg.batch_by!r}: expected one of {', '.join(BATCH_BY)}")
    if cfg.model.semantic_attributes:  # it needs each photo's evidence, which only that script caches
        raise ValueError("model.semantic_attributes: train such a model with scripts/train_attributes.py")
    check_hard_attention_settings(cfg)


def check_hard_attention_settings(cfg: TrainConfig) -> None:
    for name, low, high in [
        ("hard_baseline_decay", 0.0, 1.0),
        ("hard_expectation_probability", 0.0, 1.0),
        ("hard_entropy_weight", 0.0, float("inf")),
    ]:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and low <= value <= high):
            raise ValueError(f"{name} {value!r}: expected a number from {low} to {high}")


def set_up(cfg: TrainConfig, held: ExitStack) -> Run:
    """Processes, data, model, output folder (claimed for as long as `held` is) and inputs; the
    saved progress when resuming. Nothing is written before the data and model are ready."""
    d, device = setup_distributed(cfg.device)
    if d.is_main:  # rank 0 only: the others may start after it has written train_config.json
        check_run_folder(cfg)
    folder = Path(cfg.output_dir)
    state_path = folder / STATE_FILE
    resuming = cfg.resume and state_path.exists()
    if cfg.resume and not resuming and d.is_main:
        print(f"--resume: no {state_path} yet, starting a new run")
    seed_everything(cfg.seed)
    initial = load_model(cfg.init_from) if cfg.init_from and not resuming else None
    vocab = read_run_vocabulary(state_path) if resuming else initial[1] if initial else None
    data = prepare_data(cfg.data, cfg.min_word_count, cfg.max_caption_words, vocab)
    model = CaptionModel(cfg.model, len(data.vocab)).to(device)
    if cfg.init_from and initial is not None:
        start_from(model, initial[0], cfg.init_from)
    if resuming:
        check_state_fits(state_path, model)
    model.encoder.set_trainable(cfg.fine_tune_from)
    held.enter_context(claim_run_folder(cfg, d.is_main))
    if d.is_main:
        # left by a killed atomic_write
        for stale in [*folder.glob(".*.tmp"), *folder.glob(f"{BEST_FOLDER}/.*.tmp")]:
            stale.unlink(missing_ok=True)
        text = json.dumps(asdict(replace(cfg, overwrite=False)), indent=2)  # overwrite: done, not a setting
        atomic_write(folder / TRAIN_CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    inputs = Inputs(
        model, data, device, cfg.cache_dir, cfg.hflip, cfg.num_workers, d, cfg.progress, cfg.fine_tune_inputs
    )
    net: torch.nn.Module = model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda")
    progress = read_progress(state_path) if resuming else Progress()
    return Run(cfg, d, device, model, net, data, inputs, folder, progress, scaler)


def start_from(model: CaptionModel, trained: CaptionModel, source: str) -> None:
    """Copy a trained model's weights into the new run's model (same architecture)."""
    theirs, ours = asdict(architecture(trained.config)), asdict(architecture(model.config))
    if theirs != ours:
        differ = {k: (v, ours[k]) for k, v in theirs.items() if ours[k] != v}
        raise ValueError(
            f"init_from {source}: its architecture differs from --model's "
            f"(setting: (its value, --model's)): {differ}"
        )
    if not isinstance(trained.decoder, type(model.decoder)):
        raise ValueError(f"init_from {source} is an ensemble; start from one of its members")
    model.load_state_dict(trained.state_dict())


def steps_per_epoch(run: Run) -> int:
    """Cross-entropy steps per epoch (the cosine schedule's length is this x epochs)."""
    cfg = run.cfg
    items = len(run.data.encoded) if cfg.batch_by == "image" else sum(map(len, run.data.encoded))
    return len(epoch_batches(items, cfg.batch_size, cfg.seed, 0, run.dist))


def train_one_epoch(
    run: Run, stage: Stage, optimizer: torch.optim.Optimizer, average: AveragedModel | None
) -> tuple[dict[str, float] | None, float]:
    """The rest of this epoch (all of it, unless resumed mid-epoch). Returns the loss sums over
    all ranks and the epoch's seconds; None for the sums if stop_after_step ended it."""
    cfg, d, progress, model = run.cfg, run.dist, run.progress, run.model
    order_seed = stage.order_seed(progress.epoch)
    batches = epoch_batches(len(stage.items), cfg.batch_size, cfg.seed, order_seed, d)
    model.train(stage.dropout)
    # Running sums: resumed mid-epoch, rank 0 restarts from the saved totals of all ranks and
    # the other ranks from zero.
    saved = progress.epoch_sums or {}
    sums = {"loss": 0.0, "n": 0.0, "captions": 0.0, **{k: v if d.is_main else 0.0 for k, v in saved.items()}}
    start = time.perf_counter() - progress.epoch_seconds
    bar = tqdm(
        total=len(batches),
        initial=progress.step_in_epoch,
        disable=not (cfg.progress and d.is_main),
        desc=f"{stage.name} epoch {progress.epoch + 1}",
    )
    mirror = mirrored_rows(cfg.hflip, cfg.seed, run.data.num_train, order_seed)
    todo = batches[progress.step_in_epoch :]
    row_batches = [[stage.items[i][0] for i in batch] for batch in todo]
    for batch, (rows, x) in zip(todo, run.inputs.batches(row_batches, mirror), strict=True):
        lr = stage.step_lr(progress.global_step)
        if lr is not None:
            optimizer.param_groups[0]["lr"] = lr  # the decoder's group; the encoder's stays
        step = step_batch(rows, x, [stage.items[i][1] for i in batch], run.inputs.from_stage, run.device)
        with torch.autocast(run.device.type, enabled=run.scaler.is_enabled()):
            loss, stats = stage.loss(step)
        check_finite(loss, run, stage)
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        if average is not None:
            average.update_parameters(model)
        for key, value in {"captions": len(step.captions), "loss": loss.item(), "n": 1, **stats}.items():
            sums[key] = sums.get(key, 0.0) + value
        progress.step_in_epoch += 1
        progress.global_step += 1
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            captions_per_s=f"{sums['captions'] / (time.perf_counter() - start):.0f}",
        )
        bar.update(1)
        if progress.global_step % cfg.checkpoint_every == 0 or progress.global_step == cfg.stop_after_step:
            run.save_state(optimizer, average, sums, time.perf_counter() - start)
        if progress.global_step == cfg.stop_after_step:
            bar.close()
            return None, time.perf_counter() - start
    bar.close()
    return d.sum_dict(sums, run.device), time.perf_counter() - start


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the run state on disk is the last good one."""


def check_finite(loss: torch.Tensor, run: Run, stage: Stage) -> None:
    """Stop before a non-finite loss reaches the weights (on every rank at once under DDP)."""
    finite = bool(torch.isfinite(loss))
    if run.dist.world_size > 1:
        finite = run.dist.all_sum([float(not finite)], run.device)[0] == 0
    if not finite:
        progress, state = run.progress, run.folder / STATE_FILE
        saved = (
            f"{state} holds the last good run state"
            if state.exists()
            else "no run state was saved yet, so there is nothing to resume"
        )
        again = "rerun with --resume true" if state.exists() else "start the run again with --overwrite true"
        raise TrainingDiverged(
            f"the {stage.name} loss became {loss.item()} at step {progress.global_step + 1} (epoch "
            f"{progress.epoch + 1}, batch {progress.step_in_epoch + 1}); the weights were not updated and "
            f"{saved}. Lower the learning rate or check the inputs (a NaN in the feature cache? delete "
            f"its files under {run.cfg.cache_dir} to compute them again), then {again}."
        )


@torch.no_grad()
def validate(model: CaptionModel, run: Run) -> dict[str, float]:
    """Beam-search captions (never teacher-forced outputs) of the validation images, sharded
    across ranks, scored on rank 0 with the standard metrics (METEOR left out: it is slow)."""
    cfg, d, data = run.cfg, run.dist, run.data
    rows = list(data.val_rows)[d.rank :: d.world_size]
    was_training = model.training
    model.eval()
    captions: dict[int, str] = {}
    batches = [rows[i : i + 64] for i in range(0, len(rows), 64)]
    for batch_rows, x in run.inputs.batches(batches):
        features = x if run.inputs.from_stage is None else model.encoder(x, run.inputs.from_stage)
        results = caption_features(
            model.decoder,
            data.vocab,
            features,
            # plain beam search, as every earlier run's logged validation scores were measured
            DecodeOptions(
                cfg.val_beam_size, cfg.val_max_length, length_penalty=0.0, n_best=1, no_repeat_ngram_size=0
            ),
        )
        captions.update(zip(batch_rows, (r.text for r in results), strict=True))
    model.train(was_training)
    if d.world_size > 1:
        gathered: list[dict[int, str]] = [{} for _ in range(d.world_size)]
        torch.distributed.all_gather_object(gathered, captions)
        captions = {k: v for part in gathered for k, v in part.items()}
    metrics: dict[str, float] = {}
    if d.is_main:
        predictions = {data.images[r].image_id: c for r, c in captions.items()}
        references = {data.images[r].image_id: data.images[r].captions for r in captions}
        metrics = score_captions(predictions, references, meteor=False)
    if d.world_size > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def finish_epoch(
    run: Run,
    stage: Stage,
    evaluated: CaptionModel,
    totals: dict[str, float],
    seconds: float,
    metrics: dict[str, float],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Log the epoch, keep the best weights as the model folder best/, and count epochs without
    progress."""
    progress, epoch = run.progress, run.progress.epoch + 1
    row = {
        "stage": stage.name,
        "epoch": epoch,
        "train_loss": totals["loss"] / max(totals["n"], 1),
        "reward": totals["reward"] / totals["n"] if "reward" in totals else None,
        "captions_per_second": totals["captions"] / seconds,
        "epoch_seconds": seconds,
        "lr": optimizer.param_groups[0]["lr"],
        **metrics,
    }
    label = f"{stage.name}-{epoch}"
    if progress.record(metrics.get("CIDEr", -row["train_loss"]), label) and run.dist.is_main:
        save_model(
            run.folder / BEST_FOLDER,
            evaluated,
            run.data.vocab,
            metadata={"val_scores": metrics, "epoch": label, "train_config": asdict(run.cfg)},
        )
    if run.dist.is_main:
        MetricsLog(run.folder).append(row)
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}))


def summarise(run: Run, stopped: bool = False) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "best_score": run.progress.best_score,
        "best_epoch": run.progress.best_epoch,
        "output_dir": str(run.folder),
        "vocab_size": len(run.data.vocab),
    }
    if stopped:
        summary["stopped_at_step"] = run.progress.global_step
    if run.inputs.cache is not None:
        summary["feature_extraction"] = run.inputs.extract_stats
    return summary


def load_best(model: CaptionModel, folder: Path, d: Dist) -> None:
    """Start the next stage from the best weights so far."""
    d.barrier()
    best = load_file(str(folder / BEST_FOLDER / WEIGHTS_FILE))
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in best.items()})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
