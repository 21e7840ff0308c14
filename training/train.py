"""Train a captioner model (Show, Attend and Tell) and write model directories.

    python -m training.train --config training/configs/synthetic.toml [--set SECTION.KEY=VALUE ...]
        [--data FILE] [--images DIR] [--out DIR] [--epochs N] [--resume] [--checkpoint-every N]
    python -m torch.distributed.run --nproc_per_node 4 -m training.train --config ...   (DDP)

The configuration is a TOML file with ``[encoder]`` (``captioner.config.EncoderConfig``), ``[decoder]``
(``DecoderConfig`` without ``vocab_size`` and ``feature_dim``, which come from the data and the
backbone) and ``[train]`` (``TrainConfig``); ``--set`` and the dedicated flags override it.

With a frozen encoder (``fine_tune_stages = 0``) every image is encoded once into a feature cache
(``training.features``) and training reads the cache; otherwise every step runs the encoder on images,
unless ``train.cache_frozen_stages`` caches what the frozen stages compute and every step runs only
the trainable ones on it.
Each epoch visits every (image, caption) pair once: the images in a permutation drawn from a
generator seeded by the seed and the epoch (so the order is known again after a restart), each
image's captions together in one batch. After each epoch the model captions the validation split
with beam search; CIDEr-D on it drives the learning-rate decay, the choice of the best model and
early stopping; with ``lr_decay_epochs = N`` the last N of ``epochs`` instead take the rates
linearly to 0. ``--resume`` continues exactly where ``last.pt`` stands; given a larger ``--epochs``
or ``--set train.patience=0`` it also extends a run that has finished or stopped early (a larger
``--epochs`` also moves the final decay to the new last epochs, and the epochs before it go back
to the rate the old decay started from).

Output (only rank 0 writes, except the debug checksums)::

    OUT/last.pt         resumable state: weights, optimiser, scheduler, progress, RNG states, data order
    OUT/last/  OUT/best/  model directories (captioner.checkpoint), with provenance and val scores
    OUT/metrics.csv     one row per epoch;  OUT/tensorboard/  event files

This module is the loop; the rest of a run lives beside it: ``training.config`` (TrainConfig,
RunConfig, TOML and ``--set``), ``training.distributed`` (processes), ``training.data`` (splits,
vocabulary, epoch order), ``training.state`` (``last.pt`` and the model directories) and
``training.metrics_log`` (``metrics.csv``, TensorBoard).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from captioner.checkpoint import load_model
from captioner.decoder import caption_loss
from captioner.decoding import SearchOptions, search
from captioner.errors import CaptionerError
from captioner.model import CaptionModel
from captioner.vocab import PAD_ID, Vocabulary
from training import scst
from training.config import (
    SCORE,
    ConfigError,
    RunConfig,
    TrainConfig,
    command_line,
    config_from_args,
    load_config,
)
from training.data import Data, build_vocabulary, epoch_order, prepare_data, read_splits, shard_batches
from training.distributed import (
    Distributed,
    check_replicas,
    gather,
    parameter_checksum,
    setup_distributed,
)
from training.metrics import compute_metrics
from training.metrics_log import MetricsLog
from training.state import (
    Progress,
    Trainer,
    clip_gradients,
    git_commit,
    load_state,
    save_model_dir,
    save_state,
    trainable,
)

# The loop's own names, and those callers and tests have always imported from here.
__all__ = [
    "ConfigError",
    "Distributed",
    "Progress",
    "TeacherForced",
    "TrainConfig",
    "amp_dtype",
    "apply_final_decay",
    "build_model",
    "build_optimizer",
    "build_parser",
    "cli",
    "epoch_order",
    "evaluate",
    "git_commit",
    "load_config",
    "main",
    "parameter_checksum",
    "run",
    "run_epoch",
    "shard_batches",
    "train_one_epoch",
    "train_step",
    "trainable",
]

logger = logging.getLogger("training.train")


# ----------------------------------------------------------------------------------------------------
# Devices and seeds


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast type: only on CUDA; bf16 where the GPU supports it (no loss scaling needed)."""
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Model and optimisation


