"""The captioning model: encoder + decoder, built from a ``ModelConfig``."""

from __future__ import annotations

import torch
from torch import nn

from captioner.config import ModelConfig
from captioner.decoder import Decoder
from captioner.encoder import Encoder


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig, pretrained_encoder: bool = True) -> None:
        """``pretrained_encoder=False`` skips loading ImageNet weights, for a checkpoint that brings its own."""
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder, pretrained=pretrained_encoder)
        if self.encoder.channels != config.decoder.feature_dim:
            raise ValueError(
                f"decoder.feature_dim is {config.decoder.feature_dim} but {config.encoder.backbone} "
                f"gives {self.encoder.channels} channels"
            )
        self.decoder = Decoder(config.decoder)

    def forward(self, pixels: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits (B, T-1, V) and attention (B, T-1, R) for images (B, 3, S, S)."""
        features = self.encoder(pixels)  # (B, R, C)
        return self.decoder(features, captions)
