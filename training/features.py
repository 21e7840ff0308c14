"""The feature cache: a frozen encoder's output for every image, computed once and kept on disk.

With the encoder frozen, an image's features are the same in every epoch and for each of its
captions, so computing them once turns training into a pass over small arrays instead of a CNN
forward per caption per epoch. Layout of one cache::

    CACHE_ROOT/KEY/features.npy   float16 (N, R, C), read as a memory map (a .npy file, so it describes itself)
    CACHE_ROOT/KEY/index.json     the key's ingredients, image ids and paths in row order, failed images

``KEY`` hashes the encoder's backbone, a fingerprint of its weights, the preprocessing, the grid (and
whether it is the fine one) and the image list, so a change to any of them selects another cache
instead of reusing a stale one. A cache is built in a hidden ``.KEY.partial-PID`` folder and renamed
into place once complete: an interrupted run leaves only a hidden folder that is never read (and may
be deleted), never a cache that looks whole.

Images that cannot be read (missing, not an image, truncated...) are skipped: their rows stay zero,
``index.json`` lists them with the reason, and a warning names each file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.encoder import Encoder, Preprocessing
from captioner.errors import ImageError
from training.datasets import DatasetError, ImageRecord

logger = logging.getLogger(__name__)

# 2: images decoded at the size the model needs (Preprocessing.load), as inference decodes them.
CACHE_FORMAT = 2
FEATURES_FILE = "features.npy"
INDEX_FILE = "index.json"
_WARNED_FAILURES = 20  # failed images named one by one; the rest are counted


class ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers. A failure is returned, not raised, so
    one bad file is reported by name instead of killing a worker and, with it, the whole run."""

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.preprocessing.load(self.paths[index]), None
        except ImageError as error:
            return index, None, str(error)


@dataclass(frozen=True)
class ImageBatch:
    indices: list[int]  # dataset positions of the good images, in batch order
    pixels: torch.Tensor | None  # (B, 3, S, S), None when every image of the batch failed
    failures: list[tuple[int, str]]  # (dataset position, reason) of the images that failed


def collate_images(items: Sequence[tuple[int, torch.Tensor | None, str | None]]) -> ImageBatch:
    good = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    failures = [(i, str(reason)) for i, pixels, reason in items if pixels is None]
    pixels = torch.stack([p for _, p in good]) if good else None
    return ImageBatch([i for i, _ in good], pixels, failures)


