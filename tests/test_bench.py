"""The benchmarks' own arithmetic: the FLOPs the training benchmark calls useful are the FLOPs done."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.config import DecoderConfig
from captioner.decoder import Decoder, caption_loss

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("captions_per_image", [1, 5])
@pytest.mark.parametrize("overrides", [{}, {"cell": "gru"}, {"deep_output": False}])
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
