"""Tests of the caption metrics and the scoring command.

Published caption scores are only comparable when computed exactly like the COCO evaluation, so the
main check is agreement with pycocoevalcap on real Flickr8k captions; small hand-worked cases pin
down the individual rules (clipping, closest reference length, ROUGE-L's separate maxima, IDF).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioner.vocab import tokenize
from training import score
from training.metrics import (
    METRIC_KEYS,
    MeteorScorer,
    MetricError,
    bleu,
    cider_d_per_image,
    compute_metrics,
    dangling_fraction,
    rouge_l_per_image,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAPTIONER_SHARED") or REPO.parent / "shared")
FLICKR = SHARED / "data" / "flickr8k"
# "4 decimal places": a difference that could flip the fourth decimal of a rounded score.
TOLERANCE = 5e-5
METEOR_SUBSET = 300

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java, which is not on PATH")


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture(scope="module")
def flickr_test() -> tuple[dict[str, list[str]], dict[str, list[list[str]]]]:
    """Caption #0 of each Flickr8k test image as the candidate, the other four as references."""
    token_file = FLICKR / "Flickr8k.token.txt"
    split_file = FLICKR / "Flickr_8k.testImages.txt"
    if not token_file.is_file() or not split_file.is_file():
        pytest.skip(f"Flickr8k captions not found in {FLICKR} (set CAPTIONER_SHARED to the shared folder)")
    test_images = set(split_file.read_text().split())
    captions: dict[str, dict[int, list[str]]] = {}
    for line in token_file.read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t", 1)
        name, number = key.split("#")
        if name in test_images:
            captions.setdefault(name, {})[int(number)] = tokenize(caption)
    assert len(captions) == 1000
    candidates = {name: by_number[0] for name, by_number in captions.items()}
    references = {name: [by_number[k] for k in sorted(by_number) if k != 0] for name, by_number in captions.items()}
    return candidates, references