class TeacherForced(nn.Module):
    """The training forward pass, from cached features or from pixels through the encoder. One
    module, so DistributedDataParallel sees every parameter that may train."""

    def __init__(self, model: CaptionModel, from_features: bool) -> None:
        super().__init__()
        self.model = model
        self.from_features = from_features

    def forward(
        self, inputs: torch.Tensor, captions: torch.Tensor, image_of_caption: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.encoder
        features = encoder.encode_trainable(inputs) if self.from_features else encoder(inputs)  # (N, R, C)
        return self.model.decoder(features, captions, image_of_caption)  # (B, T-1, V), (B, T-1, R)


def build_model(config: RunConfig, vocabulary: Vocabulary, device: torch.device) -> CaptionModel:
    """A model for this vocabulary: ImageNet encoder and random decoder, or the weights of ``init_from``."""
    torch.manual_seed(config.train.seed)  # the same initial weights on every rank and every run
    model = CaptionModel(config.model_config(len(vocabulary)))
    if config.train.init_from:
        start, _ = load_model(config.train.init_from)
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as error:
            raise ConfigError(f"{config.train.init_from} does not fit this configuration: {error}") from None
    return model.to(device)


def build_optimizer(model: CaptionModel, tc: TrainConfig) -> torch.optim.Adam:
    """Adam with one learning rate for the decoder and another, smaller one for the encoder's trainable
    stages (ImageNet weights should move less than freshly initialised ones). The fused implementation
    updates every parameter in one kernel per tensor: on a CPU it takes a sixth of the time of the
    default, which matters at a vocabulary of 10,000 (embedding and output layer are 10M weights)."""
    groups = [{"params": list(model.decoder.parameters()), "lr": tc.decoder_lr, "name": "decoder"}]
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder:
        groups.append({"params": encoder, "lr": tc.encoder_lr, "name": "encoder"})
    return torch.optim.Adam(groups, fused=True)


def train_step(
    module: nn.Module,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    inputs: torch.Tensor,
    captions: torch.Tensor,
    tc: TrainConfig,
    dtype: torch.dtype | None,
    image_of_caption: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """One optimisation step on a batch of ``inputs`` (N images) and ``captions`` (B, T), caption
    ``b`` being of image ``image_of_caption[b]`` (of image ``b`` when None); returns (loss,
    cross-entropy, global gradient norm before clipping)."""
    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
        logits, alphas = module(inputs, captions, image_of_caption)  # (B, T-1, V), (B, T-1, R)
    loss, cross_entropy = caption_loss(logits.float(), captions[:, 1:], alphas.float(), tc.attention_penalty)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # measure and clip the true gradients, not the loss-scaled ones
    grad_norm = clip_gradients(trainable(model), tc.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), float(cross_entropy.detach()), grad_norm


def train_one_epoch(
    module: nn.Module,
    model: CaptionModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: Data,
    batches: list[np.ndarray],
    progress: Progress,
    tc: TrainConfig,
    device: torch.device,
    on_step: Callable[[float, float, float], None],
    show_progress: bool = True,
) -> tuple[float, float]:
    """Train on ``batches`` from ``progress.step_in_epoch`` on; ``on_step`` runs after each step (logs,
    checkpoints). Returns the epoch's mean loss and cross-entropy (steps before a restart included)."""
    model.train()
    dtype = amp_dtype(tc.amp, device)
    remaining = batches[progress.step_in_epoch :]
    # Each image of a batch is read (or encoded) once, however many of its captions the batch holds.
    grouped = [np.unique(data.pair_image[b], return_inverse=True) for b in remaining]
    bar = tqdm(
        total=len(batches),
        initial=progress.step_in_epoch,
        desc=f"epoch {progress.epoch + 1}",
        unit="step",
        disable=not show_progress,
    )
    images = data.train.iterate([images for images, _ in grouped])
    for batch, (_, image_of_caption), inputs in zip(remaining, grouped, images, strict=True):
        captions = data.pair_captions[batch]  # (B, T)
        captions = captions[:, : int((captions != PAD_ID).sum(1).max())].to(device, non_blocking=True)
        rows = torch.from_numpy(image_of_caption.reshape(-1)).to(device)  # (B,)
        apply_final_decay(optimizer, progress, tc, len(batches))
        loss, cross_entropy, grad_norm = train_step(
            module, model, optimizer, scaler, inputs.to(device), captions, tc, dtype, rows
        )
        progress.record_step(loss, cross_entropy, grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        on_step(loss, cross_entropy, grad_norm)
    bar.close()
    steps = max(1, len(batches))
    return progress.loss_sum / steps, progress.cross_entropy_sum / steps


def in_final_decay(epoch: int, tc: TrainConfig) -> bool:
    return epoch >= tc.epochs - tc.lr_decay_epochs


def apply_final_decay(optimizer: torch.optim.Optimizer, progress: Progress, tc: TrainConfig, steps: int) -> None:
    """In the last ``lr_decay_epochs`` epochs, set each group's rate for the coming step: the rate
    the group had when the decay began, times the share of the decay's steps still to come. A run
    resumed with a larger ``epochs`` after its decay began goes back to that rate until the new decay."""
    if not in_final_decay(progress.epoch, tc):
        for group in optimizer.param_groups:
            if "decay_start_lr" in group:
                group["lr"] = group.pop("decay_start_lr")
        return
    done = (progress.epoch - (tc.epochs - tc.lr_decay_epochs)) * steps + progress.step_in_epoch
    remaining = 1.0 - done / (tc.lr_decay_epochs * steps)
    for group in optimizer.param_groups:
        # Kept in the group, so last.pt holds it and a resumed run decays from the same rate.
        start = group.setdefault("decay_start_lr", group["lr"])
        group["lr"] = start * remaining


@torch.inference_mode()
def evaluate(model: CaptionModel, data: Data, tc: TrainConfig, device: torch.device, d: Distributed) -> dict:
    """Caption the validation images (each rank its share) and score them, without METEOR (Java is
    slow to start and the score only steers training)."""
    model.eval()
    options = SearchOptions(beam_size=tc.val_beam_size, max_length=tc.val_max_length)
    mine = np.arange(len(data.val_ids))[d.rank :: d.world_size]
    batches = [mine[i : i + tc.batch_size] for i in range(0, len(mine), tc.batch_size)]
    candidates: dict[str, list[str]] = {}
    for batch, inputs in zip(batches, data.val.iterate(batches), strict=True):
        inputs = inputs.to(device)
        encoder = model.encoder
        features = encoder.encode_trainable(inputs) if data.val.from_features else encoder(inputs)  # (B, R, C)
        for i, hypotheses in zip(batch, search(model.decoder, features.float(), options), strict=True):
            candidates[data.val_ids[i]] = data.vocabulary.decode(hypotheses[0].tokens)
    model.train()
    merged: dict[str, list[str]] = {}
    for part in gather(d, candidates):
        merged.update(part)
    return compute_metrics(merged, {i: data.val_references[i] for i in merged}, meteor=False)


# ----------------------------------------------------------------------------------------------------
# The run


def main(args: argparse.Namespace) -> dict[str, float]:
    """Train as ``args`` (from ``build_parser``) says; returns the last validation scores and the best
    score. Raises CaptionerError subclasses for bad configuration or data."""
    git_commit()  # the code as it is now, before a long run outlives it
    config = config_from_args(args)
    d, device = setup_distributed(config.train)
    try:
        return run(config, args, d, device)
    finally:
        if d.enabled:
            dist.destroy_process_group()


def prepare_run(config: RunConfig, d: Distributed, device: torch.device) -> tuple[Trainer, Data, nn.Module]:
    """What a run trains with: the model (from ``init_from`` or fresh), its data (feature cache built
    if missing), the optimiser, schedule and loss scaler, and the module the steps call (DDP-wrapped
    across processes)."""
    tc = config.train
    splits = read_splits(tc)
    vocabulary = build_vocabulary(tc, splits[0])
    model = build_model(config, vocabulary, device)
    data = prepare_data(config, model, vocabulary, splits, d, device)
    logger.info(
        "%d words; %d training captions; %d val images; device %s; %d process(es)",
        len(vocabulary),
        len(data.pair_image),
        len(data.val_ids),
        device,
        d.world_size,
    )
    module: nn.Module = TeacherForced(model, data.train.from_features)
    if d.enabled:
        # The frozen backbone's batch-norm statistics never change, so there are no buffers to broadcast.
        module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    optimizer = build_optimizer(model, tc)
    scheduler = ReduceLROnPlateau(optimizer, mode="max", factor=tc.lr_factor, patience=tc.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(tc.amp, device) == torch.float16)
    trainer = Trainer(model, optimizer, scheduler, scaler, config, vocabulary)
    return trainer, data, module


def run(config: RunConfig, args: argparse.Namespace, d: Distributed, device: torch.device) -> dict[str, float]:
    tc, out = config.train, Path(config.train.out)
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    if tc.objective == "scst" and not tc.init_from:
        raise ConfigError("train.objective = 'scst' fine-tunes a trained model: set train.init_from to its directory")
    if tc.objective == "scst" and config.encoder.fine_tune_stages and not tc.cache_frozen_stages:
        raise ConfigError(
            "train.objective = 'scst' trains on cached features: set encoder.fine_tune_stages = 0, "
            "or train.cache_frozen_stages = true"
        )
    if tc.cache_frozen_stages and config.encoder.fine_grid:
        raise ConfigError("train.cache_frozen_stages needs encoder.fine_grid = false: the fine grid taps a mid stage")
    trainer, data, module = prepare_run(config, d, device)
    if args.resume:
        progress = load_state(out / "last.pt", trainer, d)
        # Judged again under this run's settings: a larger --epochs, or a patience of 0, extends a run
        # that stopped early, exactly as if it had been started with them.
        progress.finished = stops_early(progress, tc)
        logger.info("resuming at epoch %d, step %d", progress.epoch + 1, progress.step_in_epoch)
    else:
        progress = Progress()
        torch.manual_seed(tc.seed + d.rank)  # each rank its own dropout masks
    log = MetricsLog(out, progress) if d.is_main else None
    command = command_line(args)
    try:
        while not progress.finished and progress.epoch < tc.epochs:
            run_epoch(module, trainer, data, progress, d, device, log, out, command)
    finally:
        if log is not None:
            log.close()
    if getattr(args, "debug_replica_checksums", False):
        check_replicas(trainer.model, d, out)
    return {**progress.scores, f"best_{SCORE}": progress.best_score}


def epoch_batches(data: Data, tc: TrainConfig, progress: Progress, d: Distributed) -> list[np.ndarray]:
    """This rank's batches of the epoch in progress, its order drawn (and kept in ``progress``) if new."""
    if progress.order is None:
        # Self-critical batches hold images (each sampled several times), cross-entropy ones captions.
        units = np.arange(len(data.train_references)) if tc.objective == "scst" else data.pair_image
        progress.order = epoch_order(tc.seed, progress.epoch, units)
    return shard_batches(progress.order, d, tc.batch_size)


def epoch_function(tc: TrainConfig) -> Callable[..., tuple[float, float]]:
    """The epoch loop of the run's objective: ``scst.train_one_epoch`` or ``train_one_epoch``."""
    return scst.train_one_epoch if tc.objective == "scst" else train_one_epoch


def run_epoch(
    module: nn.Module,
    trainer: Trainer,
    data: Data,
    progress: Progress,
    d: Distributed,
    device: torch.device,
    log: MetricsLog | None,
    out: Path,
    command: str,
) -> None:
    """One epoch: train (resuming mid-epoch if so saved), validate, step the schedule, checkpoint."""
    tc, started = trainer.config.train, time.monotonic()
    self_critical = tc.objective == "scst"
    batches = epoch_batches(data, tc, progress, d)

    def on_step(loss: float, cross_entropy: float, grad_norm: float) -> None:
        if log is not None and progress.global_step % tc.log_every == 0:
            second = "reward" if self_critical else "cross_entropy"
            log.step(progress.global_step, loss, cross_entropy, grad_norm, second)
        if tc.checkpoint_every and progress.global_step % tc.checkpoint_every == 0:
            save_state(out / "last.pt", trainer, progress, d)

    loss, cross_entropy = epoch_function(tc)(
        module,
        trainer.model,
        trainer.optimizer,
        trainer.scaler,
        data,
        batches,
        progress,
        tc,
        device,
        on_step,
        tc.progress and d.is_main,
    )
    progress.scores = evaluate(trainer.model, data, tc, device, d)
    score = progress.scores[SCORE]
    if not in_final_decay(progress.epoch, tc):
        trainer.scheduler.step(score)
    improved = score > progress.best_score
    progress.best_score = max(score, progress.best_score)
    progress.stale_epochs = 0 if improved else progress.stale_epochs + 1
    progress.finished = stops_early(progress, tc)
    logger.info(
        "epoch %d: loss %.3f, val %s %.3f (best %.3f)%s",
        progress.epoch + 1,
        loss,
        SCORE,
        score,
        progress.best_score,
        ", stopping early" if progress.finished else "",
    )
    if d.is_main:
        row = {
            **progress.scores,
            "epoch": progress.epoch + 1,
            "global_step": progress.global_step,
            "train_loss": loss,
            # For self-critical training, the samples' mean reward.
            "train_reward" if self_critical else "train_cross_entropy": cross_entropy,
            "best_CIDEr": progress.best_score,
            "grad_norm": progress.grad_norm_sum / max(1, progress.step_in_epoch),
            "grad_norm_max": progress.grad_norm_max,
            "seconds": round(time.monotonic() - started, 3),
            **learning_rates(trainer.optimizer),
        }
        log.epoch(row)
        if improved:
            save_model_dir(out / "best", trainer, data, progress, command)
        save_model_dir(out / "last", trainer, data, progress, command)
    progress.next_epoch()
    save_state(out / "last.pt", trainer, progress, d)


def stops_early(progress: Progress, tc: TrainConfig) -> bool:
    """Early stopping: ``patience`` epochs (0: never) without a better validation score."""
    return tc.patience > 0 and progress.stale_epochs >= tc.patience


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"{group['name']}_lr": group["lr"] for group in optimizer.param_groups}


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner-train", description="Train a captioner model.")
    parser.add_argument("--config", type=Path, required=True, help="TOML file ([encoder], [decoder], [train])")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one configuration value (repeatable)",
    )
    parser.add_argument("--data", help="annotation file (train.data)")
    parser.add_argument("--images", help="image folder (train.images)")
    parser.add_argument("--out", help="output folder (train.out)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--device", help="auto, cpu, cuda (train.device)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--workers", type=int, help="image-decoding processes (train.workers)")
    parser.add_argument("--checkpoint-every", type=int, help="also write last.pt every N steps")
    parser.add_argument("--cache-dir", help="feature cache folder (train.cache_dir)")
    parser.add_argument("--init-from", help="start from this model directory's weights (train.init_from)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--debug-replica-checksums",
        action="store_true",
        help="each rank writes OUT/replica_RANK.txt and replicas are compared at the end",
    )
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``captioner-train`` console script."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        scores = main(args)
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(" ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
