"""Evaluate a model directory on the test (or any) split of a caption data set.

Usage::

    python -m training.evaluate --checkpoint MODEL_DIR --data ANNOTATIONS --images IMAGE_DIR \\
        [--format auto|karpathy|coco|flickr8k] [--split test] [--beam-size 3] [--max-length 20] \\
        [--batch-size 32] [--workers N] [--device auto] [--limit N] [--no-meteor] \\
        [--output metrics.json] [--results results.json]

Every image of the split is captioned in batches (images are decoded by DataLoader workers while the
model runs) and the best caption is scored against the image's references with the COCO caption
metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D. On the synthetic data set, whose image entries list
the objects drawn, the captions are also checked against that truth: ``object_accuracy`` (objects
named by colour and shape), ``relation_accuracy`` (stated relations that hold) and
``attention_grounding`` (colour and shape words whose attention peak lies on the object named); see
``training.scenes``. These three are the figures a synthetic-trained model is judged by, since the
n-gram metrics only measure agreement with five sentences of one template family.

Images that cannot be read are skipped, counted and named in a warning; the rest are still scored.
Bad input (missing checkpoint, malformed annotations, unknown split, METEOR requested without Java)
is reported as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from captioner.api import Captioner, CaptionResult
from captioner.decoding import SearchOptions
from captioner.errors import CaptionerError, OptionError
from captioner.vocab import tokenize
from training.datasets import FORMATS, DatasetError, ImageRecord, load_records
from training.features import image_loader
from training.metrics import MetricError, compute_metrics, dangling_fraction, find_meteor_jar
from training.scenes import SceneObject, score_scenes

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 1
SCENE_KEYS = ("object_accuracy", "relation_accuracy", "attention_grounding")
_NAMED_FAILURES = 20  # unreadable images named one by one in the log; the rest are only counted
_MAX_BATCH_SIZE = 4096


class EvaluationError(CaptionerError, ValueError):
    """An evaluation that cannot produce meaningful scores (no images, duplicate ids...)."""

    code = "invalid_evaluation"


@dataclass(frozen=True)
class Captioned:
    """The model's output for the images that could be read, and why the others could not.

    ``results`` holds the images in record order; ``failed`` maps an image id to the reason."""

    results: dict[str, CaptionResult]
    failed: dict[str, str]


def scene_entries(records: Sequence[ImageRecord]) -> dict[str, Mapping[str, Any]]:
    """The synthetic-scene entries (``objects``, ``width``, ``height``) of the records that have them.

    They are checked here, before any image is captioned, so a malformed entry stops the run at once
    rather than after the whole split has gone through the model.
    """
    entries: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if "objects" not in record.extra:
            continue
        entry = record.extra
        objects = entry["objects"]
        if not isinstance(objects, list):
            raise EvaluationError(f"image {record.image_id}: 'objects' is not a list")
        try:
            for obj in objects:
                SceneObject.from_json(obj)
        except ValueError as error:
            raise EvaluationError(f"image {record.image_id}: {error}") from None
        for key in ("width", "height"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvaluationError(f"image {record.image_id}: {key!r} must be a positive integer, got {value!r}")
        entries[record.image_id] = entry
    return entries


def caption_records(
    captioner: Captioner,
    records: Sequence[ImageRecord],
    beam_size: int = 3,
    max_length: int = 20,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
    decoding: Mapping[str, Any] | None = None,
) -> Captioned:
    """Caption every record's image with beam search, ``batch_size`` images per forward pass.
    ``decoding`` holds search settings that replace the model's own (``no_repeat_ngram_size``,
    ``repetition_penalty``, ``length_penalty``; None values keep the model's).

    Decoding and preprocessing run in ``workers`` DataLoader processes (0: in this process), which
    report an unreadable image instead of raising, so one bad file costs one image, not the run.
    """
    options = captioner.search_options(beam_size=beam_size, max_length=max_length, **(decoding or {}))
    if not 1 <= batch_size <= _MAX_BATCH_SIZE:
        raise OptionError(f"batch_size must lie in [1, {_MAX_BATCH_SIZE}]")
    if workers < 0:
        raise OptionError("workers must be >= 0")
    _check_unique(records)
    loader = image_loader(
        [r.path for r in records],
        captioner.info.preprocessing,
        batch_size,
        workers,
        pin_memory=captioner.device.type == "cuda",
    )
    results: dict[str, CaptionResult] = {}
    failed: dict[str, str] = {}
    for batch in tqdm(loader, desc="captioning", unit="batch", disable=not progress):
        for index, reason in batch.failures:
            record = records[index]
            failed[record.image_id] = reason
            if len(failed) <= _NAMED_FAILURES:
                logger.warning("skipping image %s (%s): %s", record.image_id, record.path, reason)
            elif len(failed) == _NAMED_FAILURES + 1:
                logger.warning("more images could not be read; only their number is reported from here on")
        if batch.pixels is None:
            continue
        pixels = batch.pixels.to(captioner.device, non_blocking=True)
        for index, result in zip(batch.indices, captioner.caption_pixels(pixels, options), strict=True):
            results[records[index].image_id] = result
    if failed:
        logger.warning("%d of %d images could not be read and were skipped", len(failed), len(records))
    # Batches arrive in order, but an image that failed leaves a gap; restore record order outright.
    ordered = {r.image_id: results[r.image_id] for r in records if r.image_id in results}
    return Captioned(ordered, failed)


def score_captions(
    records: Sequence[ImageRecord],
    candidates: Mapping[str, Sequence[str]],
    attention: Mapping[str, np.ndarray] | None = None,
    meteor: bool = True,
) -> dict[str, Any]:
    """Score one tokenized candidate per record against the record's references.

    Returns the COCO metrics under their COCO keys, ``dangling_endings`` (the share of captions that
    stop on a word no sentence ends with, see ``dangling_fraction``), ``images`` (how many were scored) and, when the
    records carry synthetic-scene entries, ``object_accuracy``, ``relation_accuracy`` and
    ``attention_grounding`` (``None`` where there was nothing to score, e.g. no relation stated or no
    ``attention`` given) with their raw counts under ``scene_counts``.
    """
    if not records:
        raise EvaluationError("there are no images to score")
    _check_unique(records)
    missing = [r.image_id for r in records if r.image_id not in candidates]
    if missing:
        raise EvaluationError(f"no candidate caption for image(s) {', '.join(missing[:5])}")
    references = {r.image_id: _references(r) for r in records}
    scores: dict[str, Any] = dict(
        compute_metrics({r.image_id: list(candidates[r.image_id]) for r in records}, references, meteor=meteor)
    )
    scores["dangling_endings"] = dangling_fraction([candidates[r.image_id] for r in records])
    entries = scene_entries(records)
    if entries:
        scene = score_scenes(
            (list(candidates[i]), None if attention is None else attention[i], entry) for i, entry in entries.items()
        )
        for key in SCENE_KEYS:
            scores[key] = scene.pop(key)
        scores["scene_counts"] = scene
    scores["images"] = len(records)
    return scores


def evaluate_model(
    captioner: Captioner,
    records: Sequence[ImageRecord],
    beam_size: int = 3,
    max_length: int = 20,
    batch_size: int = 32,
    meteor: bool = True,
    workers: int = 0,
    progress: bool = False,
    decoding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Caption ``records`` and score the captions: the dict of :func:`score_captions` plus ``skipped``,
    the number of images that could not be read. ``decoding`` as for :func:`caption_records`."""
    captioned = caption_records(captioner, records, beam_size, max_length, batch_size, workers, progress, decoding)
    return _score(records, captioned, meteor)


