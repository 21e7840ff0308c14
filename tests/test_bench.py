"""The benchmarks' own arithmetic: the FLOPs the training benchmark calls useful are the FLOPs done."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.config import DecoderConfig
from captioner.decoder import Decoder, caption_loss

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("captions_per_image", [1, 5])
@pytest.mark.parametrize("overrides", [{}, {"cell": "gru"}, {"cell": "rnn"}, {"deep_output": False}])
def test_training_flop_count_equals_what_torch_counts(captions_per_image: int, overrides: dict) -> None:
    bench = load_bench("train_throughput")
    config = DecoderConfig(
        vocab_size=100, feature_dim=64, embed_dim=16, attention_dim=24, hidden_dim=32, dropout=0.5, **overrides
    )
    torch.manual_seed(0)
    decoder = Decoder(config).train()
    captions_total, regions, length = 10, 9, 7
    images = captions_total // captions_per_image
    features = torch.randn(images, regions, config.feature_dim)
    captions = torch.randint(4, config.vocab_size, (captions_total, length))
    image_of_caption = torch.arange(captions_total) // captions_per_image
    with FlopCounterMode(display=False) as counter:
        logits, alphas = decoder(features, captions, image_of_caption)
        loss, _ = caption_loss(logits, captions[:, 1:], alphas, attention_penalty=1.0)
        loss.backward()
    expected = bench.training_flops(config, regions, length - 1, captions_total, images)
    assert counter.get_total_flops() == expected


def test_training_benchmark_runs_and_reports_the_median_round(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("train_throughput")
    tiny = ["--device", "cpu", "--regions", "9", "--channels", "64", "--dim", "16", "--vocab-size", "50"]
    tiny += ["--batch-size", "4", "--caption-length", "5", "--warmup", "1"]
    tiny += ["--rounds", "3", "--iterations", "2", "--matmul-seconds", "0.01"]
    result = bench.main(tiny)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == result
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 3
    per_round = sorted(float(line.rsplit("mfu ", 1)[1]) for line in rounds)
    assert result["mfu"] == pytest.approx(per_round[1], abs=1e-3)  # the median of three rounds
    seconds = result["seconds_per_iteration"]  # rounded to 0.1 ms, tokens_per_s to 0.1
    assert result["tokens_per_s"] == pytest.approx(4 * 4 / seconds, abs=4 * 4 * 5e-5 / seconds**2 + 0.05)
