"""The annotation readers: Karpathy JSON, raw COCO JSON and Flickr8k text, and their error messages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from training.datasets import (
    DatasetError,
    ImageRecord,
    cut_captions,
    detect_format,
    load_records,
    read_coco,
    read_flickr8k,
    read_karpathy,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    return Path(os.environ.get("CAPTIONER_SHARED") or REPO_ROOT.parent / "shared")


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def karpathy_entry(filename: str, split: str, sentences: list[dict], **extra: object) -> dict:
    return {"filepath": "imgs", "filename": filename, "split": split, "sentences": sentences, **extra}


def test_karpathy_reader_reads_splits_tokens_paths_and_extra_fields(tmp_path: Path) -> None:
    data = {
        "images": [
            karpathy_entry("a.jpg", "train", [{"tokens": ["a", "Dog"], "raw": "A dog."}], cocoid=7, objects=[1]),
            karpathy_entry("b.jpg", "restval", [{"raw": "Two cats, sleeping!"}]),
            karpathy_entry("c.jpg", "val", [{"tokens": ["x"], "raw": "x"}, {"tokens": ["y", "z"], "raw": "y z"}]),
            karpathy_entry("d.jpg", "test", [{"tokens": ["w"], "raw": "w"}]),
        ]
    }
    records = read_karpathy(write_json(tmp_path / "dataset.json", data), tmp_path / "root")
    assert [r.split for r in records] == ["train", "train", "val", "test"]  # restval joins train
    first, second, third = records[:3]
    assert first.image_id == "7" and second.image_id == "b.jpg"  # cocoid when present, else the file name
    assert first.path == tmp_path / "root" / "imgs" / "a.jpg"
    assert first.captions == [["a", "dog"]] and first.raw == ["A dog."]
    assert first.extra["objects"] == [1]
    assert second.captions == [["two", "cats", "sleeping"]]  # no tokens: the raw sentence is tokenized
    assert third.captions == [["x"], ["y", "z"]]


def test_load_records_detects_the_format_and_filters_a_split(tmp_path: Path) -> None:
    karpathy = write_json(
        tmp_path / "k.json",
        {"images": [karpathy_entry("a.jpg", "train", [{"raw": "a"}]), karpathy_entry("b.jpg", "val", [{"raw": "b"}])]},
    )
    coco = write_json(tmp_path / "c.json", {"images": [], "annotations": []})
    assert detect_format(karpathy) == "karpathy"
    assert detect_format(coco) == "coco"
    assert detect_format(tmp_path / "Flickr8k.token.txt") == "flickr8k"
    assert [r.path.name for r in load_records(karpathy, tmp_path, split="val")] == ["b.jpg"]
    with pytest.raises(DatasetError, match="does not name its split"):
        load_records(coco, tmp_path)
    with pytest.raises(DatasetError, match="unknown split"):
        load_records(karpathy, tmp_path, split="training")


def test_coco_reader_groups_annotations_under_their_images(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 42, "file_name": "COCO_val2014_42.jpg", "height": 5}, {"id": 3, "file_name": "three.jpg"}],
        "annotations": [
            {"image_id": 3, "id": 1, "caption": "A man riding a horse."},
            {"image_id": 42, "id": 2, "caption": "Some Food on a plate"},
            {"image_id": 3, "id": 3, "caption": "a horse and its rider"},
        ],
    }
    records = read_coco(write_json(tmp_path / "captions_val2014.json", data), tmp_path / "val2014", "val")
    assert [(r.image_id, r.split) for r in records] == [("42", "val"), ("3", "val")]
    assert records[0].path == tmp_path / "val2014" / "COCO_val2014_42.jpg"
    assert records[0].extra == {"height": 5}
    assert records[1].captions == [["a", "man", "riding", "a", "horse"], ["a", "horse", "and", "its", "rider"]]


def test_coco_reader_refuses_annotations_of_unlisted_images(tmp_path: Path) -> None:
    data = {"images": [], "annotations": [{"image_id": 9, "caption": "a cat"}]}
    path = write_json(tmp_path / "captions.json", data)
    with pytest.raises(DatasetError, match=r"captions\.json.*not listed: 9"):
        read_coco(path, tmp_path, "train")


def write_flickr8k(folder: Path, lines: list[str], splits: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    token_file = folder / "Flickr8k.token.txt"
    token_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for split, file_name in names.items():
        (folder / file_name).write_text("\n".join(splits.get(split, [])) + "\n", encoding="utf-8")
    return token_file


def test_flickr8k_reader_uses_the_split_lists(tmp_path: Path) -> None:
    lines = [
        "1.jpg#0\tA dog runs .",
        "1.jpg#1\tThe dog is running",
        "2.jpg.1#0\tPeople wait",  # the release's typo: the same image as "2.jpg"
        "2.jpg#1\tpeople waiting for a train",
        "3.jpg#0\tA child .",
        "4.jpg#0\tIn no split list",
    ]
    token_file = write_flickr8k(tmp_path / "text", lines, {"train": ["1.jpg"], "val": ["2.jpg"], "test": ["3.jpg"]})
    records = read_flickr8k(token_file, tmp_path / "Flicker8k_Dataset")
    by_id = {r.image_id: r for r in records}
    assert sorted(by_id) == ["1.jpg", "2.jpg", "3.jpg"]
    assert by_id["1.jpg"].captions == [["a", "dog", "runs"], ["the", "dog", "is", "running"]]
    assert by_id["2.jpg"].split == "val" and len(by_id["2.jpg"].captions) == 2
    assert by_id["3.jpg"].path == tmp_path / "Flicker8k_Dataset" / "3.jpg"


def test_flickr8k_reader_names_the_file_and_line_of_a_malformed_line(tmp_path: Path) -> None:
    token_file = write_flickr8k(tmp_path, ["1.jpg#0\ta dog", "no tab on this line"], {"train": ["1.jpg"]})
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt:2"):
        read_flickr8k(token_file, tmp_path)


def test_flickr8k_reader_reports_a_missing_split_list(tmp_path: Path) -> None:
    token_file = write_flickr8k(tmp_path, ["1.jpg#0\ta dog"], {"train": ["1.jpg"]})
    (tmp_path / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DatasetError, match=r"cannot read .*Flickr_8k\.devImages\.txt"):
        read_flickr8k(token_file, tmp_path)


def test_real_flickr8k_captions() -> None:
    folder = _shared() / "data" / "flickr8k"
    if not (folder / "Flickr8k.token.txt").is_file():
        pytest.skip(f"the real Flickr8k captions are not at {folder} (set CAPTIONER_SHARED)")
    records = read_flickr8k(folder / "Flickr8k.token.txt", folder / "images")
    counts = {split: sum(r.split == split for r in records) for split in ("train", "val", "test")}
    assert counts == {"train": 6000, "val": 1000, "test": 1000}  # the published split sizes
    assert all(len(r.captions) == 5 for r in records)
    words = {w for r in records for c in r.captions for w in c}
    assert "dog" in words and all(w == w.lower() and "." not in w and "," not in w for w in words)
    assert len({r.image_id for r in records}) == len(records)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"images": 5}', "has no list 'images'"),
        ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": 3}]}', r"images\[0\] has no list"),
        ('{"images": [{"filename": "a.jpg", "sentences": []}]}', r"images\[0\] has no string 'split'"),
        ('{"images": [{"filename": "a.jpg", "split": "holdout", "sentences": []}]}', "unknown split 'holdout'"),
        ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": "a b"}]}]}', "not a list"),
    ],
)
def test_malformed_annotation_files_raise_an_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broken_dataset.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as caught:
        load_records(path, tmp_path)
    assert "broken_dataset.json" in str(caught.value)


def test_a_missing_annotation_file_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read .*nowhere.json"):
        read_karpathy(tmp_path / "nowhere.json", tmp_path)


def test_an_empty_caption_is_an_error_naming_the_file_and_image(tmp_path: Path) -> None:
    sentences = [{"raw": "a cat"}, {"raw": " ?! "}]  # nothing is left of the second after tokenization
    path = write_json(tmp_path / "d.json", {"images": [karpathy_entry("cat.jpg", "train", sentences, cocoid=5)]})
    with pytest.raises(DatasetError, match=r"d\.json: caption 1 of image 5 \(cat\.jpg\) is empty"):
        read_karpathy(path, tmp_path)
    coco = {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "caption": ""}]}
    with pytest.raises(DatasetError, match=r"c\.json: caption 0 of image 1 \(x\.jpg\) is empty"):
        read_coco(write_json(tmp_path / "c.json", coco), tmp_path, "train")


def test_an_image_without_captions_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", {"images": [karpathy_entry("lonely.jpg", "val", [])]})
    with pytest.raises(DatasetError, match=r"lonely\.jpg\) has no captions"):
        read_karpathy(path, tmp_path)


def test_long_captions_are_cut_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    short = ImageRecord("1", Path("1.jpg"), "train", [["a", "b"]], ["a b"])
    long = ImageRecord("2", Path("2.jpg"), "train", [list("abcdef"), ["x"], list("abcd")], ["..."] * 3)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        records, cut = cut_captions([short, long], max_length=3)
    assert cut == 2
    assert records[0] is short  # untouched records are not copied
    assert records[1].captions == [["a", "b", "c"], ["x"], ["a", "b", "c"]]
    assert long.captions[0] == list("abcdef")  # the input is not modified
    assert "cut 2 of 4 captions to 3 words" in caplog.text
