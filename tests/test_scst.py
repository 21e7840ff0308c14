"""Self-critical training's parts: the reward is the project's CIDEr-D, the baselines, and log-probabilities
recomputed with gradients that equal the ones the search sampled with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner.checkpoint import load_model, read_info
from captioner.vocab import END_ID
from tests.conftest import make_model_dir
from tests.test_train import TINY as TRAIN_TINY
from tests.test_train import finish, kill_at_first_checkpoint, read_csv
from tests.test_train import start as start_training
from training.metrics import cider_d_per_image
from training.scst import Rewards, advantages, caption_batch, sample_captions, sample_log_probs, token_log_probs
from training.train import TeacherForced

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "training" / "configs"

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


def test_samples_are_independent_draws_repeats_included(tmp_path) -> None:
    model, _ = load_model(make_model_dir(tmp_path / "model", seed=3))
    model.eval()
    with torch.no_grad():
        model.decoder.output.bias[END_ID] = 30.0  # <end> first, almost surely: every draw is the empty caption
    samples = sample_captions(model, torch.randn(2, 49, 1280), 5, 6, torch.Generator().manual_seed(0))
    assert [[h.tokens for h in found] for found in samples] == [[[END_ID]] * 5] * 2


def test_recomputed_log_probabilities_equal_the_samples_own_less_a_forced_end(tmp_path) -> None:
    model, _ = load_model(make_model_dir(tmp_path / "model", seed=3))
    model.eval()
    torch.manual_seed(0)
    features = torch.randn(3, 49, 1280)  # (B, R, C)
    samples = sample_captions(model, features, 4, 6, torch.Generator().manual_seed(1))
    hypotheses = [h for found in samples for h in found]
    assert any(h.truncated for h in hypotheses) and not all(h.truncated for h in hypotheses)
    captions = caption_batch([h.tokens for h in hypotheses], features.device)  # (12, T)
    per_token = token_log_probs(TeacherForced(model, from_features=True), features, captions, per_image=4)
    assert per_token.requires_grad
    expected = torch.tensor([h.log_prob for h in hypotheses])
    assert torch.allclose(per_token.sum(dim=1).detach(), expected, atol=1e-4), (per_token.sum(dim=1), expected)
    # A sample cut at max_length: its <end> was forced, not drawn, and does not count.
    log_prob = sample_log_probs(per_token, hypotheses).detach()
    for row, h in enumerate(hypotheses):
        forced = per_token[row, len(h.tokens) - 1].item() if h.truncated else 0.0
        assert log_prob[row].item() == pytest.approx(h.log_prob - forced, abs=1e-4)


# End to end on a tiny synthetic set: a cross-entropy start, then self-critical runs from it.
TINY = [*TRAIN_TINY, "--set", "decoder.dropout=0.0"]


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """60 synthetic scenes and a cross-entropy model trained on them for a few epochs (not to the end)."""
    from training.synthetic import generate

    root = tmp_path_factory.mktemp("scst")
    dataset = generate(root / "data", count=60, seed=0, image_size=64)
    paths = {"dataset": dataset, "images": root / "data", "cache": root / "cache", "root": root}
    finish(start_training(data_args(paths, root / "xe", "--epochs", "5", "--set", "train.batch_size=16")), timeout=600)
    return paths


def data_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(paths["dataset"]), "--images", str(paths["images"]),
            "--cache-dir", str(paths["cache"]), "--out", str(out), *extra]  # fmt: skip


def scst_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    starting_model = paths["root"] / "xe" / "last"
    return data_args(paths, out, "--set", "train.objective='scst'", "--set", f"train.init_from='{starting_model}'",
                     "--set", "train.decoder_lr=1e-3", "--set", "train.batch_size=8", *extra)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_self_critical_training_raises_dev_cider_d(start: dict[str, Path], baseline: str) -> None:
    out = start["root"] / f"scst-{baseline}"
    run = start_training(scst_args(start, out, "--epochs", "2", "--set", f"train.scst_baseline='{baseline}'"))
    finish(run, timeout=600)
    # The starting model's dev score is the cross-entropy run's last epoch's: init_from is its last/.
    started_at = float(read_csv(start["root"] / "xe" / "metrics.csv")[-1]["CIDEr"])
    rows = read_csv(out / "metrics.csv")
    assert max(float(row["CIDEr"]) for row in rows) > started_at + 0.1, (started_at, rows)
    assert all(row["train_reward"] and not row["train_cross_entropy"] for row in rows)
    assert read_info(out / "best").vocabulary == read_info(start["root"] / "xe" / "last").vocabulary


@pytest.mark.slow
def test_a_self_critical_run_resumed_after_sigkill_matches_an_uninterrupted_one(start: dict[str, Path]) -> None:
    common = ["--epochs", "2", "--set", "train.batch_size=4", "--checkpoint-every", "3"]
    root = start["root"]
    reference = start_training(scst_args(start, root / "uninterrupted", *common))
    killed = start_training(scst_args(start, root / "killed", *common))
    state = kill_at_first_checkpoint(killed, root / "killed" / "last.pt")
    assert state["progress"]["step_in_epoch"] > 0 and state["progress"]["epoch"] < 2  # killed mid-epoch
    finish(start_training(scst_args(start, root / "killed", *common, "--resume")), timeout=600)
    finish(reference, timeout=600)
    expected = load_file(root / "uninterrupted" / "last" / "model.safetensors")
    resumed = load_file(root / "killed" / "last" / "model.safetensors")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    columns = ("epoch", "global_step", "train_loss", "train_reward", "CIDEr")
    rows = [[row[c] for c in columns] for row in read_csv(root / "uninterrupted" / "metrics.csv")]
    assert [[row[c] for c in columns] for row in read_csv(root / "killed" / "metrics.csv")] == rows


def test_self_critical_training_needs_a_starting_model(tmp_path: Path) -> None:
    from training.train import ConfigError, build_parser, main

    args = build_parser().parse_args([*TINY, "--data", "x.json", "--images", ".", "--out", str(tmp_path),
                                      "--set", "train.objective='scst'"])  # fmt: skip
    with pytest.raises(ConfigError, match="init_from"):
        main(args)


@pytest.mark.slow
def test_self_critical_training_can_tune_the_last_encoder_stages_on_the_frozen_stages_cache(
    start: dict[str, Path],
) -> None:
    from training.train import ConfigError, build_parser, main

    tuning = ["--set", "encoder.fine_tune_stages=2"]
    with pytest.raises(ConfigError, match="cache_frozen_stages"):
        main(build_parser().parse_args(scst_args(start, start["root"] / "refused", *tuning)))
    out = start["root"] / "scst-tuned"
    finish(start_training(scst_args(start, out, "--epochs", "1", *tuning, "--set", "train.cache_frozen_stages=true")),
           timeout=600)  # fmt: skip
    before = load_file(start["root"] / "xe" / "last" / "model.safetensors")
    after = load_file(out / "last" / "model.safetensors")
    trained, _ = load_model(out / "last")
    tuned = {id(t) for stage in trained.encoder._stages[-2:] for t in (*stage.parameters(), *stage.buffers())}
    stage_names = {name for name, t in (*trained.named_parameters(), *trained.named_buffers()) if id(t) in tuned}
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    moved_in_encoder = {name for name in moved if name.startswith("encoder.")}
    assert moved_in_encoder and moved_in_encoder <= stage_names
    assert any(n.startswith("decoder.") for n in moved) and read_csv(out / "metrics.csv")[0]["train_reward"]
