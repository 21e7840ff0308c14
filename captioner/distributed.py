"""Batch captioning on a Ray cluster: ``captioner caption --engine ray`` and ``caption_dataset``.

A Ray Data pipeline of two stages, streamed so that images are read, decoded and captioned at once:

    paths (or a Ray Dataset with a "path" column, and optionally "bytes" from ray.data.read_binary_files)
      -> decode tasks (CPU): read the file, ``load_image`` at the model's size, ``Preprocessing.resize``
         -> uint8 (S, S, 3) pixels, or an error code and message; a bad file is a row, never a failure
      -> caption actors: each loads the model once, normalises a batch (``Preprocessing.normalise``, the
         second half of the model's own preprocessing) and runs ``Captioner.caption_pixels``
      -> records: a Dataset with the columns of ``parquet_output.record_schema()``

The CLI's driver streams the records (``iter_batches``) into the same outputs as the local engine
(JSONL, CSV, ``DIR/*.parquet``), after the same resume step, so a rerun skips what is written and a
killed driver loses only what was in flight. Records are those of the local engine, one per input.

Decoded images cross processes as uint8, a quarter of the float tensor. Model directory and local
input paths must be readable at the same absolute paths on every node (a shared file system), and
captioner must be installed there; inputs may also be URIs that pyarrow's file systems read
(``s3://``, ``gs://``, ``file://``, with their extras installed).

Sampling (``--sample --seed S``): each image samples from its own generator, seeded from S and the
image's index, its position among the inputs as the local engine numbers them (``indices``; for a
Dataset without an "index" column, a CRC-32 of its path), so the samples are the local engine's
whatever actor or batch the image lands in.

Ray is imported lazily: the default install and the local engine do not need it.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from captioner.api import Captioner, default_model_dir
from captioner.batch import Decoded, InputError, Output, Progress, Record, Summary, is_image_name
from captioner.checkpoint import read_info
from captioner.decoding import SearchOptions
from captioner.encoder import Preprocessing
from captioner.errors import ImageError, OptionError
from captioner.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageSource, load_image
from captioner.parquet_output import RAY_EXTRA, records_from_table, records_to_table

__all__ = ["RayPlan", "caption_dataset", "caption_paths", "records_of", "start_ray"]

logger = logging.getLogger(__name__)

# Decoding an image costs a few milliseconds of CPU, captioning it tens: each CPU actor leaves one CPU of
# its share of a node to the decode tasks.
SPARE_CPUS_PER_ACTOR = 1


def require_ray() -> ModuleType:
    """``ray`` with Ray Data, or an OptionError that names the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the submodule must be loaded for ray.data below
    except ImportError:
        raise OptionError(f"the Ray engine needs Ray Data: {RAY_EXTRA}") from None
    return ray


