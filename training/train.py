"""Train a captioner model (Show, Attend and Tell) and write model directories.

    python -m training.train --config training/configs/synthetic.toml [--set SECTION.KEY=VALUE ...]
        [--data FILE] [--images DIR] [--out DIR] [--epochs N] [--resume] [--checkpoint-every N]
    python -m torch.distributed.run --nproc_per_node 4 -m training.train --config ...   (DDP)

The configuration is a TOML file with ``[encoder]`` (``captioner.config.EncoderConfig``), ``[decoder]``
(``DecoderConfig`` without ``vocab_size`` and ``feature_dim``, which come from the data and the
backbone) and ``[train]`` (``TrainConfig``); ``--set`` and the dedicated flags override it.

With a frozen encoder (``fine_tune_stages = 0``) every image is encoded once into a feature cache
(``training.features``) and training reads the cache; otherwise every step runs the encoder on images.
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
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import logging
import math
import os
import random
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.api import resolve_device
from captioner.checkpoint import ModelInfo, load_model, read_info, save_model
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.decoder import caption_loss
from captioner.decoding import SearchOptions, search
from captioner.encoder import Preprocessing, feature_dim_for, preprocessing_for
from captioner.errors import CaptionerError
from captioner.model import CaptionModel
from captioner.vocab import PAD_ID, Vocabulary
from training import scst
from training.datasets import FORMATS, DatasetError, ImageRecord, cut_captions, load_records, split_counts
from training.features import FeatureCache, ImageDataset, cached_features, collate_images, scan_images
from training.metrics import compute_metrics

logger = logging.getLogger("training.train")

STATE_FORMAT = 1
SCORE = "CIDEr"  # the validation score that picks the best model, decays the rate and stops early
CSV_COLUMNS = (
    "epoch",
    "global_step",
    "train_loss",
    "train_cross_entropy",
    "train_reward",
    "decoder_lr",
    "encoder_lr",
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "ROUGE_L",
    "CIDEr",
    "best_CIDEr",
    "seconds",
)
AMP_MODES = ("auto", "off", "fp16", "bf16")
OBJECTIVES = ("xe", "scst")
BASELINES = scst.BASELINES


class ConfigError(CaptionerError, ValueError):
    """A configuration file or override that cannot be used; the message says which key and why."""

    code = "invalid_config"


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    """Data, optimisation and bookkeeping. Paths are relative to the working directory."""

    data: str = ""  # annotation file: Karpathy JSON, raw COCO captions JSON or Flickr8k.token.txt
    images: str = ""  # the folder the annotation file's image paths are relative to
    format: str = "auto"  # one of training.datasets.FORMATS
    val_data: str = ""  # a separate validation annotation file (raw COCO); empty: the val split of ``data``
    val_images: str = ""  # its image folder; empty: ``images``
    out: str = "runs/train"
    cache_dir: str = ""  # feature caches; empty: ``feature-cache`` beside the annotation file
    init_from: str = ""  # a model directory whose weights (and vocabulary) start the run
    name: str = "captioner"
    version: str = "1"
    epochs: int = 20
    batch_size: int = 64
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    grad_clip: float = 5.0  # on the global gradient norm; 0 disables clipping
    attention_penalty: float = 1.0  # lambda of the doubly stochastic attention penalty
    max_caption_length: int = 50  # training captions are cut to this many words
    min_word_count: int = 5
    lr_factor: float = 0.5
    lr_patience: int = 2  # epochs without a better val score before the learning rates decay
    # The last N of ``epochs`` take the learning rates linearly from where they stand to 0, step by
    # step, in place of the plateau rule (0: the plateau rule to the end).
    lr_decay_epochs: int = 0
    patience: int = 6  # epochs without a better val score before training stops (0: never stop early)
    val_beam_size: int = 3
    val_max_length: int = 20
    val_limit: int = 0  # caption only the first N val images each epoch (0: all)
    seed: int = 0
    workers: int = 2
    threads: int = 0  # CPU threads per process (0: torch's default, one per core)
    feature_batch_size: int = 32
    device: str = "auto"
    amp: str = "auto"  # mixed precision on CUDA: auto (bf16 where supported, else fp16), fp16, bf16, off
    checkpoint_every: int = 0  # also write last.pt every N steps (0: only at the end of each epoch)
    log_every: int = 10  # steps between TensorBoard loss points
    dist_timeout_minutes: int = 240  # long enough for rank 0 to build a COCO feature cache
    progress: bool = True
    # "xe": cross-entropy on the reference captions; "scst": self-critical training on CIDEr-D
    # (training/scst.py), which fine-tunes the model of ``init_from``.
    objective: str = "xe"
    scst_samples: int = 5  # captions sampled per image
    scst_baseline: str = "greedy"  # "greedy": the greedy caption's reward; "mean": the other samples' mean
    scst_max_length: int = 16  # most words of a sampled caption

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "batch_size",
            "max_caption_length",
            "min_word_count",
            "val_beam_size",
            "val_max_length",
            "feature_batch_size",
            "log_every",
            "dist_timeout_minutes",
            "scst_max_length",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "grad_clip",
            "attention_penalty",
            "lr_patience",
            "lr_decay_epochs",
            "patience",
            "val_limit",
            "workers",
            "threads",
            "checkpoint_every",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not (self.decoder_lr > 0 and self.encoder_lr > 0 and 0 < self.lr_factor < 1):
            raise ValueError("learning rates must be positive and lr_factor must lie in (0, 1)")
        if self.lr_decay_epochs > self.epochs:
            raise ValueError(f"lr_decay_epochs ({self.lr_decay_epochs}) must not exceed epochs ({self.epochs})")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.scst_baseline not in BASELINES:
            raise ValueError(f"scst_baseline must be one of {', '.join(BASELINES)}")
        if not 2 <= self.scst_samples <= 50:
            raise ValueError("scst_samples must lie in [2, 50]")


@dataclass(frozen=True)
class RunConfig:
    encoder: EncoderConfig
    decoder: dict[str, Any]  # DecoderConfig fields but vocab_size and feature_dim, known once data is read
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": asdict(self.encoder), "decoder": dict(self.decoder), "train": asdict(self.train)}

    def model_config(self, vocab_size: int) -> ModelConfig:
        feature_dim = feature_dim_for(self.encoder)
        decoder = DecoderConfig(vocab_size=vocab_size, feature_dim=feature_dim, **self.decoder)
        return ModelConfig(self.encoder, decoder)


def load_config(path: Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read the TOML file and apply ``SECTION.KEY=VALUE`` overrides (VALUE is read as TOML, falling
    back to a plain string, so ``train.decoder_lr=1e-3`` is a number and ``train.out=runs/x`` a path)."""
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as error:
        raise ConfigError(f"cannot read the configuration {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    unknown = set(data) - {"encoder", "decoder", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {sorted(unknown)}; use [encoder], [decoder] and [train]")
    for item in overrides:
        apply_override(data, item)
    decoder = dict(data.get("decoder", {}))
    for derived in ("vocab_size", "feature_dim"):
        if derived in decoder:
            raise ConfigError(f"decoder.{derived} comes from the data and the backbone; do not set it")
    encoder = _build(EncoderConfig, data.get("encoder", {}), "encoder")
    try:
        feature_dim = feature_dim_for(encoder)
    except ValueError as error:  # an unknown backbone
        raise ConfigError(f"[encoder]: {error}") from None
    _build(DecoderConfig, decoder | {"vocab_size": 4, "feature_dim": feature_dim}, "decoder")  # validates the fields
    return RunConfig(
        encoder=encoder,
        decoder=decoder,
        train=_build(TrainConfig, data.get("train", {}), "train"),
    )


