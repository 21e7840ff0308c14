"""Shared fixtures: tiny random-weight models saved as real model directories."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import ModelInfo, save_model
from captioner.config import DecoderConfig, EncoderConfig, ModelConfig
from captioner.encoder import preprocessing_for
from captioner.model import CaptionModel
from captioner.vocab import Vocabulary

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENE_WORDS = "a an the red green blue yellow circle square triangle circles squares triangles small large".split()  # noqa: SIM905


def shared_dir() -> Path | None:
    """The ``shared`` folder beside the checkout (or $CAPTIONER_SHARED), if present."""
    candidate = Path(os.environ.get("CAPTIONER_SHARED") or REPO_ROOT.parent / "shared")
    return candidate if candidate.is_dir() else None


@contextlib.contextmanager
def http_stand_in(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """Serve ``handler`` on a free loopback port in a thread; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def tiny_config(vocab_size: int, **decoder: object) -> ModelConfig:
    """EfficientNet-Lite0 without pretrained weights (fast to build) and a small decoder."""
    dims = {"embed_dim": 16, "attention_dim": 16, "hidden_dim": 32, "dropout": 0.0} | decoder
    return ModelConfig(
        encoder=EncoderConfig(backbone="efficientnet_lite0", weights=None),
        decoder=DecoderConfig(vocab_size=vocab_size, feature_dim=1280, **dims),  # type: ignore[arg-type]
    )


def make_model_dir(path: Path, seed: int = 0, **decoder: object) -> Path:
    """Save a random-weight model with a small scene vocabulary into ``path``."""
    torch.manual_seed(seed)
    vocabulary = Vocabulary.build([SCENE_WORDS], min_count=1)
    config = tiny_config(len(vocabulary), **decoder)
    model = CaptionModel(config, pretrained_encoder=False)
    info = ModelInfo(
        name="tiny-test",
        version="0",
        config=config,
        vocabulary=vocabulary,
        preprocessing=preprocessing_for(config.encoder),
        provenance={"data": "none: random weights for tests"},
    )
    return save_model(path, model, info)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny")