def image_loader(
    paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """Images in order, ``batch_size`` at a time, decoded by ``workers`` processes. The loader gets its
    own generator so it never draws from (and so never shifts) the global random stream."""
    return DataLoader(
        ImageDataset(paths, preprocessing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        generator=torch.Generator(),
    )


@dataclass(frozen=True)
class FeatureCache:
    directory: Path
    image_ids: list[str]
    paths: list[str]
    failed: dict[str, str]  # image id -> why it could not be read
    features: np.ndarray  # (N, R, C), or (N, C', h, w) before trainable stages; float16, memory-mapped read-only

    def rows(self, image_ids: Sequence[str]) -> list[int]:
        index = {image_id: row for row, image_id in enumerate(self.image_ids)}
        return [index[i] for i in image_ids]

    def batch(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Features of the given rows as a float32 tensor (B, R, C)."""
        return torch.from_numpy(np.asarray(self.features[np.asarray(rows)], dtype=np.float32))


def encoder_fingerprint(encoder: Encoder) -> str:
    """A hash of every weight and buffer of the frozen stages: two encoders with the same fingerprint
    cache the same values, whether their weights came from a named release or a random initialisation.
    The trainable stages are left out: the cache holds what comes before them, and they change as
    the run trains."""
    trainable = {
        tensor.data_ptr()
        for stage in encoder.trainable_stage_modules()
        for tensor in (*stage.parameters(), *stage.buffers())
    }
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if tensor.data_ptr() in trainable:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(encoder: Encoder, preprocessing: Preprocessing, records: Sequence[ImageRecord]) -> tuple[str, dict]:
    """The cache key and the description it hashes (kept in ``index.json`` to explain the key)."""
    description = {
        "format": CACHE_FORMAT,
        "backbone": encoder.config.backbone,
        "weights": encoder.config.weights,
        "weights_sha256": encoder_fingerprint(encoder),
        "preprocessing": preprocessing.to_json(),
        "grid_size": encoder.grid_size,
        "images_sha256": _images_hash(records),
        "count": len(records),
    }
    # Both absent otherwise, so the keys of caches made before they existed still match.
    if encoder.config.fine_grid:
        description["fine_grid"] = True
    if encoder.trainable_stages:  # the cache holds the map the first trainable stage reads
        description["trainable_stages"] = encoder.trainable_stages
    # Round-tripped through JSON so it compares equal to the copy read back from index.json.
    description = json.loads(json.dumps(description, sort_keys=True))
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
    return f"{encoder.config.backbone}-g{encoder.grid_size}-{key}", description


def open_cache(directory: Path, description: dict | None = None) -> FeatureCache | None:
    """The cache in ``directory`` if it is complete (and was made from ``description``), else None."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        features = np.load(directory / FEATURES_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if description is not None and index.get("description") != description:
        return None
    if features.dtype != np.float16 or features.shape[0] != len(index.get("image_ids", [])):
        return None
    return FeatureCache(directory, index["image_ids"], index["paths"], index["failed"], features)


def cached_features(
    records: Sequence[ImageRecord],
    encoder: Encoder,
    preprocessing: Preprocessing,
    cache_root: Path,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
) -> FeatureCache:
    """Open the cache for these images and this encoder, building it first if there is none."""
    _check_unique(records)
    key, description = cache_key(encoder, preprocessing, records)
    directory = Path(cache_root) / key
    cache = open_cache(directory, description)
    if cache is not None:
        logger.info("reusing the feature cache %s (%d images)", directory, len(cache.image_ids))
        return cache
    if directory.exists():
        logger.warning("the feature cache %s is damaged or foreign; rebuilding it", directory)
        shutil.rmtree(directory)
    return build_cache(records, encoder, preprocessing, directory, description, device, batch_size, workers, progress)


def build_cache(
    records: Sequence[ImageRecord],
    encoder: Encoder,
    preprocessing: Preprocessing,
    directory: Path,
    description: dict,
    device: torch.device,
    batch_size: int,
    workers: int,
    progress: bool,
) -> FeatureCache:
    """Encode every image once into ``directory`` (written beside it and renamed into place)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        failed = _encode_into(partial, records, encoder, preprocessing, device, batch_size, workers, progress)
        index = {
            "description": description,
            "image_ids": [r.image_id for r in records],
            "paths": [str(r.path) for r in records],
            "failed": failed,
        }
        (partial / INDEX_FILE).write_text(json.dumps(index) + "\n", encoding="utf-8")
        _rename_into_place(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    cache = open_cache(directory, description)
    if cache is None:
        raise RuntimeError(f"the feature cache {directory} could not be read back after writing it")
    logger.info("wrote the feature cache %s (%d images, %d unreadable)", directory, len(records), len(failed))
    return cache


def _encode_into(
    folder: Path,
    records: Sequence[ImageRecord],
    encoder: Encoder,
    preprocessing: Preprocessing,
    device: torch.device,
    batch_size: int,
    workers: int,
    progress: bool,
) -> dict[str, str]:
    """Fill ``folder/features.npy`` with what ``Encoder.encode_frozen`` gives; returns the failed images
    (id -> reason)."""
    trainable_stages = encoder.trainable_stages
    # A prepared copy, frozen whole: folding the batch norms changes the encoder's state dict, and the
    # caller's encoder is part of the model that training saves.
    encoder = copy.deepcopy(encoder).to(device)
    encoder.set_fine_tuning(0)
    encoder.prepare_for_inference()
    shape: tuple[int, ...] = (len(records), encoder.grid_size**2, encoder.channels)  # (N, R, C)
    if trainable_stages:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, preprocessing.image_size, preprocessing.image_size, device=device)
            shape = (len(records), *encoder.encode_frozen(probe, trainable_stages).shape[1:])  # (N, C', h, w)
    features = np.lib.format.open_memmap(folder / FEATURES_FILE, mode="w+", dtype=np.float16, shape=shape)
    loader = image_loader([r.path for r in records], preprocessing, batch_size, workers, device.type == "cuda")
    failed: dict[str, str] = {}
    with torch.inference_mode():
        for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
            for index, reason in batch.failures:
                failed[records[index].image_id] = reason
                _warn_failure(records[index], reason, len(failed))
            if batch.pixels is not None:
                encoded = encoder.encode_frozen(batch.pixels.to(device, non_blocking=True), trainable_stages).float()
                features[batch.indices] = encoded.cpu().numpy().astype(np.float16)
    features.flush()
    del features
    if failed:
        logger.warning("%d of %d images could not be read and are skipped", len(failed), len(records))
    return failed


def scan_images(
    records: Sequence[ImageRecord], preprocessing: Preprocessing, workers: int, progress: bool = True
) -> dict[str, str]:
    """Decode every image once without encoding it: the unreadable ones (id -> reason), found before
    a run that trains on images rather than cached features meets them in the middle of an epoch."""
    loader = image_loader([r.path for r in records], preprocessing, 32, workers)
    failed: dict[str, str] = {}
    for batch in tqdm(loader, desc="checking images", unit="batch", disable=not progress):
        for index, reason in batch.failures:
            failed[records[index].image_id] = reason
            _warn_failure(records[index], reason, len(failed))
    if failed:
        logger.warning("%d of %d images could not be read and are skipped", len(failed), len(records))
    return failed


def _warn_failure(record: ImageRecord, reason: str, count: int) -> None:
    if count <= _WARNED_FAILURES:
        logger.warning("skipping image %s (%s): %s", record.image_id, record.path, reason)
    elif count == _WARNED_FAILURES + 1:
        logger.warning("more images could not be read; only their count is reported from here on")


def _rename_into_place(partial: Path, directory: Path) -> None:
    """Rename the finished cache into place. If another process finished the same cache first, its
    copy is as good as ours (same key, same inputs), so ours is dropped."""
    try:
        os.replace(partial, directory)
    except OSError:
        if open_cache(directory) is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)


def _images_hash(records: Sequence[ImageRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.image_id}\t{record.path}\n".encode())
    return digest.hexdigest()


def _check_unique(records: Sequence[ImageRecord]) -> None:
    seen: dict[str, Any] = {}
    for record in records:
        if record.image_id in seen:
            raise DatasetError(f"image id {record.image_id} appears twice ({seen[record.image_id]} and {record.path})")
        seen[record.image_id] = record.path