def apply_override(data: dict[str, Any], item: str) -> None:
    key, equals, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not equals or not dot or not name or section not in ("encoder", "decoder", "train"):
        raise ConfigError(f"override {item!r} is not SECTION.KEY=VALUE with SECTION encoder, decoder or train")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    data.setdefault(section, {})[name] = value


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    """A config dataclass from TOML values: unknown keys and wrongly typed values are refused (the
    string ``"none"`` stands for None, which TOML cannot write, where the default is None)."""
    defaults = {f.name: f.default for f in fields(kind)}
    types = {f.name: f.type for f in fields(kind)}
    unknown = set(values) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown [{section}] keys: {sorted(unknown)}")
    checked = {}
    for name, value in values.items():
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:  # None default or a required field: the dataclass checks it
            ok = True
        if value == "none" and "None" in str(types[name]):
            value, ok = None, True
        if not ok:
            raise ConfigError(f"{section}.{name} must be a {type(default).__name__}, not {value!r}")
        checked[name] = value
    try:
        return kind(**checked)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{section}]: {error}") from None


# ----------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its own machine

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(tc: TrainConfig) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in the environment (one process per device) and
    pick this process's device; without torchrun, a single process on ``tc.device``."""
    device = resolve_device(tc.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=tc.dist_timeout_minutes))
    return Distributed(rank, world_size, local_rank), device