@dataclass(frozen=True)
class RayPlan:
    """How the captioning stage is laid out on the cluster.

    ``actors``: caption actors (None: one per ``gpus_per_actor`` GPUs in the cluster, or one per 8 CPUs,
    at least one, without GPUs). ``gpus_per_actor``: 0 captions on CPUs; a fraction packs several actors
    on a GPU. ``cpus_per_actor`` (None: 1 with GPUs, else the CPUs of a node divided among its share of
    actors, less one for decoding) also sets each CPU actor's torch threads. ``batch_size``: images per
    model call, and per decode task."""

    batch_size: int = 32
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise OptionError("the batch size and the number of actors must be at least 1")
        if self.gpus_per_actor < 0 or (self.cpus_per_actor is not None and self.cpus_per_actor <= 0):
            raise OptionError("GPUs per actor must be >= 0 and CPUs per actor > 0")

    def resolve(self, cluster_cpus: float, cluster_gpus: float, node_cpus: float) -> tuple[int, float]:
        """(actors, CPUs per actor) for a cluster with these totals and this largest node."""
        if self.gpus_per_actor > 0:
            if cluster_gpus < self.gpus_per_actor:
                raise OptionError(f"{self.gpus_per_actor} GPUs per actor, but the cluster has {cluster_gpus:g} GPUs")
            actors = self.actors or max(1, int(cluster_gpus // self.gpus_per_actor))
            return actors, self.cpus_per_actor or 1.0
        actors = self.actors or max(1, int(cluster_cpus // 8))
        nodes = max(1, round(cluster_cpus / max(node_cpus, 1)))
        actors_per_node = -(-actors // nodes)
        spare = max(1.0, node_cpus // actors_per_node - SPARE_CPUS_PER_ACTOR)
        return actors, self.cpus_per_actor or spare


def start_ray(address: str | None = None) -> float:
    """Join the cluster at ``address`` ("auto": the one this machine belongs to), or start a local Ray
    when None; nothing when this process is connected already. Returns the seconds it took."""
    ray = require_ray()
    if ray.is_initialized():
        return 0.0
    started = time.monotonic()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return time.monotonic() - started


# ------------------------------------------------------------------------------------------------ stages


def list_uris(uri: str, recursive: bool = False) -> list[str]:
    """The images a URI names, through pyarrow's file systems: the file itself, or a folder's images
    (by extension, as for local folders; ``recursive`` descends), as URIs of the same scheme, sorted."""
    from pyarrow import fs

    scheme = uri.split("://", 1)[0]
    try:
        filesystem, inner = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.File:
            return [uri]
        if info.type != fs.FileType.Directory:
            raise InputError(f"no such file or folder: {uri!r}")
        found = filesystem.get_file_info(fs.FileSelector(inner, recursive=recursive))
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise InputError(f"cannot list {uri!r}: {error}") from None
    names = (f"{scheme}://{entry.path}" for entry in found if entry.type == fs.FileType.File)
    return sorted(name for name in names if is_image_name(name.rsplit("/", 1)[-1]))


def _read_source(path: str, working_dir: str) -> ImageSource:
    """What ``load_image`` reads for a path: the file itself, or a URI's bytes through pyarrow's file
    systems (the ones Ray's readers use). A URI that cannot be read is an ``unreadable`` image."""
    if "://" not in path:
        return os.path.join(working_dir, path)  # relative paths are the driver's, not the worker's
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.readall()
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise ImageError(f"cannot read {path!r}: {error}", code="unreadable") from None


def _decode_batch(
    batch: dict[str, np.ndarray], preprocessing: Preprocessing, working_dir: str, max_pixels: int
) -> dict[str, np.ndarray]:
    """A decode task: paths (and bytes, when the dataset has them) -> uint8 pixels or error columns."""
    paths = [str(path) for path in batch["path"]]
    contents = batch.get("bytes")
    # The image's index seeds its samples (see the module's docstring).
    indices = batch["index"] if "index" in batch else np.array([zlib.crc32(p.encode()) for p in paths])
    size = preprocessing.image_size
    pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)  # a failed image's row stays black
    codes, messages = [""] * len(paths), [""] * len(paths)
    for row, path in enumerate(paths):
        try:
            source = bytes(contents[row]) if contents is not None else _read_source(path, working_dir)
            pixels[row] = preprocessing.resize(load_image(source, max_pixels=max_pixels, min_size=size))
        except ImageError as error:
            codes[row], messages[row] = error.code, error.message
    return {"path": np.array(paths, dtype=object), "index": indices.astype(np.int64), "pixels": pixels,
            "error_code": np.array(codes, dtype=object),
            "error_message": np.array(messages, dtype=object)}  # fmt: skip


class CaptionActor:
    """A caption actor: loads the model once, then captions batches of decoded rows into records."""

    def __init__(self, model_dir: str, search: dict[str, Any], seed: int | None, device: str, threads: int) -> None:
        from captioner.cli import _batch_captioner  # the local engine's batch -> records step, reused as is

        if device == "cpu":
            torch.set_num_threads(threads)
        self.captioner = Captioner.from_pretrained(model_dir, device=device)
        options = self.captioner.search_options(**search)
        self.input_index: dict[str, int] = {}  # the indices of the batch in hand, for per-image seeds
        self.caption_batch = _batch_captioner(self.captioner, options, seed, self.input_index, None, {})

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        paths = [str(path) for path in batch["path"]]
        self.input_index.clear()
        self.input_index.update(zip(paths, (int(index) for index in batch["index"]), strict=True))
        codes, messages = batch["error_code"], batch["error_message"]
        decoded = [row for row in range(len(paths)) if not codes[row]]
        records: list[Record] = [
            Record(path, error_code=str(code), error_message=str(message)) if code else Record(path)
            for path, code, message in zip(paths, codes, messages, strict=True)
        ]
        if decoded:
            tensors = self.captioner.info.preprocessing.normalise(batch["pixels"][decoded])  # (N, 3, S, S)
            items = [Decoded(paths[row], (tensor, None), None) for row, tensor in zip(decoded, tensors, strict=True)]
            for row, record in zip(decoded, self.caption_batch(items), strict=True):
                records[row] = record
        return records_to_table(records)


# ---------------------------------------------------------------------------------------------- pipeline


def caption_dataset(
    source: Sequence[str] | Any,
    model_dir: str | os.PathLike | None = None,
    *,
    search: dict[str, Any] | None = None,
    seed: int | None = None,
    plan: RayPlan | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    indices: Sequence[int] | None = None,
) -> Any:
    """A Ray Dataset of records, one per input: the columns of ``parquet_output.record_schema()``
    (``records_of`` turns a batch of it into ``Record``s). Lazy: nothing runs until it is consumed.

    ``source`` is a list of paths or URIs, or a Ray Dataset with a "path" column (and a "bytes" column to
    decode instead of reading the path, as ``ray.data.read_binary_files(..., include_paths=True)``
    gives). ``search`` holds the search options as ``Captioner.search_options`` takes them (None: the
    model's). ``indices`` numbers the paths for per-image seeds (default: their positions). Connects to
    Ray first if this process is not connected (``start_ray``)."""
    ray = require_ray()
    plan = plan or RayPlan()
    search = search or {}
    model_path = str(Path(model_dir).resolve()) if model_dir is not None else str(default_model_dir())
    info = read_info(model_path)  # the decode tasks need only the preprocessing, never the weights
    # The actors call Captioner.search_options; the same merge here refuses bad options before they start.
    SearchOptions(**{**info.decoding, **{name: value for name, value in search.items() if value is not None}})
    start_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False

    if isinstance(source, ray.data.Dataset):
        dataset = source
    else:
        paths = list(source)
        if not paths:
            raise OptionError("no inputs to caption")
        # One decode task per batch of paths: small blocks keep the stages streaming and bound what a kill loses.
        blocks = max(1, -(-len(paths) // plan.batch_size))
        numbers = list(indices) if indices is not None else list(range(len(paths)))
        rows = [{"path": path, "index": index} for path, index in zip(paths, numbers, strict=True)]
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)

    resources = ray.cluster_resources()
    node_cpus = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=1.0)
    actors, cpus_per_actor = plan.resolve(resources.get("CPU", 1.0), resources.get("GPU", 0.0), node_cpus)
    device = "cuda" if plan.gpus_per_actor > 0 else "cpu"
    decoded = dataset.map_batches(
        _decode_batch,
        batch_size=plan.batch_size,
        batch_format="numpy",
        fn_kwargs={"preprocessing": info.preprocessing, "working_dir": os.getcwd(), "max_pixels": max_pixels},
        num_cpus=1,
        # The most one image may cost the decoder, plus the batch's pixels. Being a resource the actors do
        # not ask for, it also keeps Ray from fusing decoding into them: decoding stays in CPU tasks.
        memory=DEFAULT_MAX_DECODE_BYTES + 2 * plan.batch_size * info.preprocessing.image_size**2 * 3,
    )
    return decoded.map_batches(
        CaptionActor,
        batch_size=plan.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model_dir": model_path,
            "search": search,
            "seed": seed,
            "device": device,
            "threads": max(1, int(cpus_per_actor)),
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=plan.gpus_per_actor or None,
    )


def records_of(batch: Any) -> list[Record]:
    """A batch of ``caption_dataset``'s output (a pyarrow Table) -> ``Record``s."""
    return records_from_table(batch)


def caption_paths(
    paths: Sequence[str],
    output: Output,
    progress: Progress,
    model_dir: str | os.PathLike | None = None,
    *,
    address: str | None = None,
    search: dict[str, Any] | None = None,
    seed: int | None = None,
    plan: RayPlan | None = None,
    indices: Sequence[int] | None = None,
) -> Summary:
    """Caption ``paths`` on Ray and write their records to ``output`` (already resumed) as they come.

    Records arrive in the order the actors finish, not input order. ``Summary.seconds`` counts from the
    first record's request, Ray's start-up included."""
    summary = Summary()
    started = time.monotonic()
    if paths:
        start_ray(address)
        dataset = caption_dataset(paths, model_dir, search=search, seed=seed, plan=plan, indices=indices)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            records = records_of(batch)
            output.write(records)
            progress.update(records)
            summary.count(records)
    summary.seconds = time.monotonic() - started
    return summary
