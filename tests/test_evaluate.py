"""Evaluation of a model directory on a data set split: captioning, scoring, output files, bad input."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.api import Captioner
from captioner.checkpoint import METADATA_FILE
from training.datasets import ImageRecord, load_records
from training.evaluate import (
    SCENE_KEYS,
    EvaluationError,
    caption_records,
    evaluate_model,
    format_table,
    main,
    score_captions,
)
from training.metrics import METRIC_KEYS
from training.scenes import SceneObject, parse_caption
from training.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
NO_METEOR_KEYS = tuple(k for k in METRIC_KEYS if k != "METEOR")
SWAPPED_COLOURS = {"red": "green", "green": "red", "blue": "yellow", "yellow": "blue"}
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which is not on PATH")


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic scenes, half of them in the test split; returns the folder holding dataset.json."""
    out = tmp_path_factory.mktemp("scenes")
    generate(out, 12, seed=7, test_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def all_records(scene_set: Path) -> list[ImageRecord]:
    return load_records(scene_set / "dataset.json", scene_set)


@pytest.fixture(scope="module")
def test_records(scene_set: Path) -> list[ImageRecord]:
    records = load_records(scene_set / "dataset.json", scene_set, split="test")
    assert len(records) >= 3, "the fixture should put several images in the test split"
    return records


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.from_pretrained(tiny_model_dir, device="cpu")


def _args(model: Path, data: Path, images: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(model), "--data", str(data), "--images", str(images), "--workers", "0", *extra]


def _repeated_bigrams(words: list[str]) -> int:
    bigrams = [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    return len(bigrams) - len(set(bigrams))


def _ratio_ok(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


# ------------------------------------------------------------------------------------------ end to end


def test_cli_end_to_end_writes_metrics_results_and_table(
    tiny_model_dir: Path, scene_set: Path, test_records: list[ImageRecord], tmp_path: Path
) -> None:
    metrics_path, results_path = tmp_path / "out" / "metrics.json", tmp_path / "results.json"
    command = [sys.executable, "-m", "training.evaluate"]
    command += _args(tiny_model_dir, scene_set / "dataset.json", scene_set, "--no-meteor", "--batch-size", "4")
    command += ["--workers", "1", "--output", str(metrics_path), "--results", str(results_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    for key in NO_METEOR_KEYS:
        assert isinstance(metrics[key], float) and metrics[key] >= 0.0, key
    assert "METEOR" not in metrics
    assert metrics["images"] == len(test_records) and metrics["skipped"] == 0
    # object accuracy always has objects to check; the other two may have nothing to score with a
    # random model, which must then be reported as null, not as a made-up number.
    assert _ratio_ok(metrics["object_accuracy"])
    counts = metrics["scene_counts"]
    assert counts["objects_total"] == sum(len(r.extra["objects"]) for r in test_records)
    assert (metrics["relation_accuracy"] is None) == (counts["relations_stated"] == 0)
    assert (metrics["attention_grounding"] is None) == (counts["attention_checked"] == 0)
    for key in ("relation_accuracy", "attention_grounding"):
        assert metrics[key] is None or _ratio_ok(metrics[key])
    assert metrics["settings"]["split"] == "test"

    results = json.loads(results_path.read_text(encoding="utf-8"))
    # Synthetic ids are COCO-style integers, and the results file keeps them as integers.
    assert [entry["image_id"] for entry in results] == [int(r.image_id) for r in test_records]
    assert all(isinstance(entry["caption"], str) for entry in results)

    for key in (*NO_METEOR_KEYS, *SCENE_KEYS):
        assert key in done.stdout
    assert f"{metrics['Bleu_1']:.4f}" in done.stdout


def test_decoding_settings_reach_the_search(
    captioner: Captioner, test_records: list[ImageRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = test_records[:3]
    plain = caption_records(captioner, records, beam_size=1, max_length=20)
    assert all(_repeated_bigrams(r.words) > 0 for r in plain.results.values()), "the test needs repeated bigrams"
    banned = caption_records(captioner, records, beam_size=1, max_length=20, decoding={"no_repeat_ngram_size": 2})
    assert all(_repeated_bigrams(r.words) == 0 for r in banned.results.values())

    seen: list[tuple[object, list[list[str]]]] = []
    original = captioner.caption_pixels

    def spy(pixels, options, generator=None):  # noqa: ANN001, ANN202
        results = original(pixels, options, generator)
        seen.append((options, [r.words for r in results]))
        return results

    monkeypatch.setattr(captioner, "caption_pixels", spy)
    decoding = {"no_repeat_ngram_size": 2, "repetition_penalty": 1.5, "length_penalty": 0.5}
    scores = evaluate_model(captioner, records, beam_size=1, max_length=20, meteor=False, decoding=decoding)
    assert scores["images"] == len(records) and seen
    for options, words in seen:
        assert (options.no_repeat_ngram_size, options.repetition_penalty, options.length_penalty) == (2, 1.5, 0.5)
        assert all(_repeated_bigrams(w) == 0 for w in words)
    untouched = evaluate_model(captioner, records, beam_size=1, max_length=20, meteor=False)
    assert untouched["Bleu_1"] != scores["Bleu_1"] or untouched["CIDEr"] != scores["CIDEr"]


def test_cli_records_the_effective_decoding_settings(
    tiny_model_dir: Path, scene_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tuned = tmp_path / "tuned"  # the same weights, with decoding settings of its own
    shutil.copytree(tiny_model_dir, tuned)
    metadata = json.loads((tuned / METADATA_FILE).read_text())
    metadata["decoding"] = {"no_repeat_ngram_size": 3, "repetition_penalty": 1.5}
    (tuned / METADATA_FILE).write_text(json.dumps(metadata))
    output = tmp_path / "metrics.json"
    data = scene_set / "dataset.json"

    def effective(model: Path, *options: str) -> tuple:
        args = _args(model, data, scene_set, "--no-meteor", "--limit", "2", "--beam-size", "1", *options)
        assert main([*args, "--output", str(output)]) == 0, capsys.readouterr().err
        settings = json.loads(output.read_text(encoding="utf-8"))["settings"]
        return settings["no_repeat_ngram_size"], settings["repetition_penalty"], settings["length_penalty"]

    # given on the command line, else the model's own, else the search's default
    assert effective(tuned, "--no-repeat-ngram-size", "2") == (2, 1.5, 1.0)
    assert effective(tuned) == (3, 1.5, 1.0)
    assert effective(tiny_model_dir, "--length-penalty", "0.5") == (0, 1.0, 0.5)


@needs_java
def test_meteor_is_reported_when_java_is_present(tiny_model_dir: Path, scene_set: Path, tmp_path: Path) -> None:
    metrics_path = tmp_path / "metrics.json"
    args = _args(tiny_model_dir, scene_set / "dataset.json", scene_set, "--limit", "2", "--output", str(metrics_path))
    assert main(args) == 0
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    assert list(metrics)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert _ratio_ok(metrics["METEOR"])
    assert metrics["images"] == 2


def test_unreadable_images_are_skipped_counted_and_named(
    captioner: Captioner, test_records: list[ImageRecord], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    records = list(test_records[:3])  # one readable image is enough, and keeps the test fast
    records[1] = ImageRecord(
        records[1].image_id, broken, records[1].split, records[1].captions, records[1].raw, records[1].extra
    )
    records[2] = ImageRecord(
        records[2].image_id, tmp_path / "gone.jpg", records[2].split, records[2].captions, records[2].raw, {}
    )
    with caplog.at_level(logging.WARNING, logger="training.evaluate"):
        scores = evaluate_model(captioner, records, beam_size=2, max_length=8, batch_size=2, meteor=False)
    assert scores["skipped"] == 2
    assert scores["images"] == len(records) - 2
    assert "broken.jpg" in caplog.text and "gone.jpg" in caplog.text
    # The skipped images take no part in the scene scores either.
    assert scores["scene_counts"]["captions"] == len(records) - 2


def test_every_image_unreadable_is_an_error(captioner: Captioner, test_records: list[ImageRecord]) -> None:
    records = [
        ImageRecord(r.image_id, Path("no/such/image.jpg"), r.split, r.captions, r.raw, r.extra) for r in test_records
    ]
    with pytest.raises(EvaluationError, match="none of the"):
        evaluate_model(captioner, records, meteor=False)


# ----------------------------------------------------------------------------------------------- scoring


def _reference_candidates(records: list[ImageRecord]) -> dict[str, list[str]]:
    """One reference per image, preferring one that states a relation so relations get checked too."""
    chosen = {}
    for record in records:
        stating = [c for c in record.captions if parse_caption(c).relations]
        chosen[record.image_id] = (stating or record.captions)[0]
    return chosen


def _peaked_attention(words: list[str], point: tuple[float, float], image_size: int, grid: int = 7) -> np.ndarray:
    """Attention maps that all peak on the grid cell holding ``point``."""
    maps = np.full((len(words), grid, grid), 0.1 / (grid * grid - 1))
    col, row = (min(grid - 1, int(c * grid / image_size)) for c in point)
    maps[:, row, col] = 0.9
    return maps


def test_reference_captions_score_perfectly(all_records: list[ImageRecord]) -> None:
    candidates = _reference_candidates(all_records)
    scores = score_captions(all_records, candidates, meteor=False)
    assert scores["object_accuracy"] == 1.0
    assert scores["scene_counts"]["relations_stated"] > 0
    assert scores["relation_accuracy"] == 1.0
    assert scores["attention_grounding"] is None  # no attention maps were given
    assert scores["Bleu_4"] > 0.95
    assert scores["images"] == len(all_records)


def test_swapped_colours_lower_object_accuracy(all_records: list[ImageRecord]) -> None:
    perfect = score_captions(all_records, _reference_candidates(all_records), meteor=False)
    swapped = {
        image_id: [SWAPPED_COLOURS.get(word, word) for word in words]
        for image_id, words in _reference_candidates(all_records).items()
    }
    scores = score_captions(all_records, swapped, meteor=False)
    assert scores["object_accuracy"] < 1.0
    assert scores["Bleu_4"] < perfect["Bleu_4"]


def test_attention_grounding_follows_where_the_maps_peak(all_records: list[ImageRecord]) -> None:
    single = [r for r in all_records if len(r.extra["objects"]) == 1]
    assert single, "the fixture should hold a scene with a single object"
    candidates = {r.image_id: r.captions[0] for r in single}
    on_object, off_object = {}, {}
    for record in single:
        obj = SceneObject.from_json(record.extra["objects"][0])
        size = record.extra["width"]
        words = candidates[record.image_id]
        on_object[record.image_id] = _peaked_attention(words, obj.centre, size)
        # The image corner farthest from the object's centre: a cell there never lies on the object.
        far = tuple(0.0 if c > size / 2 else size - 1.0 for c in obj.centre)
        off_object[record.image_id] = _peaked_attention(words, far, size)
    assert score_captions(single, candidates, on_object, meteor=False)["attention_grounding"] == 1.0
    assert score_captions(single, candidates, off_object, meteor=False)["attention_grounding"] == 0.0


def test_scoring_needs_a_candidate_for_every_image(all_records: list[ImageRecord]) -> None:
    candidates = _reference_candidates(all_records)
    del candidates[all_records[0].image_id]
    with pytest.raises(EvaluationError, match=all_records[0].image_id):
        score_captions(all_records, candidates, meteor=False)


def test_table_shows_missing_ratios_as_not_available() -> None:
    table = format_table({"Bleu_1": 0.5, "relation_accuracy": None, "images": 3, "skipped": 1})
    assert "0.5000" in table
    assert any(line.startswith("relation_accuracy") and "n/a" in line for line in table.splitlines())


# --------------------------------------------------------------------------------------------- bad input


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run main, expect exit 2 and return its single stderr line."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_missing_checkpoint_is_named(scene_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-model"
    err = _fails(_args(missing, scene_set / "dataset.json", scene_set, "--no-meteor"), capsys)
    assert str(missing) in err


def test_unknown_split_is_refused(tiny_model_dir: Path, scene_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails(
        _args(tiny_model_dir, scene_set / "dataset.json", scene_set, "--split", "holdout", "--no-meteor"), capsys
    )
    assert "holdout" in err


def test_empty_split_names_the_file(
    tiny_model_dir: Path, scene_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads((scene_set / "dataset.json").read_text(encoding="utf-8"))
    for entry in data["images"]:
        entry["split"] = "train"
    train_only = tmp_path / "train_only.json"
    train_only.write_text(json.dumps(data), encoding="utf-8")
    err = _fails(_args(tiny_model_dir, train_only, scene_set, "--no-meteor"), capsys)
    assert str(train_only) in err and "test" in err


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}),  # no sentences
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "images",
                        "filename": "scene_000000.jpg",
                        "split": "test",
                        "sentences": [{"tokens": ["a", "red", "circle"]}],
                        "objects": [{"shape": "hexagon", "color": "red", "size": "small", "bbox": [0, 0, 9, 9]}],
                        "width": 224,
                        "height": 224,
                    }
                ]
            }
        ),
    ],
    ids=["invalid-json", "no-sentences", "unknown-shape"],
)
def test_malformed_annotations_name_the_file(
    content: str, tiny_model_dir: Path, scene_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    err = _fails(_args(tiny_model_dir, bad, scene_set, "--no-meteor"), capsys)
    assert str(bad) in err


def test_missing_java_is_reported_before_captioning(
    tiny_model_dir: Path, scene_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java on PATH
    err = _fails(_args(tiny_model_dir, scene_set / "dataset.json", scene_set), capsys)
    assert "Java" in err and "--no-meteor" in err


@pytest.mark.parametrize(
    "option",
    [
        ["--beam-size", "0"],
        ["--batch-size", "0"],
        ["--limit", "0"],
        ["--workers", "-1"],
        ["--no-repeat-ngram-size", "-1"],
        ["--repetition-penalty", "0.5"],
        ["--length-penalty", "-1"],
    ],
)
def test_bad_options_are_refused(
    option: list[str], tiny_model_dir: Path, scene_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails(_args(tiny_model_dir, scene_set / "dataset.json", scene_set, "--no-meteor", *option), capsys)