def results_file(records: Sequence[ImageRecord], captioned: Captioned) -> list[dict[str, Any]]:
    """The COCO result format, ``[{"image_id", "caption"}]``, one entry per captioned image.

    Numeric ids (COCO's) are written as integers, as in COCO's own annotation files, so the file can
    be scored against them directly (``python -m training.score``); other ids stay strings.
    """
    return [
        {"image_id": _coco_id(r.image_id), "caption": captioned.results[r.image_id].caption}
        for r in records
        if r.image_id in captioned.results
    ]


def format_table(scores: Mapping[str, Any]) -> str:
    """The scores as an aligned two-column table, with the raw counts behind the scene ratios."""
    n = scores.get("scene_counts", {})
    details = {
        "object_accuracy": f"{n.get('objects_named')}/{n.get('objects_total')} objects named",
        "relation_accuracy": f"{n.get('relations_correct')}/{n.get('relations_stated')} stated relations hold",
        "attention_grounding": f"{n.get('attention_hits')}/{n.get('attention_checked')} words on their object",
    }
    lines = [f"{'metric':<20} {'score':>8}", f"{'-' * 20} {'-' * 8}"]
    for key, value in scores.items():
        if key in ("images", "skipped", "scene_counts"):
            continue
        text = "n/a" if value is None else f"{value:.4f}"
        note = f"  ({details[key]})" if key in details else ""
        lines.append(f"{key:<20} {text:>8}{note}")
    lines.append(f"{'images':<20} {scores['images']:>8}")
    lines.append(f"{'skipped':<20} {scores.get('skipped', 0):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        scores, captioned, records, search = _run(args)
    except CaptionerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    output = {
        **scores,
        "skipped_images": [
            {"image_id": r.image_id, "path": str(r.path), "reason": captioned.failed[r.image_id]}
            for r in records
            if r.image_id in captioned.failed
        ],
        "settings": {
            "checkpoint": str(args.checkpoint),
            "data": str(args.data),
            "split": args.split,
            "beam_size": args.beam_size,
            "max_length": args.max_length,
            "length_penalty": search.length_penalty,
            "no_repeat_ngram_size": search.no_repeat_ngram_size,
            "repetition_penalty": search.repetition_penalty,
            "limit": args.limit,
        },
    }
    try:
        if args.output is not None:
            _write_json(args.output, output)
        if args.results is not None:
            _write_json(args.results, results_file(records, captioned))
    except OSError as error:
        print(f"error: cannot write {error.filename}: {error.strerror or error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    print(f"{args.checkpoint} on the {args.split} split of {args.data}")
    print(format_table(scores))
    return 0


def _run(args: argparse.Namespace) -> tuple[dict[str, Any], Captioned, list[ImageRecord], SearchOptions]:
    """Check everything cheap first (options, Java, data, checkpoint), then caption and score."""
    SearchOptions(beam_size=args.beam_size, max_length=args.max_length, **_decoding(args))
    if not 1 <= args.batch_size <= _MAX_BATCH_SIZE:
        raise OptionError(f"--batch-size must lie in [1, {_MAX_BATCH_SIZE}]")
    if args.workers < 0:
        raise OptionError("--workers must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise OptionError("--limit must be at least 1")
    if not args.no_meteor:
        _check_meteor()
    if not args.images.is_dir():
        raise DatasetError(f"image folder {args.images} does not exist")
    records = load_records(args.data, args.images, split=args.split, format=args.format)
    if not records:
        raise DatasetError(f"{args.data} has no images in the {args.split!r} split")
    records = records[: args.limit]
    try:
        scene_entries(records)
        _check_unique(records)
    except EvaluationError as error:
        raise DatasetError(f"{args.data}: {error}") from None
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    progress = sys.stderr.isatty()
    captioned = caption_records(
        captioner, records, args.beam_size, args.max_length, args.batch_size, args.workers, progress, _decoding(args)
    )
    scores = _score(records, captioned, not args.no_meteor)
    search = captioner.search_options(beam_size=args.beam_size, max_length=args.max_length, **_decoding(args))
    return scores, captioned, records, search


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    """The search settings given on the command line in place of the model's own."""
    given = {
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "repetition_penalty": args.repetition_penalty,
        "length_penalty": args.length_penalty,
    }
    return {name: value for name, value in given.items() if value is not None}


def _score(records: Sequence[ImageRecord], captioned: Captioned, meteor: bool) -> dict[str, Any]:
    readable = [r for r in records if r.image_id in captioned.results]
    if not readable:
        first = next(iter(captioned.failed.items()), None)
        reason = f" (e.g. image {first[0]}: {first[1]})" if first else ""
        raise EvaluationError(f"none of the {len(records)} images could be read{reason}")
    scores = score_captions(
        readable,
        {i: result.words for i, result in captioned.results.items()},
        {i: result.attention for i, result in captioned.results.items()},
        meteor=meteor,
    )
    scores["skipped"] = len(captioned.failed)
    return scores


def _references(record: ImageRecord) -> list[list[str]]:
    """The record's captions tokenized as the model's vocabulary is, so that punctuation or case left
    in an annotation file's tokens never costs the model a match."""
    references = [words for words in (tokenize(" ".join(caption)) for caption in record.captions) if words]
    if not references:
        raise EvaluationError(f"image {record.image_id} has no reference caption with words in it")
    return references


def _check_unique(records: Sequence[ImageRecord]) -> None:
    """Scores are keyed by image id; two records with one id would silently merge into one."""
    seen: set[str] = set()
    for record in records:
        if record.image_id in seen:
            raise EvaluationError(f"image id {record.image_id} appears more than once")
        seen.add(record.image_id)


def _check_meteor() -> None:
    """Fail before the model runs, not after, when METEOR is asked for but cannot be computed."""
    find_meteor_jar()
    if shutil.which("java") is None:
        raise MetricError("METEOR needs Java, which was not found on PATH; install it or pass --no-meteor")


def _coco_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() and str(int(image_id)) == image_id else image_id


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Caption a data set split with a model directory and score the captions "
        "(BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; object, relation and grounding accuracy on synthetic data).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="model directory")
    parser.add_argument("--data", type=Path, required=True, help="annotation file (Karpathy JSON, COCO JSON, Flickr8k)")
    parser.add_argument("--images", type=Path, required=True, help="image folder the annotation paths are relative to")
    parser.add_argument("--format", default="auto", help=f"annotation format: {', '.join(FORMATS)} (default: auto)")
    parser.add_argument("--split", default="test", help="split to evaluate: train, val or test (default: test)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20, help="most words per caption")
    parser.add_argument("--no-repeat-ngram-size", type=int, help="n-gram ban of the search (default: the model's)")
    parser.add_argument("--repetition-penalty", type=float, help="repetition penalty (default: the model's)")
    parser.add_argument("--length-penalty", type=float, help="score = log p / length**P (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes (0: none)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR, which needs Java")
    parser.add_argument("--output", type=Path, default=None, help="write the scores to this JSON file")
    parser.add_argument("--results", type=Path, default=None, help="write the captions as a COCO results file")
    return parser


if __name__ == "__main__":
    sys.exit(main())
