"""Caption data sets, read into one sample type whatever their file format.

Three formats are read:

* the Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``
  and the synthetic set's ``dataset.json``): ``images[]`` with ``filepath``/``filename``/``split`` and
  ``sentences[]`` holding ``tokens`` and ``raw``; ``restval`` counts as ``train``, as in Karpathy's split;
* raw COCO ``captions_*.json`` (``images`` + ``annotations``), whose split the caller names;
* Flickr8k's ``Flickr8k.token.txt`` with the split lists (``Flickr_8k.trainImages.txt`` and its dev and
  test siblings) beside it; dev is the validation split.

The image folder is always given apart from the annotation file, since the two are downloaded apart.

Bad data policy. A malformed annotation file raises :class:`DatasetError` naming the file and what is
wrong with it. So does an empty caption (nothing left after tokenization) or an image without captions:
either means the file is not what it claims to be, and training on it would quietly teach the model
to stop at once. Missing or unreadable images are not looked for here: the image pass
(``training.features``) decodes each image once, skips the ones that fail and counts them with a
warning naming the file, so a bad image never crashes a DataLoader worker.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError
from captioner.vocab import tokenize

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMATS = ("auto", "karpathy", "coco", "flickr8k")
# Karpathy's "restval" images are the COCO val2014 images left out of his val and test splits; every
# published model trained on them, so they join the training split.
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}
_FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# One line of Flickr8k.token.txt names an image "2258277193_586949ec62.jpg.1"; its other four captions
# use the plain name, so the stray suffix is a typo in the file.
_FLICKR_STRAY_SUFFIX = re.compile(r"^(.+\.jpg)\.\d+$")


class DatasetError(CaptionerError, ValueError):
    """An annotation file that cannot be used as it is; the message names the file and the fault."""

    code = "invalid_dataset"


@dataclass(frozen=True)
class ImageRecord:
    """One image and all its captions. ``captions`` are token lists; ``raw`` the original sentences."""

    image_id: str
    path: Path
    split: str
    captions: list[list[str]]
    raw: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def load_records(
    annotations: str | Path, images: str | Path, split: str | None = None, format: str = "auto"
) -> list[ImageRecord]:
    """Read any supported annotation file. ``split`` keeps one split (required for raw COCO files,
    which do not say theirs); ``format="auto"`` tells the format from the file."""
    annotations, images = Path(annotations), Path(images)
    if format not in FORMATS:
        raise DatasetError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if format == "auto":
        format = detect_format(annotations)
    if format == "flickr8k":
        records = read_flickr8k(annotations, images)
    elif format == "coco":
        if split is None:
            raise DatasetError(f"{annotations}: a raw COCO captions file does not name its split; pass one")
        return read_coco(annotations, images, split)
    else:
        records = read_karpathy(annotations, images)
    return records if split is None else [r for r in records if r.split == split]


def detect_format(annotations: Path) -> str:
    """``.txt`` is Flickr8k's token file; a JSON file with ``annotations`` is raw COCO, else Karpathy."""
    if annotations.suffix == ".txt":
        return "flickr8k"
    data = _read_json(annotations)
    return "coco" if "annotations" in data else "karpathy"


def read_karpathy(path: str | Path, images: str | Path) -> list[ImageRecord]:
    """A Karpathy split file; paths are ``images / filepath / filename``."""
    path, images = Path(path), Path(images)
    entries = _list_field(_read_json(path), "images", path)
    records = []
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        if not isinstance(entry, Mapping):
            raise DatasetError(f"{path}: {where} is not an object")
        filename = _string_field(entry, "filename", path, where)
        image_id = str(entry.get("cocoid", filename))
        split = _split(_string_field(entry, "split", path, where), path, where)
        raw, captions = [], []
        for s, sentence in enumerate(_list_field(entry, "sentences", path, where)):
            if not isinstance(sentence, Mapping):
                raise DatasetError(f"{path}: {where}.sentences[{s}] is not an object")
            text = sentence.get("raw", "")
            tokens = sentence.get("tokens")
            if tokens is None:
                tokens = tokenize(_text(text, path, f"{where}.sentences[{s}].raw"))
            elif not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DatasetError(f"{path}: {where}.sentences[{s}].tokens is not a list of strings")
            raw.append(str(text))
            captions.append([t.lower() for t in tokens])
        extra = {k: v for k, v in entry.items() if k not in ("filepath", "filename", "split", "sentences")}
        image_path = images / str(entry.get("filepath", "")) / filename
        records.append(_record(image_id, image_path, split, captions, raw, extra, path))
    return records


