"""The shipped synthetic scenes model (weights/synthetic) still captions what it was trained on.

Its scores on 1,000 test scenes are in weights/synthetic/README.md; here a few dozen fresh scenes (a seed used
neither by its training data, 3, nor by its test scenes, 2) check that the weights, the preprocessing
recorded beside them and the decoding code still fit together. A model whose weights no longer load
into the decoder as trained, or whose images are prepared differently from training, names few
objects correctly and looks away from them, so the floors sit well below the measured scores and far
above what such a model reaches.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner
from tests.conftest import REPO_ROOT
from training.scenes import score_scenes
from training.synthetic import JPEG_QUALITY, make_scene, render

SEED = 7
SCENES = 48
SYNTHETIC_MODEL_DIR = REPO_ROOT / "weights" / "synthetic"


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.from_pretrained(SYNTHETIC_MODEL_DIR, device="cpu")


def jpeg(image: Image.Image) -> bytes:
    """As the training scenes were stored."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def test_the_synthetic_model_names_places_and_looks_at_the_objects_of_fresh_scenes(captioner: Captioner) -> None:
    scenes = [make_scene(np.random.default_rng(np.random.SeedSequence([SEED, 0, i]))) for i in range(SCENES)]
    results = captioner.caption([jpeg(render(scene)) for scene in scenes], beam_size=3)
    records = [
        (
            result.words,
            result.attention,
            {"objects": [o.to_json() for o in scene.objects], "width": scene.image_size, "height": scene.image_size},
        )
        for scene, result in zip(scenes, results, strict=True)
    ]
    scores = score_scenes(records)
    described = "; ".join(result.caption for result in results[:6])
    assert scores["objects_total"] >= 80 and scores["relations_stated"] >= 15, scores
    # The shipped model (version 5) scores 0.935 / 0.818 / 0.849 here (object / relation / grounding).
    # Given images normalised with ImageNet's statistics instead of its own, it scores 0.71 / 0.27 /
    # 0.85: its attention still finds the objects, but it names and places them wrongly. Uniform
    # attention grounds about 0.02.
    assert scores["object_accuracy"] >= 0.85, (scores, described)
    assert scores["relation_accuracy"] >= 0.6, (scores, described)
    assert scores["attention_grounding"] >= 0.6, (scores, described)
