"""The training pipeline end to end on a tiny synthetic set: overfitting, exact resume after SIGKILL,
two-process DDP, bad images, configuration, and which parameters receive gradients."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from captioner import Captioner
from captioner.checkpoint import load_model, read_info
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.model import CaptionModel
from training.datasets import load_records
from training.train import (
    ConfigError,
    Distributed,
    Progress,
    TeacherForced,
    TrainConfig,
    apply_final_decay,
    build_optimizer,
    build_parser,
    epoch_order,
    git_commit,
    load_config,
    main,
    parameter_checksum,
    shard_batches,
    train_step,
    trainable,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "training" / "configs"
# A decoder small enough to overfit ~20 images in seconds; a 4x4 grid of the last map's cells (not the
# shipped config's stride-16 regions) keeps attention cheap.
TINY = [
    "--config",
    str(CONFIGS / "synthetic.toml"),
    "--set",
    "encoder.fine_grid=false",
    "--set",
    "decoder.key_channels=0",
    "--set",
    "decoder.embed_dim=64",
    "--set",
    "decoder.attention_dim=32",
    "--set",
    "decoder.hidden_dim=128",
    "--set",
    "encoder.grid_size=4",
    "--set",
    "train.min_word_count=1",
    "--set",
    "train.decoder_lr=8e-3",
    "--set",
    "train.lr_patience=100",
    "--set",
    "train.lr_decay_epochs=0",
    "--set",
    "train.patience=0",
    "--set",
    "train.val_beam_size=2",
    "--workers",
    "0",
    "--no-progress",
]
# One thread per process: on a busy 2-core machine, OpenMP threads waiting for each other make every
# operator many times slower.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """30 synthetic scenes, one training image deleted and one overwritten with junk, so every run
    over the set also shows that unreadable images are skipped. The feature cache is shared by all runs."""
    from training.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    dataset = generate(root / "data", count=30, seed=0, image_size=64)
    train = [r for r in load_records(dataset, root / "data") if r.split == "train"]
    train[0].path.unlink()
    train[1].path.write_bytes(b"\xff\xd8 not really a jpeg")
    return {"dataset": dataset, "images": root / "data", "cache": root / "cache", "runs": root / "runs"}


def run_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "--data",
        str(data["dataset"]),
        "--images",
        str(data["images"]),
        "--cache-dir",
        str(data["cache"]),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OVERFIT_EPOCHS = 40  # every relation scene's five captions state the relation, each in other words


@pytest.fixture(scope="session")
def overfit_run(synthetic_set: dict[str, Path]) -> Path:
    """An in-process run long enough to memorise the training captions."""
    out = synthetic_set["runs"] / "overfit"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = run_args(
            synthetic_set,
            out,
            "--epochs",
            str(OVERFIT_EPOCHS),
            "--set",
            "decoder.dropout=0.0",
            "--set",
            "train.batch_size=16",
        )
        main(build_parser().parse_args(args))
    finally:
        torch.set_num_threads(threads)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.slow
def test_training_overfits_a_small_set(overfit_run: Path, synthetic_set: dict[str, Path], one_thread: None) -> None:
    rows = read_csv(overfit_run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, OVERFIT_EPOCHS + 1))
    first, last = float(rows[0]["train_cross_entropy"]), float(rows[-1]["train_cross_entropy"])
    assert first / last > 5, (first, last)
    records = [r for r in load_records(synthetic_set["dataset"], synthetic_set["images"]) if r.split == "train"]
    readable = [r for r in records if r.path.is_file() and r.path.stat().st_size > 100]
    captioner = Captioner.from_pretrained(overfit_run / "last", device="cpu")
    results = captioner.caption([r.path for r in readable], beam_size=1, max_length=20)
    reproduced = sum(result.words in r.captions for result, r in zip(results, readable, strict=True))
    assert reproduced > 0.6 * len(readable), [res.caption for res in results]


@pytest.mark.slow
def test_a_run_writes_model_dirs_with_provenance_vocabulary_and_logs(
    overfit_run: Path, synthetic_set: dict[str, Path]
) -> None:
    info = read_info(overfit_run / "best")
    assert info.name == "captioner-synthetic"
    records = load_records(synthetic_set["dataset"], synthetic_set["images"])
    train_words = {w for r in records if r.split == "train" for c in r.captions for w in c}
    assert set(info.vocabulary.tokens[4:]) == train_words  # built from the training split only
    assert info.provenance["data"]["unreadable_images"] == 2  # skipped, counted, and the run went on
    failed = json.loads(next(synthetic_set["cache"].glob("*/index.json")).read_text())["failed"]
    broken = [r.image_id for r in records if r.split == "train"][:2]  # the two the fixture damaged
    assert sorted(failed) == sorted(broken) and "no such file" in failed[broken[0]]
    assert info.provenance["seed"] == 0
    assert (
        info.provenance["command"].startswith("captioner-train --config ")
        and f"--epochs {OVERFIT_EPOCHS}" in info.provenance["command"]
    )
    assert info.provenance["config"]["train"]["decoder_lr"] == 8e-3
    assert "git_commit" in info.provenance
    rows = read_csv(overfit_run / "metrics.csv")
    best = max(float(r["CIDEr"]) for r in rows)
    assert info.metrics["val"]["CIDEr"] == pytest.approx(best)
    assert read_info(overfit_run / "last").metrics["val"]["CIDEr"] == pytest.approx(float(rows[-1]["CIDEr"]))
    assert list((overfit_run / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(overfit_run / "last.pt", map_location="cpu", weights_only=True)
    assert state["progress"]["epoch"] == OVERFIT_EPOCHS and state["progress"]["step_in_epoch"] == 0
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}


def tiny_model(fine_tune_stages: int) -> CaptionModel:
    torch.manual_seed(0)
    encoder = EncoderConfig(weights=None, image_size=64, grid_size=2, fine_tune_stages=fine_tune_stages)
    decoder = DecoderConfig(vocab_size=12, feature_dim=1280, embed_dim=8, attention_dim=8, hidden_dim=8, dropout=0.0)
    return CaptionModel(ModelConfig(encoder, decoder), pretrained_encoder=False)


@pytest.mark.parametrize("fine_tune_stages", [0, 1])
def test_only_trainable_encoder_stages_receive_gradients(fine_tune_stages: int, one_thread: None) -> None:
    model = tiny_model(fine_tune_stages)
    tc = TrainConfig()
    optimizer = build_optimizer(model, tc)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pixels = torch.randn(2, 3, 64, 64)
    captions = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]])
    train_step(TeacherForced(model, from_features=False), model, optimizer, scaler, pixels, captions, tc, None)
    assert all(p.grad is not None for p in model.decoder.parameters())
    last_stage = set(map(id, model.encoder._stages[-1].parameters()))
    for parameter in model.encoder.parameters():
        expect_gradient = fine_tune_stages > 0 and id(parameter) in last_stage
        assert (parameter.grad is not None) == expect_gradient
    assert len(optimizer.param_groups) == (2 if fine_tune_stages else 1)


def test_a_step_on_the_frozen_stages_cached_map_equals_a_step_on_the_images(one_thread: None) -> None:
    tc = TrainConfig()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    captions = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]])
    results = []
    for from_features in (False, True):
        model = tiny_model(fine_tune_stages=2).train()  # as the loop sets it: the backbone stays in eval mode
        optimizer = build_optimizer(model, tc)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        with torch.no_grad():
            inputs = model.encoder.encode_frozen(pixels) if from_features else pixels  # (2, C', 2, 2) or pixels
        module = TeacherForced(model, from_features)
        loss, _, norm = train_step(module, model, optimizer, scaler, inputs, captions, tc, None)
        results.append((loss, norm, {name: p.detach().clone() for name, p in model.named_parameters()}))
    (loss, norm, weights), (cached_loss, cached_norm, cached_weights) = results
    assert cached_loss == pytest.approx(loss, rel=1e-5) and cached_norm == pytest.approx(norm, rel=1e-4)
    start = dict(tiny_model(fine_tune_stages=2).named_parameters())
    moved = [name for name in weights if not torch.equal(weights[name], start[name])]
    assert any(name.startswith("encoder.") for name in moved)  # the trainable stages did move
    for name in weights:
        torch.testing.assert_close(cached_weights[name], weights[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_a_step_reports_the_gradient_norm_it_found_and_clips_to_the_limit(grad_clip: float, one_thread: None) -> None:
    model = tiny_model(0)
    tc = TrainConfig(grad_clip=grad_clip)
    optimizer = torch.optim.SGD(trainable(model), lr=0.0)  # a rate of 0 leaves the gradients to inspect
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    pixels = torch.randn(2, 3, 64, 64)
    captions = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]])
    module = TeacherForced(model, from_features=False)
    _, _, reported = train_step(module, model, optimizer, scaler, pixels, captions, tc, None)
    left = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable(model)])).item()
    assert reported > 10 * 1e-3  # the norm before clipping, not after
    assert left == pytest.approx(grad_clip if grad_clip else reported, rel=1e-4)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", *args],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def kill_at_first_checkpoint(process: subprocess.Popen, state_path: Path) -> dict:
    """SIGKILL a training run as soon as it has written ``state_path``; returns the state it left."""
    deadline = time.monotonic() + 240
    while not state_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed:\n" + process.communicate()[0]
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return torch.load(state_path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(synthetic_set: dict[str, Path], overfit_run: Path) -> None:
    # Dropout on: the resumed run must also restore the random stream to match. The final decay over
    # the last two epochs: the rate it decays from must come back with the optimiser.
    common = ["--epochs", "3", "--set", "decoder.dropout=0.3", "--set", "train.batch_size=4", "--checkpoint-every", "2"]
    common += ["--set", "train.lr_decay_epochs=2"]
    runs = synthetic_set["runs"]
    reference = start(run_args(synthetic_set, runs / "uninterrupted", *common))
    killed = start(run_args(synthetic_set, runs / "killed", *common))
    state = kill_at_first_checkpoint(killed, runs / "killed" / "last.pt")
    assert state["progress"]["step_in_epoch"] > 0 and state["progress"]["epoch"] < 3  # killed mid-epoch
    finish(start(run_args(synthetic_set, runs / "killed", *common, "--resume")))
    finish(reference)
    expected = load_file(runs / "uninterrupted" / "last" / "model.safetensors")
    resumed = load_file(runs / "killed" / "last" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    columns = ("epoch", "global_step", "train_loss", "train_cross_entropy", "grad_norm", "grad_norm_max", "CIDEr")
    columns += ("decoder_lr",)
    reference_rows = [[row[c] for c in columns] for row in read_csv(runs / "uninterrupted" / "metrics.csv")]
    assert [[row[c] for c in columns] for row in read_csv(runs / "killed" / "metrics.csv")] == reference_rows
    assert len(reference_rows) == 3
    rates = [float(row[-1]) for row in reference_rows]  # each epoch's last step's rate
    assert rates[0] == 8e-3 and 0 < rates[2] < rates[1] < rates[0]


def test_the_final_decay_takes_the_rate_linearly_from_where_it_stands_to_zero() -> None:
    model = tiny_model(fine_tune_stages=0)
    tc = TrainConfig(epochs=4, lr_decay_epochs=2, decoder_lr=1e-3)
    optimizer = build_optimizer(model, tc)
    steps, rates = 5, []
    for epoch in range(4):
        if epoch == 1:
            optimizer.param_groups[0]["lr"] = 5e-4  # a plateau cut before the decay
        for step in range(steps):
            apply_final_decay(optimizer, Progress(epoch=epoch, step_in_epoch=step), tc, steps)
            rates.append(optimizer.param_groups[0]["lr"])
        if epoch == 2:  # a restart mid-decay: the rate to decay from travels in the optimiser's state
            state = optimizer.state_dict()
            optimizer = build_optimizer(model, tc)
            optimizer.load_state_dict(state)
    assert rates[:5] == [1e-3] * 5 and rates[5:10] == [5e-4] * 5
    expected = [5e-4 * (1 - i / 10) for i in range(10)]
    assert rates[10:] == pytest.approx(expected, rel=1e-12)
    # Extended to 7 epochs after the decay: epoch 4 back at the rate the decay started from, then a
    # new decay over epochs 5 and 6.
    longer = TrainConfig(epochs=7, lr_decay_epochs=2, decoder_lr=1e-3)
    apply_final_decay(optimizer, Progress(epoch=4, step_in_epoch=0), longer, steps)
    assert optimizer.param_groups[0]["lr"] == 5e-4 and "decay_start_lr" not in optimizer.param_groups[0]
    apply_final_decay(optimizer, Progress(epoch=6, step_in_epoch=0), longer, steps)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.5, rel=1e-12)


def test_a_run_stopped_early_resumes_when_given_more_patience(synthetic_set: dict[str, Path], one_thread: None) -> None:
    out = synthetic_set["runs"] / "extended"
    # A learning rate too small to move any float32 weight: the validation score never improves after
    # the first epoch, so a patience of 1 stops the run after its second epoch although 4 were asked for.
    frozen = ("--set", "train.decoder_lr=1e-12", "--set", "train.patience=1")
    main(build_parser().parse_args(run_args(synthetic_set, out, "--epochs", "4", *frozen)))
    assert [row["epoch"] for row in read_csv(out / "metrics.csv")] == ["1", "2"]
    main(build_parser().parse_args(run_args(synthetic_set, out, "--epochs", "4", "--resume", *frozen)))
    assert len(read_csv(out / "metrics.csv")) == 2, "with the same patience the run stays finished"
    unlimited = ("--set", "train.decoder_lr=1e-12", "--set", "train.patience=0")
    main(build_parser().parse_args(run_args(synthetic_set, out, "--epochs", "3", "--resume", *unlimited)))
    assert [row["epoch"] for row in read_csv(out / "metrics.csv")] == ["1", "2", "3"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical_and_writes_one_checkpoint_set(
    synthetic_set: dict[str, Path], overfit_run: Path
) -> None:
    out = synthetic_set["runs"] / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "training.train",
        *run_args(
            synthetic_set,
            out,
            "--epochs",
            "2",
            "--set",
            "train.batch_size=8",
            "--set",
            "decoder.dropout=0.3",
            "--debug-replica-checksums",
        ),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es)" in result.stderr
    checksums = [(out / f"replica_{rank}.txt").read_text().strip() for rank in (0, 1)]
    assert checksums[0] == checksums[1]
    model, _ = load_model(out / "last")
    assert parameter_checksum(model) == checksums[0]  # the saved model is the replicas' model
    assert sorted(p.name for p in out.iterdir()) == [
        "best",
        "last",
        "last.pt",
        "metrics.csv",
        "replica_0.txt",
        "replica_1.txt",
        "tensorboard",
    ]
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [row["epoch"] for row in read_csv(out / "metrics.csv")] == ["1", "2"]
    assert torch.load(out / "last.pt", weights_only=True)["world_size"] == 2


@pytest.mark.slow
def test_fine_tuning_trains_on_images_and_moves_only_the_trainable_stages(
    synthetic_set: dict[str, Path], one_thread: None
) -> None:
    out = synthetic_set["runs"] / "fine-tune"
    args = run_args(
        synthetic_set,
        out,
        "--epochs",
        "1",
        "--set",
        "encoder.fine_tune_stages=1",
        "--set",
        "encoder.image_size=64",
        "--set",
        "train.batch_size=32",
    )
    caches = set(synthetic_set["cache"].glob("*"))
    main(build_parser().parse_args(args))
    assert set(synthetic_set["cache"].glob("*")) == caches  # trained on images, not on cached features
    trained, _ = load_model(out / "last")
    start_model = CaptionModel(trained.config)  # the packaged ImageNet weights it started from
    initial = dict(start_model.encoder.body.named_parameters())
    moved = {id(p) for name, p in trained.encoder.body.named_parameters() if not torch.equal(p, initial[name])}
    assert moved and moved <= {id(p) for p in trained.encoder._stages[-1].parameters()}


def test_fine_tuning_on_the_frozen_stages_cache_moves_only_the_trainable_stages_and_captions(
    synthetic_set: dict[str, Path], one_thread: None
) -> None:
    out = synthetic_set["runs"] / "fine-tune-cached"
    tuning = ("--set", "encoder.fine_tune_stages=2", "--set", "train.cache_frozen_stages=true")
    caches = set(synthetic_set["cache"].glob("*"))
    main(build_parser().parse_args(run_args(synthetic_set, out, "--epochs", "1", *tuning)))
    (new_cache,) = set(synthetic_set["cache"].glob("*")) - caches
    assert json.loads((new_cache / "index.json").read_text())["description"]["trainable_stages"] == 2
    maps = np.load(new_cache / "features.npy", mmap_mode="r")
    assert maps.ndim == 4 and maps.shape[1] == 192  # the input of EfficientNet-Lite0's last block
    trained, _ = load_model(out / "last")
    start_model = CaptionModel(trained.config)  # the packaged ImageNet weights it started from
    initial = dict(start_model.encoder.body.named_parameters())
    moved = {id(p) for name, p in trained.encoder.body.named_parameters() if not torch.equal(p, initial[name])}
    assert moved and moved <= {id(p) for stage in trained.encoder._stages[-2:] for p in stage.parameters()}
    image = next(p for p in sorted(synthetic_set["images"].rglob("*.jpg")) if p.stat().st_size > 100)
    result = Captioner.from_pretrained(out / "last", device="cpu").caption(image, beam_size=2)
    assert result.attention.shape == (len(result.words), 4, 4)
    with pytest.raises(ConfigError, match="fine_grid"):
        main(build_parser().parse_args(run_args(synthetic_set, out, *tuning, "--set", "encoder.fine_grid=true")))


def test_a_fine_grid_run_caches_its_own_features_and_captions_on_the_finer_grid(
    synthetic_set: dict[str, Path], one_thread: None
) -> None:
    out = synthetic_set["runs"] / "fine-grid"
    caches = set(synthetic_set["cache"].glob("*"))
    main(build_parser().parse_args(run_args(synthetic_set, out, "--epochs", "1", "--set", "encoder.fine_grid=true")))
    (new_cache,) = set(synthetic_set["cache"].glob("*")) - caches
    features = np.load(new_cache / "features.npy", mmap_mode="r")
    assert features.shape[1:] == (8 * 8, 1280 + 112)  # the 4x4 grid of the run, twice as fine
    info = read_info(out / "last")
    assert info.config.encoder.fine_grid and info.config.decoder.feature_dim == 1392
    image = next(p for p in sorted(synthetic_set["images"].rglob("*.jpg")) if p.stat().st_size > 100)
    result = Captioner.from_pretrained(out / "last", device="cpu").caption(image, beam_size=2)
    assert result.attention.shape == (len(result.words), 8, 8)


def test_epoch_order_keeps_each_images_captions_together_and_shards_cover_it() -> None:
    pair_image = np.repeat(np.arange(8), [3, 3, 2, 3, 3, 3, 3, 3])  # 23 captions of 8 images
    order = epoch_order(seed=3, epoch=1, pair_image=pair_image)
    assert torch.equal(order, epoch_order(seed=3, epoch=1, pair_image=pair_image))
    assert not torch.equal(order, epoch_order(seed=3, epoch=2, pair_image=pair_image))
    assert sorted(order.tolist()) == list(range(23))
    images_in_order = pair_image[order.numpy()]
    runs = [image for k, image in enumerate(images_in_order) if k == 0 or image != images_in_order[k - 1]]
    assert sorted(runs) == list(range(8)), "an image's captions come one after the other"
    assert runs != sorted(runs), "the images are shuffled"
    shards = [shard_batches(order, Distributed(rank, 3), batch_size=4) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = np.concatenate([np.concatenate(s) for s in shards])
    assert sorted(set(seen.tolist())) == list(range(23)) and len(seen) == 24  # padded by one repeat
    assert shards[1][0].tolist() == order[4:8].tolist(), "each rank takes a contiguous part of a global batch"
    assert shard_batches(order, Distributed(), 5)[0].tolist() == order[:5].tolist()


def test_the_shipped_configs_load_and_describe_buildable_models() -> None:
    for path in CONFIGS.glob("*.toml"):
        config = load_config(path)
        model_config = config.model_config(vocab_size=100)
        assert model_config.decoder.vocab_size == 100
    coco = load_config(CONFIGS / "coco-resnet101.toml")
    assert coco.model_config(10).decoder.feature_dim == 2048  # ResNet-101's channels


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    path = CONFIGS / "synthetic.toml"
    config = load_config(path, ["train.decoder_lr=1e-3", "train.out=runs/x", "encoder.weights=none"])
    assert config.train.decoder_lr == 1e-3 and config.train.out == "runs/x" and config.encoder.weights is None
    with pytest.raises(ConfigError, match=r"unknown \[train\] keys: \['lr'\]"):
        load_config(path, ["train.lr=1"])
    with pytest.raises(ConfigError, match=r"\[decoder\]: key_channels must lie in \[0, feature_dim = 1280\]"):
        load_config(path, ["encoder.fine_grid=false", "decoder.key_channels=1281"])
    assert load_config(path, ["decoder.key_channels=1392"]).decoder["key_channels"] == 1392
    with pytest.raises(ConfigError, match=r"feature_dim = 1392"):
        load_config(path, ["decoder.key_channels=1393"])
    with pytest.raises(ConfigError, match=r"\[encoder\]: unknown backbone 'vgg'"):
        load_config(path, ["encoder.backbone=vgg"])
    with pytest.raises(ConfigError, match="train.epochs must be a int"):
        load_config(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        load_config(path, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="decoder.vocab_size comes from the data"):
        load_config(path, ["decoder.vocab_size=3"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_config(path, ["epochs=3"])
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\nepochs = 1\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config(broken)


def test_the_cli_reports_bad_data_as_an_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "dataset.json"
    bad.write_text('{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]}')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            *TINY,
            "--data",
            str(bad),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert f"error: {bad}: caption 0 of image a.jpg (a.jpg) is empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_commit_of_a_run_is_read_once_so_later_commits_do_not_relabel_it(monkeypatch: pytest.MonkeyPatch) -> None:
    git_commit.cache_clear()
    first = git_commit()
    if first is None:
        pytest.skip("not running from a git checkout, so there is no commit to record")

    def another_head(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 0, stdout="0" * 40 + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", another_head)
    assert git_commit() == first
    git_commit.cache_clear()
    assert git_commit() == "0" * 40, "the stand-in for a later commit is what a fresh read sees"
    git_commit.cache_clear()
