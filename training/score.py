"""Score generated captions against reference captions with the COCO caption metrics.

Usage::

    python -m training.score --results RESULTS.json --annotations CAPTIONS.json [--no-meteor]

``RESULTS.json`` is in the COCO result format, ``[{"image_id": ..., "caption": "..."}, ...]`` with one
caption per image; ``CAPTIONS.json`` is in the COCO captions format, whose ``annotations`` list holds
``{"image_id": ..., "caption": "..."}`` records, several per image. Both sides are tokenized the way
the model's training data is, and only the images in the results are scored, so a results file for a
test split can be scored against annotations covering every split. The scores are printed as one JSON
object; problems with the files are reported on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from captioner.vocab import tokenize
from training.metrics import ImageId, MetricError, compute_metrics

EXIT_BAD_INPUT = 2


def _load_json(path: Path) -> Any:
    """The parsed file, or a MetricError that names the file and says what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MetricError(f"{path}: cannot be read: {error}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MetricError(f"{path}: not valid JSON: {error}") from error


def _image_id(record: Any, path: Path, index: int, where: str) -> ImageId:
    """The record's image id, which must be an int or a string (COCO uses ints, Flickr file names)."""
    if not isinstance(record, dict):
        raise MetricError(f"{path}: {where}[{index}] must be an object, got {type(record).__name__}")
    if "image_id" not in record or "caption" not in record:
        raise MetricError(f"{path}: {where}[{index}] needs both 'image_id' and 'caption'")
    image_id = record["image_id"]
    # bool is an int subclass, but true/false as an id is certainly a mistake.
    if isinstance(image_id, bool) or not isinstance(image_id, int | str):
        raise MetricError(f"{path}: {where}[{index}] has image_id {image_id!r}; expected an integer or string")
    if not isinstance(record["caption"], str):
        raise MetricError(f"{path}: {where}[{index}] has a caption that is not a string")
    return image_id


def load_results(path: Path) -> dict[ImageId, list[str]]:
    """The tokenized caption of each image in a COCO result file; one caption per image."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise MetricError(f"{path}: a results file must be a JSON list of {{image_id, caption}} objects")
    if not data:
        raise MetricError(f"{path}: the results list is empty")
    candidates: dict[ImageId, list[str]] = {}
    for index, record in enumerate(data):
        image_id = _image_id(record, path, index, "results")
        if image_id in candidates:
            raise MetricError(f"{path}: image_id {image_id!r} appears more than once")
        candidates[image_id] = tokenize(record["caption"])
    return candidates


def load_references(path: Path) -> dict[ImageId, list[list[str]]]:
    """The tokenized reference captions of each image in a COCO captions file."""
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise MetricError(f"{path}: a captions file must be a JSON object with an 'annotations' list")
    references: dict[ImageId, list[list[str]]] = {}
    for index, record in enumerate(data["annotations"]):
        image_id = _image_id(record, path, index, "annotations")
        words = tokenize(record["caption"])
        if not words:
            # An empty reference would make recall and length-based terms meaningless.
            raise MetricError(f"{path}: annotations[{index}] (image_id {image_id!r}) has a caption with no words")
        references.setdefault(image_id, []).append(words)
    return references


def score_files(results_path: Path, annotations_path: Path, meteor: bool = True) -> dict[str, float]:
    """The metrics of the results file against the annotations of the same images."""
    candidates = load_results(results_path)
    all_references = load_references(annotations_path)
    unknown = [image_id for image_id in candidates if image_id not in all_references]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise MetricError(f"{results_path}: image_id {shown}{more} has no reference captions in {annotations_path}")
    references = {image_id: all_references[image_id] for image_id in candidates}
    return compute_metrics(candidates, references, meteor=meteor)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m training.score",
        description="Score captions with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as the COCO evaluation does.",
    )
    parser.add_argument("--results", type=Path, required=True, help="COCO result file: [{image_id, caption}]")
    parser.add_argument("--annotations", type=Path, required=True, help="COCO captions file with references")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR, which needs Java")
    args = parser.parse_args(argv)
    try:
        scores = score_files(args.results, args.annotations, meteor=not args.no_meteor)
    except MetricError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
