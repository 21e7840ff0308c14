"""The feature cache: contents, reuse, invalidation, unreadable images and interrupted builds."""

from __future__ import annotations

import copy
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.config import EncoderConfig
from captioner.encoder import Encoder, preprocessing_for
from captioner.images import load_image
from tests.test_bench import load_bench
from training.datasets import DatasetError, ImageRecord
from training.features import FEATURES_FILE, INDEX_FILE, ImageDataset, cached_features, open_cache

CPU = torch.device("cpu")
# The packaged ImageNet weights (no download; a random Lite0's features underflow float16) on small
# inputs keep each encoder pass to milliseconds.
SMALL = EncoderConfig(backbone="efficientnet_lite0", weights="packaged", image_size=64, grid_size=2)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(SMALL).eval()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: on a busy 2-core machine, OpenMP threads waiting for each other slow every convolution."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_records(folder: Path, count: int) -> list[ImageRecord]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    records = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(f"id{i}", path, "train", [["a", "picture"]], ["a picture"]))
    return records


class CountingEncoder:
    """Counts the images an encoder is run on, through a forward hook. The hook is a plain function, not
    a bound method, so that the prepared copy of the encoder that fills the cache counts here too (a
    deep copy of a module shares its hook functions but would copy a method's object)."""

    def __init__(self, encoder: Encoder) -> None:
        self.images = 0

        def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.images += inputs[0].shape[0]

        self.handle = encoder.register_forward_hook(count)

    def __enter__(self) -> CountingEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def build(records: list[ImageRecord], encoder: Encoder, root: Path, workers: int = 0, batch_size: int = 3):
    return cached_features(
        records, encoder, preprocessing_for(SMALL), root, CPU, batch_size=batch_size, workers=workers, progress=False
    )


def test_cache_holds_each_images_features_in_record_order(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 5)
    with CountingEncoder(encoder) as counter:
        cache = build(records, encoder, tmp_path / "cache")
    assert counter.images == 5  # every image encoded exactly once
    assert cache.features.dtype == np.float16 and cache.features.shape == (5, 4, 1280)
    assert cache.image_ids == [r.image_id for r in records] and cache.failed == {}
    pixels = torch.stack([preprocessing_for(SMALL)(load_image(r.path)) for r in records])
    with torch.inference_mode():
        expected = encoder(pixels).numpy()  # (5, 4, 1280)
    np.testing.assert_allclose(cache.features.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    rows = cache.rows(["id3", "id1"])
    assert torch.equal(cache.batch(rows), torch.from_numpy(cache.features[[3, 1]].astype(np.float32)))


def test_a_matching_cache_is_reused_without_encoding(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 4)
    first = build(records, encoder, tmp_path / "cache")
    with CountingEncoder(encoder) as counter:
        second = build(records, encoder, tmp_path / "cache")
    assert counter.images == 0
    assert second.directory == first.directory
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.directory.name]


def test_the_key_changes_with_images_weights_and_grid(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 4)
    root = tmp_path / "cache"
    base = build(records, encoder, root).directory
    assert build(records[:3], encoder, root).directory != base  # another image list
    other_weights = copy.deepcopy(encoder)
    with torch.no_grad():
        next(other_weights.parameters())[0].add_(0.01)
    assert build(records, other_weights, root).directory != base  # same config, other weights
    other_grid = Encoder(EncoderConfig(weights="packaged", image_size=64, grid_size=1)).eval()
    other = cached_features(records, other_grid, preprocessing_for(other_grid.config), root, CPU, progress=False)
    assert other.directory != base and other.features.shape == (4, 1, 1280)
    # The fine grid of the same size: 4 regions again, but other features in them.
    fine = Encoder(EncoderConfig(weights="packaged", image_size=64, grid_size=1, fine_grid=True)).eval()
    fine_cache = cached_features(records, fine, preprocessing_for(fine.config), root, CPU, progress=False)
    assert fine_cache.directory not in (base, other.directory) and fine_cache.features.shape == (4, 4, 1392)
    assert len(list(root.iterdir())) == 5