def as_coco(
    candidates: dict[str, list[str]], references: dict[str, list[list[str]]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The same captions as pycocoevalcap's scorers take them: (gts, res) of space-joined strings."""
    gts = {i: [" ".join(ref) for ref in refs] for i, refs in references.items()}
    res = {i: [" ".join(candidates[i])] for i in references}
    return gts, res


def coco_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict[str, float]:
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n + 1}": value for n, value in enumerate(bleus)}
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


def test_bleu_rouge_cider_agree_with_coco_on_flickr8k_test(flickr_test) -> None:
    candidates, references = flickr_test
    ours = compute_metrics(candidates, references, meteor=False)
    theirs = coco_scores(*as_coco(candidates, references))
    assert list(ours) == [key for key in METRIC_KEYS if key != "METEOR"]
    for key, value in theirs.items():
        assert abs(ours[key] - value) < TOLERANCE, (key, ours[key], value)


@needs_java
def test_meteor_and_all_metrics_agree_with_coco_on_a_subset(flickr_test) -> None:
    candidates, references = flickr_test
    subset = sorted(candidates)[:METEOR_SUBSET]
    candidates = {i: candidates[i] for i in subset}
    references = {i: references[i] for i in subset}
    gts, res = as_coco(candidates, references)
    # Started first so that its JVM loads the paraphrase table while ours does.
    coco_meteor = Meteor()
    ours = compute_metrics(candidates, references, meteor=True)
    theirs = coco_scores(gts, res)
    theirs["METEOR"] = coco_meteor.compute_score(gts, res)[0]
    del coco_meteor
    assert tuple(ours) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert abs(ours[key] - theirs[key]) < TOLERANCE, (key, ours[key], theirs[key])


def test_identical_caption_scores_bleu_of_almost_exactly_one() -> None:
    caption = words("a black dog runs across the grass")
    scores = bleu({1: caption}, {1: [caption]})
    # The smoothing constants keep a perfect score a hair below 1.
    for value in scores:
        assert value == pytest.approx(1.0, abs=1e-8)
        assert value <= 1.0


def test_bleu_clips_repeated_words_by_reference_counts() -> None:
    # "the" occurs twice in the reference, so only two of the four are credited.
    scores = bleu({1: words("the the the the")}, {1: [words("the cat the dog")]})
    assert scores[0] == pytest.approx(0.5, rel=1e-6)
    # No bigram of the candidate is in the reference.
    assert scores[1] < 1e-6


def test_bleu_brevity_penalty_uses_the_closest_reference_length() -> None:
    candidate = words("a b c d e")
    refs = [words("a b c"), words("a b c d e f"), words("a b c d e f g h i")]
    # Every candidate word is matched; the closest reference has 6 words, so BP = exp(1 - 6/5).
    assert bleu({1: candidate}, {1: refs})[0] == pytest.approx(math.exp(1 - 6 / 5), rel=1e-6)
    # Lengths 4 and 6 are equally close to 5; the shorter one wins, so there is no penalty.
    tie = [words("a b c d"), words("a b c d e f")]
    assert bleu({1: candidate}, {1: tie})[0] == pytest.approx(1.0, abs=1e-8)


def test_bleu_pools_counts_over_the_corpus() -> None:
    candidates = {1: words("red car"), 2: words("w x y z")}
    references = {1: [words("red car")], 2: [words("a b c d")]}
    # 2 of 6 candidate words match overall; averaging per image would give 0.5.
    assert bleu(candidates, references)[0] == pytest.approx(2 / 6, rel=1e-6)


def test_rouge_l_of_a_hand_computed_lcs() -> None:
    # LCS of "a b c d e" and "a x c y e f" is "a c e": precision 3/5, recall 3/6.
    precision, recall, beta = 3 / 5, 3 / 6, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    score = rouge_l_per_image({1: words("a b c d e")}, {1: [words("a x c y e f")]})[1]
    assert score == pytest.approx(expected, rel=1e-12)


def test_rouge_l_maximises_precision_and_recall_over_references_separately() -> None:
    # Reference 1 gives the best recall (2/2), reference 2 the best precision (3/4).
    refs = [words("a b"), words("a b c x y z w v")]
    precision, recall, beta = 3 / 4, 1.0, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    assert rouge_l_per_image({1: words("a b c d")}, {1: refs})[1] == pytest.approx(expected, rel=1e-12)


def test_rouge_l_of_an_empty_candidate_is_zero() -> None:
    assert rouge_l_per_image({1: []}, {1: [words("a dog")]})[1] == 0.0


def test_cider_d_without_ngram_overlap_is_zero_and_a_unique_exact_match_is_ten() -> None:
    candidates = {"miss": words("red car parked outside"), "hit": words("two dogs play fetch")}
    references = {"miss": [words("a bicycle leaning on walls")], "hit": [words("two dogs play fetch")]}
    scores = cider_d_per_image(candidates, references)
    assert scores["miss"] == 0.0
    # Every n-gram order has cosine 1 and no length penalty: 10 * mean(1, 1, 1, 1).
    assert scores["hit"] == pytest.approx(10.0, rel=1e-12)


def test_cider_d_gives_no_weight_to_ngrams_in_every_image_references() -> None:
    # With two images whose references are identical, every n-gram has IDF log(2) - log(2) = 0.
    caption = words("a dog runs fast")
    scores = cider_d_per_image({1: caption, 2: caption}, {1: [caption], 2: [caption]})
    assert scores == {1: 0.0, 2: 0.0}


@pytest.mark.parametrize(
    ("candidates", "references", "message"),
    [
        ({1: ["a"]}, {2: [["a"]]}, "no references for image id"),
        ({1: ["a"]}, {1: [["a"]], 2: [["b"]]}, "no candidate caption"),
        ({1: ["a"]}, {1: []}, "empty list of references"),
        ({1: ["a"]}, {1: [[]]}, "has no words"),
        ({1: "a dog"}, {1: [["a"]]}, "must be a list of words"),
        ({1: ["a"]}, {1: ["a dog"]}, "must be a list of words"),
        ({1: ["a dog"]}, {1: [["a"]]}, "not a single non-empty word"),
        ({}, {}, "no candidate captions"),
    ],
)
def test_invalid_input_is_rejected_with_metric_error(candidates, references, message) -> None:
    with pytest.raises(MetricError, match=message) as caught:
        compute_metrics(candidates, references, meteor=False)
    assert isinstance(caught.value, ValueError)


def test_meteor_scorer_reports_a_missing_jar_or_java(tmp_path: Path) -> None:
    with pytest.raises(MetricError, match="does not exist"):
        MeteorScorer(jar=tmp_path / "meteor-1.5.jar")
    jar = tmp_path / "present.jar"
    jar.write_bytes(b"")
    with pytest.raises(MetricError, match="needs Java"):
        MeteorScorer(jar=jar, java="no-such-java-binary")


@needs_java
def test_meteor_scorer_turns_a_failing_jvm_into_metric_error(tmp_path: Path) -> None:
    jar = tmp_path / "not-really.jar"
    jar.write_bytes(b"this is not a zip archive")
    with MeteorScorer(jar=jar) as scorer, pytest.raises(MetricError, match="METEOR"):
        scorer.score({1: ["a", "dog"]}, {1: [["a", "dog"]]})


ANNOTATIONS = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "annotations": [
        {"image_id": 1, "id": 10, "caption": "A black dog runs across the grass."},
        {"image_id": 1, "id": 11, "caption": "A dog running on a lawn"},
        {"image_id": 2, "id": 20, "caption": "Two children play in the sand at the beach."},
        {"image_id": 2, "id": 21, "caption": "Kids building a sandcastle"},
        {"image_id": 3, "id": 30, "caption": "A man rides a red bicycle."},
    ],
}
RESULTS = [
    {"image_id": 1, "caption": "A black dog running on the grass!"},
    {"image_id": 2, "caption": "two kids play on the beach"},
]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    """``python -m training.score`` on a good input and two bad ones, keyed by case.

    The runs are started together because each spends seconds importing the library.
    """
    folder = tmp_path_factory.mktemp("score")
    annotations = write_json(folder / "captions.json", ANNOTATIONS)
    broken = folder / "broken-results.json"
    broken.write_text('[{"image_id": 1, "caption": ', encoding="utf-8")
    cases = {
        "good": write_json(folder / "results.json", RESULTS),
        "malformed": broken,
        "unknown_image": write_json(folder / "unknown.json", [*RESULTS, {"image_id": 99, "caption": "a cat"}]),
    }
    processes = {
        case: subprocess.Popen(
            [sys.executable, "-m", "training.score", "--results", str(results)]
            + ["--annotations", str(annotations), "--no-meteor"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, results in cases.items()
    }
    runs = {}
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        runs[case] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return runs


def test_score_command_scores_only_the_result_images(cli_runs) -> None:
    done = cli_runs["good"]
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    candidates = {r["image_id"]: tokenize(r["caption"]) for r in RESULTS}
    references: dict[int, list[list[str]]] = {}
    for record in ANNOTATIONS["annotations"]:
        if record["image_id"] in candidates:
            references.setdefault(record["image_id"], []).append(tokenize(record["caption"]))
    assert printed == pytest.approx(compute_metrics(candidates, references, meteor=False), rel=1e-12)
    assert list(printed) == [key for key in METRIC_KEYS if key != "METEOR"]


def test_score_command_rejects_malformed_json_naming_the_file(cli_runs) -> None:
    done = cli_runs["malformed"]
    assert done.returncode == 2
    assert "broken-results.json" in done.stderr and "not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_score_command_rejects_a_result_image_without_references(cli_runs) -> None:
    done = cli_runs["unknown_image"]
    assert done.returncode == 2
    assert "99" in done.stderr and "captions.json" in done.stderr and "no reference" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("results", "annotations", "message"),
    [
        ([RESULTS[0], {"image_id": 1, "caption": "a dog"}], ANNOTATIONS, "more than once"),
        ({"image_id": 1, "caption": "a dog"}, ANNOTATIONS, "must be a JSON list"),
        ([], ANNOTATIONS, "empty"),
        ([{"image_id": 1}], ANNOTATIONS, "needs both"),
        ([{"image_id": True, "caption": "a dog"}], ANNOTATIONS, "expected an integer or string"),
        ([{"image_id": 1, "caption": ["a", "dog"]}], ANNOTATIONS, "not a string"),
        (RESULTS, ANNOTATIONS["annotations"], "'annotations' list"),
        (RESULTS, {"annotations": [{"image_id": 1, "caption": "?!"}]}, "no words"),
    ],
)
def test_score_main_reports_bad_files_with_status_2(tmp_path: Path, capsys, results, annotations, message) -> None:
    results_path = write_json(tmp_path / "results.json", results)
    annotations_path = write_json(tmp_path / "captions.json", annotations)
    status = score.main(["--results", str(results_path), "--annotations", str(annotations_path), "--no-meteor"])
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err
    assert captured.out == ""


def test_score_main_reports_a_missing_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere.json"
    annotations = write_json(tmp_path / "captions.json", ANNOTATIONS)
    assert score.main(["--results", str(missing), "--annotations", str(annotations)]) == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_dangling_endings_are_captions_cut_off_mid_phrase() -> None:
    captions = [["a", "man", "in", "a"], ["a", "dog", "runs"], ["two", "with"], [], ["a", "man", "and", "his"]]
    assert dangling_fraction(captions) == pytest.approx(3 / 5)
    assert dangling_fraction([]) == 0.0
