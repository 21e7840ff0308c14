"""The data of a run: the training and validation records, the vocabulary, where each split's inputs
come from (the feature cache or image files), the (image, caption) pairs, and the order and batches
of an epoch, which are pure functions of the seed, the epoch and the rank (so a restart finds them
again)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner.checkpoint import read_info
from captioner.encoder import Preprocessing, preprocessing_for
from captioner.model import CaptionModel
from captioner.vocab import PAD_ID, Vocabulary
from training.config import ConfigError, RunConfig, TrainConfig
from training.datasets import DatasetError, ImageRecord, cut_captions, load_records, split_counts
from training.distributed import Distributed, barrier, broadcast_from_main
from training.features import FeatureCache, ImageDataset, cached_features, collate_images, scan_images


@dataclass(frozen=True)
class FeatureSource:
    """Inputs of a split read from the feature cache: (B, R, C) features, or the maps (B, C', h, w) the
    encoder's trainable stages read (``Encoder.encode_trainable`` turns either into features)."""

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
    frozen = config.encoder.fine_tune_stages == 0 or tc.cache_frozen_stages
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