def test_unreadable_and_missing_images_are_skipped_counted_and_named(
    tmp_path: Path, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    records = make_records(tmp_path / "images", 5)
    records[1].path.write_bytes(b"this is not an image")
    records[3].path.unlink()
    with caplog.at_level(logging.WARNING, logger="training.features"):
        cache = build(records, encoder, tmp_path / "cache", workers=2)  # failures happen inside workers
    assert sorted(cache.failed) == ["id1", "id3"]
    assert "no such file" in cache.failed["id3"]
    assert "img1.png" in caplog.text and "img3.png" in caplog.text
    assert "2 of 5 images could not be read" in caplog.text
    assert not cache.features[[1, 3]].any()  # rows of failed images stay zero
    assert cache.features[[0, 2, 4]].any(axis=(1, 2)).all()
    index = json.loads((cache.directory / INDEX_FILE).read_text())
    assert sorted(index["failed"]) == ["id1", "id3"]


def test_an_interrupted_build_leaves_no_cache_that_looks_complete(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 6)
    root = tmp_path / "cache"

    def fail_on_second_batch(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        fail_on_second_batch.calls += 1  # type: ignore[attr-defined]
        if fail_on_second_batch.calls == 2:  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    fail_on_second_batch.calls = 0  # type: ignore[attr-defined]
    handle = encoder.register_forward_hook(fail_on_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            build(records, encoder, root, batch_size=3)
    finally:
        handle.remove()
    assert list(root.iterdir()) == []  # neither a final folder nor the partial one
    with CountingEncoder(encoder) as counter:
        cache = build(records, encoder, root)
    assert counter.images == 6 and cache.failed == {}


def test_a_killed_build_or_damaged_cache_is_not_mistaken_for_a_complete_one(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 3)
    root = tmp_path / "cache"
    cache = build(records, encoder, root)
    directory = cache.directory
    del cache
    # What a killed build leaves: a hidden partial folder, which is never opened.
    partial = root / f".{directory.name}.partial-99999"
    partial.mkdir()
    (partial / FEATURES_FILE).write_bytes(b"")
    assert open_cache(partial) is None
    # A cache whose features file was truncated is rebuilt rather than read.
    data = (directory / FEATURES_FILE).read_bytes()
    (directory / FEATURES_FILE).write_bytes(data[: len(data) // 2])
    assert open_cache(directory) is None
    with CountingEncoder(encoder) as counter:
        rebuilt = build(records, encoder, root)
    assert counter.images == 3 and rebuilt.directory == directory
    assert rebuilt.features.shape == (3, 4, 1280)


def test_duplicate_image_ids_are_refused(tmp_path: Path, encoder: Encoder) -> None:
    records = make_records(tmp_path / "images", 2)
    with pytest.raises(DatasetError, match="image id id0 appears twice"):
        build([records[0], records[0]], encoder, tmp_path / "cache")


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_the_cache_decodes_images_exactly_as_inference_does(tmp_path: Path, tiny_model_dir: Path, kind: str) -> None:
    # Large enough that decoding for the model differs from decoding at full size: a JPEG scaled by
    # its decoder, a PNG reduced after decoding.
    photo = load_bench("image_decode").phone_photo(1600, 1200)
    path = tmp_path / f"photo.{kind.lower()}"
    if kind == "JPEG":
        path.write_bytes(photo)
    else:
        Image.open(io.BytesIO(photo)).save(path, "PNG", compress_level=1)
    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu")
    preprocessing = captioner.info.preprocessing
    _, pixels, failure = ImageDataset([path], preprocessing)[0]
    assert failure is None and pixels is not None
    assert torch.equal(pixels, captioner.preprocess(path))
    assert not torch.equal(pixels, preprocessing(load_image(path)))  # the full-size decode the cache used before


def test_with_trainable_stages_the_cache_holds_the_frozen_stages_map_under_a_key_of_their_weights(
    tmp_path: Path, encoder: Encoder
) -> None:
    records = make_records(tmp_path / "images", 3)
    root = tmp_path / "cache"
    frozen = build(records, encoder, root)
    partly = copy.deepcopy(encoder)
    partly.set_fine_tuning(2)
    cache = build(records, partly, root)
    assert cache.directory != frozen.directory
    pixels = torch.stack([preprocessing_for(SMALL)(load_image(r.path)) for r in records])
    with torch.inference_mode():
        expected = partly.encode_frozen(pixels)  # (3, C', h, w)
        assert cache.features.shape == expected.shape and cache.features.dtype == np.float16
        np.testing.assert_allclose(cache.features.astype(np.float32), expected.numpy(), rtol=2e-3, atol=2e-3)
        finished = partly.encode_trainable(cache.batch([0, 1, 2]))  # (3, R, C)
        np.testing.assert_allclose(finished.numpy(), frozen.features.astype(np.float32), rtol=1e-2, atol=1e-2)
    # Training moves the trainable stages: the cache stays valid. A frozen stage's weights make another.
    trained = copy.deepcopy(partly)
    frozen_changed = copy.deepcopy(partly)
    with torch.no_grad():
        next(trained.trainable_stage_modules()[-1].parameters()).add_(0.01)
        next(frozen_changed.body.parameters()).add_(0.01)
    assert build(records, trained, root).directory == cache.directory
    assert build(records, frozen_changed, root).directory not in (cache.directory, frozen.directory)