def barrier(d: Distributed) -> None:
    if d.enabled:
        dist.barrier()


def gather(d: Distributed, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not d.enabled:
        return [value]
    values: list[Any] = [None] * d.world_size
    dist.all_gather_object(values, value)
    return values


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
# Data


@dataclass(frozen=True)
class FeatureSource:
    """Inputs of a split read from the feature cache: (B, R, C) features."""

    cache: FeatureCache
    rows: np.ndarray  # the cache row of each image of the split
    from_features: bool = True

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        for batch in batches:
            yield self.cache.batch(self.rows[batch])


@dataclass(frozen=True)
class ImageSource:
    """Inputs of a split decoded from image files: (B, 3, S, S) pixels, for encoder fine-tuning."""

    paths: list[Path]
    preprocessing: Preprocessing
    workers: int
    from_features: bool = False

    def iterate(self, batches: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        loader = DataLoader(
            ImageDataset(self.paths, self.preprocessing),
            batch_sampler=[batch.tolist() for batch in batches],
            num_workers=self.workers,
            collate_fn=collate_images,
            generator=torch.Generator(),  # keeps the loader off the global random stream
        )
        for batch in loader:
            if batch.failures:
                index, reason = batch.failures[0]
                raise DatasetError(f"image {self.paths[index]} became unreadable during training: {reason}")
            yield batch.pixels


Source = FeatureSource | ImageSource


@dataclass(frozen=True)
class Data:
    vocabulary: Vocabulary
    train: Source
    pair_image: np.ndarray  # (P,) the image (position in the train source) of each caption
    pair_captions: torch.Tensor  # (P, T) <start> w.. <end> <pad>..
    train_references: list[list[list[str]]]  # the captions of each training image (its position in ``train``)
    val: Source
    val_ids: list[str]
    val_references: dict[str, list[list[str]]]
    provenance: dict[str, Any]


def read_splits(tc: TrainConfig) -> tuple[list[ImageRecord], list[ImageRecord], int]:
    """Training and validation records; training captions cut to ``max_caption_length`` (validation
    references stay whole: the metrics compare with what people wrote)."""
    if not tc.data or not tc.images:
        raise ConfigError("no data: set train.data and train.images (or pass --data and --images)")
    records = load_records(tc.data, tc.images, format=tc.format)
    train = [r for r in records if r.split == "train"]
    if tc.val_data:
        val = load_records(tc.val_data, tc.val_images or tc.images, split="val", format=tc.format)
    else:
        val = [r for r in records if r.split == "val"]
    if tc.val_limit:
        val = val[: tc.val_limit]
    if not train or not val:
        raise DatasetError(f"{tc.data}: need training and validation images, found {split_counts(records)}")
    train, n_cut = cut_captions(train, tc.max_caption_length)
    return train, val, n_cut


def build_vocabulary(tc: TrainConfig, train: Sequence[ImageRecord]) -> Vocabulary:
    """The words of the training captions seen ``min_word_count`` times, or the starting model's."""
    if tc.init_from:
        return read_info(tc.init_from).vocabulary
    return Vocabulary.build((c for r in train for c in r.captions), min_count=tc.min_word_count)


def prepare_data(
    config: RunConfig, model: CaptionModel, vocabulary: Vocabulary, splits: tuple, d: Distributed, device: torch.device
) -> Data:
    """Find the unreadable images (rank 0 first, building the feature cache when the encoder is
    frozen, then the others reuse its work), drop them, and lay out the caption pairs."""
    tc, (train, val, n_cut) = config.train, splits
    preprocessing = preprocessing_for(config.encoder)
    frozen = config.encoder.fine_tune_stages == 0
    cache_root = Path(tc.cache_dir) if tc.cache_dir else Path(tc.data).parent / "feature-cache"

    cache: FeatureCache | None = None
    if frozen:
        # Rank 0 builds the cache while the others wait; then they find it complete and open it. Should
        # another machine not share the cache folder, its first process builds a copy before the rest.
        node_main = d.local_rank == 0 and not d.is_main
        for turn in (d.is_main, node_main, not (d.is_main or node_main)):
            if turn:
                cache = cached_features(
                    [*train, *val],
                    model.encoder,
                    preprocessing,
                    cache_root,
                    device,
                    tc.feature_batch_size,
                    tc.workers,
                    tc.progress and d.is_main,
                )
            barrier(d)
        failed = cache.failed
    else:
        scanned = scan_images([*train, *val], preprocessing, tc.workers, tc.progress) if d.is_main else None
        failed = broadcast_from_main(d, scanned)
    train = [r for r in train if r.image_id not in failed]
    val = [r for r in val if r.image_id not in failed]
    if not train or not val:
        raise DatasetError(f"{tc.data}: no readable training or validation images are left")

    def source(records: list[ImageRecord]) -> Source:
        if cache is not None:
            return FeatureSource(cache, np.asarray(cache.rows([r.image_id for r in records])))
        return ImageSource([r.path for r in records], preprocessing, tc.workers)

    pair_image, pair_captions = encode_pairs(train, vocabulary, tc.max_caption_length)
    provenance = data_provenance(tc, train, val, failed, n_cut)
    references = {r.image_id: r.captions for r in val}
    return Data(
        vocabulary,
        source(train),
        pair_image,
        pair_captions,
        [r.captions for r in train],
        source(val),
        [r.image_id for r in val],
        references,
        provenance,
    )


def broadcast_from_main(d: Distributed, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def encode_pairs(
    records: Sequence[ImageRecord], vocabulary: Vocabulary, max_length: int
) -> tuple[np.ndarray, torch.Tensor]:
    """One row per (image, caption): the image's position and ``<start> words <end>`` padded."""
    images = [i for i, r in enumerate(records) for _ in r.captions]
    encoded = [vocabulary.encode(c, max_length) for r in records for c in r.captions]
    captions = torch.full((len(encoded), max(len(e) for e in encoded)), PAD_ID, dtype=torch.long)
    for row, ids in enumerate(encoded):
        captions[row, : len(ids)] = torch.tensor(ids)
    return np.asarray(images, dtype=np.int64), captions


def data_provenance(
    tc: TrainConfig, train: Sequence[ImageRecord], val: Sequence[ImageRecord], failed: dict, n_cut: int
) -> dict[str, Any]:
    return {
        "annotations": tc.data,
        "annotations_sha256": _file_sha256(Path(tc.data)),
        "val_annotations": tc.val_data or tc.data,
        "images": tc.images,
        "train_images": len(train),
        "train_captions": sum(len(r.captions) for r in train),
        "val_images": len(val),
        "unreadable_images": len(failed),
        "captions_cut": n_cut,
    }


def epoch_order(seed: int, epoch: int, pair_image: np.ndarray) -> torch.Tensor:
    """The caption pairs of ``epoch``: the images in a random order (a pure function of the seed and
    the epoch), each image's captions one after the other. A batch then holds a few images with all
    their captions, and the work done once per image (reading its features or running the encoder,
    the attention keys) serves every caption of it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    images = int(pair_image.max()) + 1 if len(pair_image) else 0
    rank = torch.empty(images, dtype=torch.long)
    rank[torch.randperm(images, generator=generator)] = torch.arange(images)
    return torch.argsort(rank[torch.from_numpy(pair_image)], stable=True)  # (P,)


def shard_batches(order: torch.Tensor, d: Distributed, batch_size: int) -> list[np.ndarray]:
    """This rank's share of ``order`` in batches. The order is cut into global batches of
    ``batch_size * world_size`` and each rank takes its contiguous part of each, which keeps an
    image's captions together. As with DistributedSampler, the order is padded with its own start
    to a multiple of the world size, so every rank takes the same number of steps."""
    total = math.ceil(len(order) / d.world_size) * d.world_size
    padded = torch.cat([order, order[: total - len(order)]]).numpy()
    step = batch_size * d.world_size
    batches = []
    for start in range(0, total, step):
        chunk = padded[start : start + step]
        share = len(chunk) // d.world_size
        batches.append(chunk[d.rank * share : (d.rank + 1) * share])
    return batches


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
        features = inputs if self.from_features else self.model.encoder(inputs)  # (N, R, C)
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


def trainable(model: CaptionModel) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


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
) -> tuple[float, float]:
    """One optimisation step on a batch of ``inputs`` (N images) and ``captions`` (B, T), caption
    ``b`` being of image ``image_of_caption[b]`` (of image ``b`` when None); returns (loss,
    cross-entropy)."""
    with torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
        logits, alphas = module(inputs, captions, image_of_caption)  # (B, T-1, V), (B, T-1, R)
    loss, cross_entropy = caption_loss(logits.float(), captions[:, 1:], alphas.float(), tc.attention_penalty)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if tc.grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        torch.nn.utils.clip_grad_norm_(trainable(model), tc.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach()), float(cross_entropy.detach())


@dataclass
class Progress:
    """Where training stands; saved in last.pt."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of it already done
    global_step: int = 0
    best_score: float = -math.inf
    stale_epochs: int = 0  # epochs since the best score last improved
    finished: bool = False
    loss_sum: float = 0.0  # over the steps of the epoch in progress
    cross_entropy_sum: float = 0.0
    order: torch.Tensor | None = None  # the data order of the epoch in progress
    scores: dict[str, float] = field(default_factory=dict)  # the latest val scores


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
    on_step: Callable[[float, float], None],
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
        loss, cross_entropy = train_step(module, model, optimizer, scaler, inputs.to(device), captions, tc, dtype, rows)
        progress.loss_sum += loss
        progress.cross_entropy_sum += cross_entropy
        progress.step_in_epoch += 1
        progress.global_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        on_step(loss, cross_entropy)
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
        features = inputs if data.val.from_features else model.encoder(inputs)  # (B, R, C)
        for i, hypotheses in zip(batch, search(model.decoder, features.float(), options), strict=True):
            candidates[data.val_ids[i]] = data.vocabulary.decode(hypotheses[0].tokens)
    model.train()
    merged: dict[str, list[str]] = {}
    for part in gather(d, candidates):
        merged.update(part)
    return compute_metrics(merged, {i: data.val_references[i] for i in merged}, meteor=False)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict[str, Any]:
    """Every random stream this process draws from, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Trainer:
    """The objects a checkpoint saves and restores."""

    model: CaptionModel
    optimizer: torch.optim.Optimizer
    scheduler: ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    config: RunConfig
    vocabulary: Vocabulary


def save_state(path: Path, trainer: Trainer, progress: Progress, d: Distributed) -> None:
    """Write last.pt atomically (temporary file, then rename): a crash leaves the previous one.
    Every rank takes part (their RNG states are gathered); only rank 0 writes."""
    rng = gather(d, rng_state())
    if not d.is_main:
        return
    state = {
        "format": STATE_FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "progress": {k: v for k, v in asdict(progress).items() if k != "order"},
        "order": progress.order,
        "world_size": d.world_size,
        "rng": rng,
        "vocabulary": list(trainer.vocabulary.tokens),
        "model_config": trainer.model.config.to_dict(),
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def load_state(path: Path, trainer: Trainer, d: Distributed) -> Progress:
    """Restore everything ``save_state`` wrote; refuses a state from another model or world size."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"--resume: there is no {path} to resume from") from None
    except Exception as error:  # torch.load reports a damaged file with many exception types
        raise ConfigError(f"--resume: {path} is not a readable training state: {error}") from None
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(f"--resume: {path} has training-state format {state.get('format')!r}")
    if state["world_size"] != d.world_size:
        raise ConfigError(f"--resume: {path} was written by {state['world_size']} processes, not {d.world_size}")
    if tuple(state["vocabulary"]) != trainer.vocabulary.tokens:
        raise ConfigError(f"--resume: {path} was trained with another vocabulary (different data or min count)")
    if state["model_config"] != trainer.model.config.to_dict():
        raise ConfigError(f"--resume: {path} holds another model configuration than the one given")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][d.rank])
    return Progress(**state["progress"], order=state["order"])


def save_model_dir(directory: Path, trainer: Trainer, data: Data, progress: Progress, command: str) -> None:
    tc = trainer.config.train
    info = ModelInfo(
        name=tc.name,
        version=tc.version,
        config=trainer.model.config,
        vocabulary=trainer.vocabulary,
        preprocessing=preprocessing_for(trainer.config.encoder),
        provenance={
            "command": command,
            "config": trainer.config.to_dict(),
            "seed": tc.seed,
            "data": data.provenance,
            "git_commit": git_commit(),
            "epochs_trained": progress.epoch + 1,
            "steps": progress.global_step,
        },
        metrics={"val": dict(progress.scores), "val_beam_size": tc.val_beam_size, "score": SCORE},
    )
    save_model(directory, trainer.model, info)


@functools.cache
def git_commit() -> str | None:
    """The commit of the code that trained the model, when it runs from a git checkout. Read once,
    when the run starts (``main``): a commit made while a run trains is not the code it runs."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def parameter_checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Logs


class MetricsLog:
    """``metrics.csv`` (one row per epoch) and TensorBoard events; rank 0 only. On resume, rows and
    events from beyond the restored point are dropped, so a replayed epoch is not logged twice."""

    def __init__(self, out: Path, progress: Progress) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 logs

        self.csv_path = out / "metrics.csv"
        rows = self._read_rows()
        kept = [row for row in rows if int(row["epoch"]) <= progress.epoch]
        with self.csv_path.open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        purge = progress.global_step if progress.global_step else None
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def _read_rows(self) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))

    def step(self, step: int, loss: float, second: float, second_name: str = "cross_entropy") -> None:
        """The step's loss and ``second``: its cross-entropy, or for self-critical training its mean reward."""
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar(f"train/{second_name}", second, step)

    def epoch(self, row: dict[str, Any]) -> None:
        with self.csv_path.open("a", newline="", encoding="utf-8") as stream:
            csv.DictWriter(stream, fieldnames=CSV_COLUMNS).writerow({k: row.get(k, "") for k in CSV_COLUMNS})
        for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
            self.writer.add_scalar(f"val/{key}", row[key], row["global_step"])
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], row["global_step"])
        self.writer.add_scalar("lr/decoder", row["decoder_lr"], row["global_step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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


def run(config: RunConfig, args: argparse.Namespace, d: Distributed, device: torch.device) -> dict[str, float]:
    tc, out = config.train, Path(config.train.out)
    out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    if tc.objective == "scst" and not tc.init_from:
        raise ConfigError("train.objective = 'scst' fine-tunes a trained model: set train.init_from to its directory")
    if tc.objective == "scst" and config.encoder.fine_tune_stages:
        raise ConfigError("train.objective = 'scst' trains on cached features: set encoder.fine_tune_stages = 0")
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
        check_replicas(model, d, out)
    return {**progress.scores, f"best_{SCORE}": progress.best_score}


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
    if progress.order is None:
        # Self-critical batches hold images (each sampled several times), cross-entropy ones captions.
        units = np.arange(len(data.train_references)) if self_critical else data.pair_image
        progress.order = epoch_order(tc.seed, progress.epoch, units)
    batches = shard_batches(progress.order, d, tc.batch_size)
    epoch_function = scst.train_one_epoch if self_critical else train_one_epoch

    def on_step(loss: float, cross_entropy: float) -> None:
        if log is not None and progress.global_step % tc.log_every == 0:
            log.step(progress.global_step, loss, cross_entropy, "reward" if self_critical else "cross_entropy")
        if tc.checkpoint_every and progress.global_step % tc.checkpoint_every == 0:
            save_state(out / "last.pt", trainer, progress, d)

    loss, cross_entropy = epoch_function(
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
            "seconds": round(time.monotonic() - started, 3),
            **learning_rates(trainer.optimizer),
        }
        log.epoch(row)
        if improved:
            save_model_dir(out / "best", trainer, data, progress, command)
        save_model_dir(out / "last", trainer, data, progress, command)
    progress.epoch, progress.step_in_epoch, progress.order = progress.epoch + 1, 0, None
    progress.loss_sum = progress.cross_entropy_sum = 0.0
    save_state(out / "last.pt", trainer, progress, d)


def stops_early(progress: Progress, tc: TrainConfig) -> bool:
    """Early stopping: ``patience`` epochs (0: never) without a better validation score."""
    return tc.patience > 0 and progress.stale_epochs >= tc.patience


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"{group['name']}_lr": group["lr"] for group in optimizer.param_groups}


def check_replicas(model: CaptionModel, d: Distributed, out: Path) -> None:
    """Debugging aid for DDP: each rank writes its parameters' checksum; any mismatch fails loudly."""
    checksum = parameter_checksum(model)
    (out / f"replica_{d.rank}.txt").write_text(checksum + "\n", encoding="utf-8")
    checksums = gather(d, checksum)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"the model replicas diverged: parameter checksums {checksums}")


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


_FLAG_KEYS = (
    "data",
    "images",
    "out",
    "epochs",
    "device",
    "seed",
    "workers",
    "checkpoint_every",
    "cache_dir",
    "init_from",
)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The TOML file, then ``--set`` overrides, then the dedicated flags."""
    overrides = list(args.overrides)
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"train.{key}={_toml_literal(value)}")
    if getattr(args, "no_progress", False):
        overrides.append("train.progress=false")
    return load_config(args.config, overrides)


def command_line(args: argparse.Namespace) -> str:
    """The command that repeats this run, rebuilt from the parsed arguments (so it is right however
    ``main`` was called: console script, ``python -m`` or from Python)."""
    parts = ["captioner-train", "--config", str(args.config)]
    for item in args.overrides:
        parts += ["--set", item]
    for key in _FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            parts += ["--" + key.replace("_", "-"), str(value)]
    for flag in ("resume", "no_progress", "debug_replica_checksums"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return shlex.join(parts)


def _toml_literal(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


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