def read_coco(path: str | Path, images: str | Path, split: str) -> list[ImageRecord]:
    """A raw COCO captions file (``captions_train2014.json``...): every image gets ``split``; paths are
    ``images / file_name``. Images keep the file's order; captions keep their annotation order."""
    path, images = Path(path), Path(images)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    data = _read_json(path)
    raw_by_image: dict[Any, list[str]] = {}
    for index, annotation in enumerate(_list_field(data, "annotations", path)):
        where = f"annotations[{index}]"
        if not isinstance(annotation, Mapping) or "image_id" not in annotation:
            raise DatasetError(f"{path}: {where} is not an object with an image_id")
        text = _text(annotation.get("caption"), path, f"{where}.caption")
        raw_by_image.setdefault(annotation["image_id"], []).append(text)
    records = []
    for index, entry in enumerate(_list_field(data, "images", path)):
        where = f"images[{index}]"
        if not isinstance(entry, Mapping) or "id" not in entry:
            raise DatasetError(f"{path}: {where} is not an object with an id")
        filename = _string_field(entry, "file_name", path, where)
        raw = raw_by_image.pop(entry["id"], [])
        extra = {k: v for k, v in entry.items() if k not in ("id", "file_name")}
        captions = [tokenize(text) for text in raw]
        records.append(_record(str(entry["id"]), images / filename, split, captions, raw, extra, path))
    if raw_by_image:
        orphans = ", ".join(str(i) for i in list(raw_by_image)[:5])
        raise DatasetError(f"{path}: annotations refer to images that are not listed: {orphans}")
    return records


def read_flickr8k(token_file: str | Path, images: str | Path) -> list[ImageRecord]:
    """``Flickr8k.token.txt`` (``NAME.jpg#N<TAB>caption``) with the split lists found beside it.

    Images in no split list (92 of the 8,092 in the official release) are left out and counted.
    """
    token_file, images = Path(token_file), Path(images)
    split_of = _flickr8k_splits(token_file.parent)
    raw_by_image: dict[str, list[str]] = {}
    for number, line in enumerate(_read_lines(token_file), start=1):
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        name, hash_mark, _ = key.partition("#")
        if not tab or not hash_mark or not name:
            raise DatasetError(f"{token_file}:{number}: expected 'IMAGE.jpg#N<TAB>caption', got {line[:80]!r}")
        stray = _FLICKR_STRAY_SUFFIX.match(name)
        raw_by_image.setdefault(stray.group(1) if stray else name, []).append(text.strip())
    unsplit = [name for name in raw_by_image if name not in split_of]
    if unsplit:
        logger.info("%s: %d images are in no split list and are left out", token_file, len(unsplit))
    missing = [name for name in split_of if name not in raw_by_image]
    if missing:
        raise DatasetError(
            f"{token_file}: {len(missing)} images of the split lists have no captions, e.g. {missing[0]}"
        )
    return [
        _record(name, images / name, split_of[name], [tokenize(t) for t in raw], raw, {}, token_file)
        for name, raw in raw_by_image.items()
        if name in split_of
    ]


def cut_captions(records: Iterable[ImageRecord], max_length: int) -> tuple[list[ImageRecord], int]:
    """Cut captions to ``max_length`` words. Returns the records and how many captions were cut; the
    count is logged, since a large one means ``max_length`` is too small for the data."""
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    cut, result = 0, []
    for record in records:
        long = sum(len(c) > max_length for c in record.captions)
        if long:
            cut += long
            record = replace(record, captions=[c[:max_length] for c in record.captions])
        result.append(record)
    if cut:
        total = sum(len(r.captions) for r in result)
        logger.warning("cut %d of %d captions to %d words", cut, total, max_length)
    return result, cut


def split_counts(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Images per split, for logs and provenance."""
    return dict(Counter(r.split for r in records))


def _record(
    image_id: str,
    path: Path,
    split: str,
    captions: list[list[str]],
    raw: list[str],
    extra: dict[str, Any],
    source: Path,
) -> ImageRecord:
    if not captions:
        raise DatasetError(f"{source}: image {image_id} ({path.name}) has no captions")
    for k, caption in enumerate(captions):
        if not caption:
            raise DatasetError(f"{source}: caption {k} of image {image_id} ({path.name}) is empty")
    return ImageRecord(image_id, path, split, captions, raw, extra)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text") from None


def _flickr8k_splits(folder: Path) -> dict[str, str]:
    split_of: dict[str, str] = {}
    for split, name in _FLICKR8K_SPLIT_FILES.items():
        for line in _read_lines(folder / name):
            if line.strip():
                split_of[line.strip()] = split
    return split_of


def _list_field(data: Mapping, key: str, path: Path, where: str = "the top level") -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DatasetError(f"{path}: {where} has no list {key!r}")
    return value


def _string_field(data: Mapping, key: str, path: Path, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{path}: {where} has no string {key!r}")
    return value


def _text(value: object, path: Path, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{path}: {where} is not a string")
    return value


def _split(name: str, path: Path, where: str) -> str:
    try:
        return _SPLIT_ALIASES[name]
    except KeyError:
        raise DatasetError(f"{path}: {where} has unknown split {name!r}") from None
