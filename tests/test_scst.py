"""Self-critical training's parts: the reward is the project's CIDEr-D, the baselines, and log-probabilities
recomputed with gradients that equal the ones the search sampled with."""

from __future__ import annotations

import pytest
import torch

from captioner.checkpoint import load_model
from captioner.decoding import SearchOptions, search
from tests.conftest import make_model_dir
from training.metrics import cider_d_per_image
from training.scst import Rewards, advantages, caption_batch, sequence_log_probs
from training.train import TeacherForced

REFERENCES = [
    [["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "is", "running"]],
    [["two", "people", "ride", "bikes"], ["people", "are", "riding", "bicycles", "on", "a", "road"]],
    [
        ["a", "child", "plays", "in", "the", "water"],
        ["a", "girl", "splashes", "in", "a", "pool"],
        ["a", "kid", "swims"],
    ],
]


@pytest.mark.parametrize(
    "candidate",
    [["a", "dog", "runs"], ["people", "ride", "bikes", "on", "a", "road"], ["a", "child", "in", "the", "water"], []],
)
def test_the_reward_is_the_cider_d_of_the_caption_against_all_training_references(candidate: list[str]) -> None:
    rewards = Rewards(REFERENCES)
    # The project's CIDEr-D over the training images, with this candidate for every image: its document
    # frequencies are those of the whole training set, as the reward's are.
    expected = cider_d_per_image(dict.fromkeys(range(3), candidate), dict(enumerate(REFERENCES)))
    for image in range(3):
        assert rewards(image, candidate) == pytest.approx(expected[image], abs=1e-12)


def test_baselines_greedy_and_mean_of_the_other_samples() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])  # (B=2, K=3)
    greedy = torch.tensor([2.0, 1.0])
    assert torch.equal(advantages(rewards, "greedy", greedy), torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 5.0]]))
    # Sample 0 of image 0 against the mean of samples 1 and 2, (2 + 3) / 2, and so on.
    expected = torch.tensor([[1.0 - 2.5, 2.0 - 2.0, 3.0 - 1.5], [0.0 - 3.0, 0.0 - 3.0, 6.0 - 0.0]])
    assert torch.allclose(advantages(rewards, "mean", None), expected)


def test_recomputed_log_probabilities_equal_the_samples_own(tmp_path) -> None:
    model, _ = load_model(make_model_dir(tmp_path / "model", seed=3))
    model.eval()
    torch.manual_seed(0)
    features = torch.randn(3, 49, 1280)  # (B, R, C)
    samples = search(
        model.decoder, features, SearchOptions(sample=True, n_best=4, max_length=6), torch.Generator().manual_seed(1)
    )
    hypotheses = [h for found in samples for h in found]
    assert any(h.truncated for h in hypotheses) or any(len(h.tokens) < 7 for h in hypotheses)
    captions = caption_batch([h.tokens for h in hypotheses], features.device)  # (12, T)
    log_prob = sequence_log_probs(TeacherForced(model, from_features=True), features, captions, per_image=4)
    assert log_prob.requires_grad
    expected = torch.tensor([h.log_prob for h in hypotheses])
    assert torch.allclose(log_prob.detach(), expected, atol=1e-4), (log_prob, expected)
