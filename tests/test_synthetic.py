"""The synthetic scenes generator and the metrics that score captions against a scene's truth."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.vocab import tokenize
from training.scenes import (
    INVERSE_RELATION,
    SceneObject,
    attention_grounding,
    is_clear,
    object_accuracy,
    parse_caption,
    relation_accuracy,
    relation_between,
    score_scenes,
)
from training.synthetic import (
    MAX_CAPTION_WORDS,
    assign_split,
    captions_for,
    generate,
    main,
    make_scene,
    render,
)

REPO = Path(__file__).resolve().parents[1]
NOMINAL = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 200, 30)}


def _scenes(count: int, image_size: int = 224, seed: int = 0):
    pairs = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        scene = make_scene(rng, image_size)
        pairs.append((scene, captions_for(scene, rng)))
    return pairs


@pytest.fixture(scope="module")
def scenes():
    return _scenes(400)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_set")
    return generate(out, 12, seed=5, image_size=96)


def _files(folder: Path) -> dict[str, bytes]:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in files}


# --- determinism and splits -------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    first = _files(generate(tmp_path / "a", 8, seed=7, image_size=96).parent)
    second = _files(generate(tmp_path / "b", 8, seed=7, image_size=96).parent)
    other = _files(generate(tmp_path / "c", 8, seed=8, image_size=96).parent)
    assert len(first) == 9  # 8 images and dataset.json
    assert first == second
    assert first["dataset.json"] != other["dataset.json"]
    assert all(first[name] != other[name] for name in first if name.endswith(".jpg"))


def test_in_memory_scenes_are_deterministic():
    assert _scenes(20, seed=3) == _scenes(20, seed=3)
    assert _scenes(20, seed=3) != _scenes(20, seed=4)


def test_an_image_and_its_split_do_not_depend_on_the_count(tmp_path):
    short = generate(tmp_path / "short", 5, seed=2, image_size=64)
    long = generate(tmp_path / "long", 9, seed=2, image_size=64)
    short_entries = json.loads(short.read_text())["images"]
    long_entries = json.loads(long.read_text())["images"]
    assert short_entries == long_entries[:5]
    for entry in short_entries:
        name = entry["filename"]
        assert (short.parent / "images" / name).read_bytes() == (long.parent / "images" / name).read_bytes()


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.1), (0.2, 0.05), (0.0, 0.3), (0.0, 0.0)])
def test_split_fractions_are_met(val, test):
    splits = Counter(assign_split(i, 11, val, test) for i in range(1000))
    assert abs(splits["val"] - 1000 * val) <= 3
    assert abs(splits["test"] - 1000 * test) <= 3
    assert splits["train"] + splits["val"] + splits["test"] == 1000


def test_split_membership_depends_on_the_seed():
    def members(seed: int) -> set[int]:
        return {i for i in range(500) if assign_split(i, seed, 0.1, 0.1) == "test"}

    assert members(0) == members(0)
    assert members(0) != members(1)


def test_generated_splits_follow_assign_split(tmp_path):
    path = generate(tmp_path, 30, seed=4, image_size=64, val_fraction=0.2, test_fraction=0.2)
    entries = json.loads(path.read_text())["images"]
    assert [e["split"] for e in entries] == [assign_split(i, 4, 0.2, 0.2) for i in range(30)]
    assert {e["split"] for e in entries} == {"train", "val", "test"}


# --- the data set format ----------------------------------------------------------------------


def test_dataset_follows_the_karpathy_format(small_set):
    data = json.loads(small_set.read_text())
    assert data["dataset"] == "synthetic"
    entries = data["images"]
    assert [e["imgid"] for e in entries] == list(range(12))
    all_sentids = [sid for e in entries for sid in e["sentids"]]
    assert len(all_sentids) == len(set(all_sentids)) == 12 * 5
    for entry in entries:
        image = Image.open(small_set.parent / entry["filepath"] / entry["filename"])
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (entry["width"], entry["height"]) == (96, 96)
        assert entry["split"] in ("train", "val", "test")
        assert [s["sentid"] for s in entry["sentences"]] == entry["sentids"]
        for sentence in entry["sentences"]:
            assert sentence["tokens"] == tokenize(sentence["raw"])
            assert sentence["imgid"] == entry["imgid"]
        objects = [SceneObject.from_json(o) for o in entry["objects"]]
        assert 1 <= len(objects) <= 3
        if entry["relation"] is not None:
            rel = entry["relation"]
            assert relation_between(objects[rel["subject"]], objects[rel["object"]]) == rel["relation"]


# --- scenes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 224, 448])
def test_objects_lie_inside_the_image_apart_and_at_their_size(image_size):
    scale = image_size / 224
    for scene, _ in _scenes(150, image_size=image_size, seed=9):
        boxes = [o.bbox for o in scene.objects]
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            assert x >= 0 and y >= 0 and x + w <= image_size and y + h <= image_size
            low, high = (40, 56) if obj.size == "small" else (80, 100)
            assert low * scale - 1 <= w <= high * scale + 1 and w == h
        for i, (ax, ay, aw, ah) in enumerate(boxes):
            for bx, by, bw, bh in boxes[i + 1 :]:
                gap = max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh))
                assert gap >= max(2, round(8 * scale))


def test_the_domain_is_covered(scenes):
    objects = [o for scene, _ in scenes for o in scene.objects]
    assert {o.colour for o in objects} == set(NOMINAL)
    assert {o.shape for o in objects} == {"circle", "square", "triangle"}
    assert {o.size for o in objects} == {"small", "large"}
    assert {len(scene.objects) for scene, _ in scenes} == {1, 2, 3}
    relations = Counter(scene.relation.relation for scene, _ in scenes if scene.relation)
    assert set(relations) == {"left of", "right of", "above", "below"}
    words = Counter(w for _, captions in scenes for c in captions for w in tokenize(c))
    assert words["two"] > 0 and words["three"] > 0
    # A small vocabulary is the point of the domain: the decoder should learn it from few images.
    assert len(words) < 60


def test_relations_agree_with_the_boxes_and_are_clear(scenes):
    for scene, _ in scenes:
        if scene.relation is None:
            continue
        subject, obj = scene.objects[scene.relation.subject], scene.objects[scene.relation.object]
        assert relation_between(subject, obj) == scene.relation.relation
        assert is_clear(subject, obj)


def test_two_objects_that_captions_can_tell_apart_always_have_a_relation(scenes):
    for scene, _ in scenes:
        kinds = {(o.size, o.colour, o.shape) for o in scene.objects}
        if len(scene.objects) == 2 and len(kinds) == 2:
            assert scene.relation is not None


def test_rendered_objects_and_background_have_their_colours():
    for scene, _ in _scenes(60, seed=1):
        image = render(scene)
        assert image.size == (224, 224) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.int32)
        references = {**NOMINAL, "background": scene.background}
        for obj in scene.objects:
            cx, cy = obj.centre
            assert _nearest(pixels[int(cy), int(cx)], references) == obj.colour
        assert _nearest(pixels[0, 0], references) == "background"
        assert _nearest(pixels[223, 223], references) == "background"


def _nearest(colour: np.ndarray, references: dict[str, tuple[int, int, int]]) -> str:
    return min(references, key=lambda name: int(np.sum((colour - np.asarray(references[name])) ** 2)))


# --- captions ---------------------------------------------------------------------------------


def test_ground_truth_captions_score_perfectly(scenes):
    for scene, captions in scenes:
        n = len(scene.objects)
        stating = 0
        for caption in captions:
            words = tokenize(caption)
            assert object_accuracy(words, scene.objects) == (n, n), caption
            correct, stated = relation_accuracy(words, scene.objects)
            assert correct == stated, caption
            stating += stated > 0
        assert stating == (len(captions) if scene.relation is not None else 0), captions


def test_captions_state_the_stored_relation(scenes):
    for scene, captions in scenes:
        if scene.relation is None:
            continue
        subject, obj = scene.objects[scene.relation.subject], scene.objects[scene.relation.object]
        for caption in captions:
            parsed = parse_caption(tokenize(caption))
            for stated in parsed.relations:
                first, second = parsed.mentions[stated.subject], parsed.mentions[stated.object]
                said = ((first.colour, first.shape), stated.relation, (second.colour, second.shape))
                forward = ((subject.colour, subject.shape), scene.relation.relation, (obj.colour, obj.shape))
                backward = (forward[2], INVERSE_RELATION[forward[1]], forward[0])
                assert said in (forward, backward), caption


def test_captions_are_five_distinct_and_short(scenes):
    for _, captions in scenes:
        assert len(captions) == 5 == len(set(captions))
        assert all(1 <= len(tokenize(c)) <= MAX_CAPTION_WORDS for c in captions)


# --- command line -----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.synthetic", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_the_same_data_as_generate(tmp_path):
    result = _cli(
        *("--out", str(tmp_path / "cli"), "--count", "6", "--seed", "3", "--image-size", "64"),
        *("--val-fraction", "0.2", "--test-fraction", "0.3", "--jpeg-quality", "80"),
    )
    assert result.returncode == 0, result.stderr
    assert "dataset.json" in result.stdout
    generate(tmp_path / "api", 6, seed=3, image_size=64, val_fraction=0.2, test_fraction=0.3, jpeg_quality=80)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")


def test_cli_rejects_a_bad_argument_without_a_traceback(tmp_path):
    result = _cli("--out", str(tmp_path), "--count", "0", "--seed", "1")
    assert result.returncode == 2
    assert "count must be a positive integer" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dataset.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "seed"),
        (["--image-size", "10"], "image size"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "fractions together"),
        (["--test-fraction", "1.5"], "test fraction"),
        (["--jpeg-quality", "120"], "JPEG quality"),
        (["--count", "many"], "invalid int value"),
    ],
)
def test_main_rejects_bad_arguments(tmp_path, capsys, args, message):
    options = {"--count": "3", "--seed": "0", **dict(zip(args[::2], args[1::2], strict=True))}
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path), *(x for pair in options.items() for x in pair)])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "dataset.json").exists()


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="count"):
        generate(tmp_path, 0, seed=0)
    with pytest.raises(ValueError, match="image size"):
        make_scene(np.random.default_rng(0), 16)
    assert not (tmp_path / "images").exists()


# --- parsing and metrics ----------------------------------------------------------------------

RED_CIRCLE = SceneObject("circle", "red", "small", (10, 90, 40, 40))
BLUE_SQUARE = SceneObject("square", "blue", "large", (120, 70, 90, 90))


def test_parse_caption_finds_mentions_counts_and_relations():
    parsed = parse_caption(tokenize("Two little red circles are to the left of a big blue square."))
    assert [(m.count, m.size, m.colour, m.shape) for m in parsed.mentions] == [
        (2, "small", "red", "circle"),
        (1, "large", "blue", "square"),
    ]
    assert (parsed.mentions[0].colour_index, parsed.mentions[0].shape_index) == (2, 3)
    assert [(r.subject, r.relation, r.object) for r in parsed.relations] == [(0, "left of", 1)]

    bare = parse_caption(["red", "circles", "and", "three", "squares", "under", "a", "triangle"])
    assert [(m.count, m.colour) for m in bare.mentions] == [(2, "red"), (3, None), (1, None)]
    assert [(r.subject, r.relation, r.object) for r in bare.relations] == [(1, "below", 2)]

    # A relation phrase needs a mention on both sides to state anything.
    assert parse_caption(tokenize("left of a blue square")).relations == ()
    assert parse_caption(tokenize("a red circle on the left")).relations == ()


def test_object_accuracy_counts_only_correct_colour_and_shape():
    scene = [RED_CIRCLE, BLUE_SQUARE]
    assert object_accuracy(tokenize("a red circle and a blue square"), scene) == (2, 2)
    assert object_accuracy(tokenize("a green circle and a blue square"), scene) == (1, 2)
    assert object_accuracy(tokenize("a red square and a blue circle"), scene) == (0, 2)
    assert object_accuracy(tokenize("a red circle, a yellow triangle and a green square"), scene) == (1, 2)
    # Colour and shape are scored; a wrong size word does not undo a named object.
    assert object_accuracy(tokenize("a large red circle"), [o.to_json() for o in scene]) == (1, 2)


def test_object_accuracy_counts_repeated_objects():
    other = SceneObject("circle", "red", "large", (150, 10, 80, 80))
    scene = [RED_CIRCLE, other]
    assert object_accuracy(tokenize("two red circles"), scene) == (2, 2)
    assert object_accuracy(tokenize("three red circles"), scene) == (2, 2)
    assert object_accuracy(tokenize("a red circle"), scene) == (1, 2)
    # Repeating a phrase names nothing new; telling the objects apart by size does.
    assert object_accuracy(tokenize("a red circle and a red circle"), scene) == (1, 2)
    assert object_accuracy(tokenize("a small red circle and a big red circle"), scene) == (2, 2)


def test_relation_accuracy_judges_stated_relations():
    scene = [RED_CIRCLE, BLUE_SQUARE]
    assert relation_accuracy(tokenize("a red circle to the left of a blue square"), scene) == (1, 1)
    assert relation_accuracy(tokenize("a blue square right of a red circle"), scene) == (1, 1)
    assert relation_accuracy(tokenize("a red circle to the right of a blue square"), scene) == (0, 1)
    assert relation_accuracy(tokenize("a blue square left of a red circle"), scene) == (0, 1)
    assert relation_accuracy(tokenize("a red circle above a blue square"), scene) == (0, 1)
    assert relation_accuracy(tokenize("a green circle left of a blue square"), scene) == (0, 1)
    assert relation_accuracy(tokenize("a red circle and a blue square"), scene) == (0, 0)


def test_relation_accuracy_uses_the_dominant_axis():
    low = SceneObject("square", "green", "small", (60, 150, 50, 50))
    high = SceneObject("triangle", "yellow", "small", (90, 10, 50, 50))  # 30 px right, 140 px up
    assert relation_accuracy(tokenize("a yellow triangle above a green square"), [low, high]) == (1, 1)
    assert relation_accuracy(tokenize("a green square under a yellow triangle"), [low, high]) == (1, 1)
    assert relation_accuracy(tokenize("a yellow triangle right of a green square"), [low, high]) == (0, 1)


def test_relation_accuracy_quantifies_plural_mentions():
    left = SceneObject("circle", "red", "small", (10, 10, 40, 40))
    right = SceneObject("circle", "red", "small", (170, 10, 40, 40))
    square = SceneObject("square", "blue", "small", (100, 10, 40, 40))
    scene = [left, right, square]
    # Some red circle is left of the square, but not both of them.
    assert relation_accuracy(tokenize("a red circle left of a blue square"), scene) == (1, 1)
    assert relation_accuracy(tokenize("two red circles left of a blue square"), scene) == (0, 1)
    moved = [left, SceneObject("circle", "red", "small", (10, 60, 40, 40)), square]
    assert relation_accuracy(tokenize("two red circles left of a blue square"), moved) == (1, 1)


def _one_hot(cells: list[tuple[int, int]], grid: int = 7) -> np.ndarray:
    maps = np.full((len(cells), grid, grid), 0.1 / (grid * grid - 1))
    for step, (row, col) in enumerate(cells):
        maps[step, row, col] = 0.9
    return maps


def test_attention_grounding_hits_when_the_peak_is_in_the_named_box():
    # 224 px, 7x7 grid: cell centres at 16 + 32k. The red circle (x 10..50, y 90..130) holds the
    # centres of cells (3, 0) and (3, 1), the blue square (x 120..210, y 70..160) those of rows 2..4
    # and columns 4..6.
    scene = [RED_CIRCLE, BLUE_SQUARE]
    words = tokenize("a red circle and a blue square")
    on_target = _one_hot([(0, 0), (3, 0), (3, 0), (0, 0), (0, 0), (4, 5), (3, 4)])
    assert attention_grounding(words, on_target, scene, 224) == (4, 4)

    off_target = _one_hot([(0, 0), (3, 0), (6, 6), (0, 0), (0, 0), (4, 5), (0, 0)])
    assert attention_grounding(words, off_target, scene, 224) == (2, 4)

    # The red circle's words looking at the blue square miss too: it is the named object that counts.
    swapped = _one_hot([(0, 0), (4, 5), (3, 4), (0, 0), (0, 0), (3, 0), (3, 0)])
    assert attention_grounding(words, swapped, scene, 224) == (0, 4)


def test_attention_grounding_skips_absent_objects_and_checks_its_input():
    scene = [RED_CIRCLE, BLUE_SQUARE]
    words = tokenize("a green triangle and a red circle")
    maps = _one_hot([(0, 0), (0, 0), (0, 0), (0, 0), (0, 0), (3, 0), (3, 0), (0, 0)])  # one extra <end> row
    assert attention_grounding(words, maps, scene, 224) == (2, 2)
    # A (width, height) image of 100 x 240 with 3 rows and 2 columns: cells of 50 x 80 px, whose
    # centres lie at x 25, 75 and y 40, 120, 200. Only cell (1, 0) has its centre in the red circle.
    grid = np.zeros((len(words), 3, 2))
    grid[:, 0, 0] = 1.0
    grid[5:7] = 0.0
    grid[5:7, 1, 0] = 1.0
    assert attention_grounding(words, grid, scene, (100, 240)) == (2, 2)
    grid[5:7] = 0.0
    grid[5:7, 0, 1] = 1.0
    assert attention_grounding(words, grid, scene, (100, 240)) == (0, 2)
    with pytest.raises(ValueError, match="shape"):
        attention_grounding(words, maps[:3], scene, 224)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attention_grounding(words, bad, scene, 224)


def test_metrics_reject_malformed_input():
    with pytest.raises(ValueError, match="tokens"):
        object_accuracy("a red circle", [RED_CIRCLE])
    with pytest.raises(ValueError, match="scene object"):
        object_accuracy(["a", "red", "circle"], [{"shape": "circle"}])


def test_score_scenes_pools_over_records(small_set):
    entries = json.loads(small_set.read_text())["images"]
    perfect = score_scenes((s["tokens"], None, e) for e in entries for s in e["sentences"])
    assert perfect["object_accuracy"] == 1.0
    assert perfect["relations_stated"] > 0 and perfect["relation_accuracy"] == 1.0
    assert perfect["captions"] == 12 * 5
    assert perfect["attention_grounding"] is None

    entry = {
        "width": 224,
        "height": 224,
        "objects": [o.to_json() for o in (RED_CIRCLE, BLUE_SQUARE)],
        "relation": None,
    }
    records = [
        (tokenize("a red circle left of a blue square"), None, entry),
        (tokenize("a green triangle above a blue circle"), None, entry),
        (tokenize("a red circle"), _one_hot([(0, 0), (3, 0), (3, 0)]), entry),
    ]
    scores = score_scenes(records)
    assert scores["object_accuracy"] == pytest.approx(3 / 6)
    assert scores["relation_accuracy"] == pytest.approx(1 / 2)
    assert scores["attention_grounding"] == 1.0
    assert score_scenes([])["object_accuracy"] is None
