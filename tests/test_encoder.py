"""The backbone registry: shapes, preprocessing, offline pretrained weights, freezing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from captioner.config import EncoderConfig
from captioner.encoder import (
    BACKBONES,
    Encoder,
    activations_in_place,
    build_lite_classifier,
    feature_dim_for,
    fold_batch_norms,
    grid_size_for,
    pad_inside_convolutions,
    preprocessing_for,
)

# (backbone, image size, grid, channels) as documented in the registry: ResNets pool a 448 px input to
# 14x14, the others keep their natural stride-32 grid.
EXPECTED = {
    "resnet50": (448, 14, 2048),
    "resnet101": (448, 14, 2048),
    "resnet152": (448, 14, 2048),
    "mobilenet_v3_large": (224, 7, 960),
    "efficientnet_b0": (224, 7, 1280),
    "efficientnet_b1": (240, 8, 1280),
    "efficientnet_b2": (288, 9, 1408),
    "efficientnet_b3": (300, 10, 1536),
    "convnext_tiny": (224, 7, 768),
    "efficientnet_lite0": (224, 7, 1280),
    "efficientnet_lite1": (240, 8, 1280),
    "efficientnet_lite2": (260, 9, 1280),
}


# Channels of each backbone's last stride-16 feature map, added to a region's feature by fine_grid.
FINE_CHANNELS = {
    "resnet50": 1024,
    "resnet101": 1024,
    "resnet152": 1024,
    "mobilenet_v3_large": 112,
    "efficientnet_b0": 112,
    "efficientnet_b1": 112,
    "efficientnet_b2": 120,
    "efficientnet_b3": 136,
    "convnext_tiny": 384,
    "efficientnet_lite0": 112,
    "efficientnet_lite1": 112,
    "efficientnet_lite2": 120,
}


def test_the_registry_is_the_documented_one() -> None:
    assert set(BACKBONES) == set(EXPECTED) == set(FINE_CHANNELS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_backbone_builds_and_returns_batch_regions_channels(name: str) -> None:
    size, grid, channels = EXPECTED[name]
    config = EncoderConfig(backbone=name, weights=None)
    assert preprocessing_for(config).image_size == size
    encoder = Encoder(config).eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, size, size))
    assert features.shape == (2, grid * grid, channels)
    assert encoder.frozen and encoder.grid_size == grid


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_fine_grid_holds_the_last_maps_cell_then_a_stride_16_feature_of_its_own(name: str) -> None:
    size, grid, channels = EXPECTED[name]
    plain = Encoder(EncoderConfig(backbone=name, weights=None)).eval()
    config = EncoderConfig(backbone=name, weights=None, fine_grid=True)
    fine = Encoder(config).eval()
    fine.load_state_dict(plain.state_dict())  # the same parameter names: checkpoints need no renaming
    assert grid_size_for(config) == fine.grid_size == 2 * grid
    assert feature_dim_for(config) == fine.channels == channels + FINE_CHANNELS[name]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        coarse, regions = plain(pixels), fine(pixels)  # (1, g*g, C), (1, 4*g*g, C + C16)
    assert regions.shape == (1, (2 * grid) ** 2, channels + FINE_CHANNELS[name])
    cells = regions.reshape(2 * grid, 2 * grid, -1)  # (2g, 2g, C + C16)
    upsampled = coarse.reshape(grid, grid, channels).repeat_interleave(2, 0).repeat_interleave(2, 1)  # (2g, 2g, C)
    torch.testing.assert_close(cells[..., :channels], upsampled)
    # The stride-16 part differs between the four fine cells of a coarse one: it is not upsampled.
    local = cells[..., channels:].reshape(grid, 2, grid, 2, -1)  # (g, 2, g, 2, C16)
    # (Relative: some randomly initialised trunks scale their activations down to 1e-9.)
    assert (local[:, 0, :, 0] - local[:, 1, :, 1]).abs().amax() > 1e-3 * local.abs().amax()


def test_lite0s_fine_grid_reads_the_last_block_at_stride_16() -> None:
    plain = Encoder(EncoderConfig(weights="packaged")).eval()
    fine = Encoder(EncoderConfig(weights="packaged", fine_grid=True)).eval()
    tapped = {}
    plain.body.net._blocks[10].register_forward_hook(lambda module, inputs, output: tapped.update(map=output))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain(pixels)
        regions = fine(pixels)  # (2, 196, 1392)
    expected = tapped["map"].flatten(2).transpose(1, 2)  # (2, 196, 112)
    assert expected.shape == (2, 196, 112)
    torch.testing.assert_close(regions[..., 1280:], expected)


def test_grid_and_image_size_are_configurable() -> None:
    config = EncoderConfig(backbone="efficientnet_lite0", weights=None, grid_size=4)
    assert grid_size_for(config) == 4
    with torch.no_grad():
        assert Encoder(config)(torch.randn(1, 3, 224, 224)).shape == (1, 16, 1280)
    resized = EncoderConfig(backbone="mobilenet_v3_large", weights=None, image_size=320)
    assert preprocessing_for(resized).image_size == 320 and grid_size_for(resized) == 10


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        Encoder(EncoderConfig(backbone="vgg", weights=None))


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_classify_a_photo_with_their_packaged_weights_offline(variant: str) -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    classifier = build_lite_classifier(variant, "packaged").eval()
    preprocessing = preprocessing_for(EncoderConfig(backbone=variant))  # each variant's own input size
    photo = Image.fromarray(skimage_data.chelsea())  # a tabby cat
    with torch.no_grad():
        probabilities = classifier(preprocessing(photo).unsqueeze(0)).softmax(dim=1)[0]
    cats = list(range(281, 286))
    assert int(probabilities.argmax()) in cats
    assert float(probabilities[cats].sum()) > 0.8
    untrained = build_lite_classifier(variant, None).eval()
    with torch.no_grad():
        guess = untrained(preprocessing(photo).unsqueeze(0)).softmax(dim=1)[0]
    assert float(guess[cats].sum()) < 0.1, "without the packaged weights the trunk knows no cats"


def test_lite0_classifies_a_photo_with_its_packaged_imagenet_weights_offline() -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    classifier = build_lite_classifier("efficientnet_lite0", "packaged").eval()
    preprocessing = preprocessing_for(EncoderConfig())
    photo = Image.fromarray(skimage_data.chelsea())  # a tabby cat
    with torch.no_grad():
        probabilities = classifier(preprocessing(photo).unsqueeze(0)).softmax(dim=1)[0]
    cats = list(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(probabilities.argmax()) in cats
    assert float(probabilities[cats].sum()) > 0.8
    # The captioning encoder uses the same trunk with the head removed.
    encoder = Encoder(EncoderConfig(weights="packaged")).eval()
    assert not any("_fc" in name for name, _ in encoder.named_parameters())
    with torch.no_grad():
        expected = classifier.extract_features(preprocessing(photo).unsqueeze(0)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(encoder(preprocessing(photo).unsqueeze(0)), expected)


def test_fine_tuning_unfreezes_only_the_last_stages_and_batch_norm_stays_in_eval() -> None:
    encoder = Encoder(EncoderConfig(backbone="resnet50", weights=None, fine_tune_stages=1))
    trainable = {name.split(".")[1] for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"4"}, "only layer4 (the last stage of body) should train"
    encoder.train()
    assert not any(m.training for m in encoder.body.modules()), "batch norm keeps its ImageNet statistics"
    with pytest.raises(ValueError, match="fine_tune_stages"):
        encoder.set_fine_tuning(6)


def test_preprocessing_squashes_the_whole_image_and_normalises() -> None:
    preprocessing = preprocessing_for(EncoderConfig(backbone="resnet50"))
    image = Image.new("RGB", (640, 100), (255, 0, 0))
    image.paste((0, 0, 255), (600, 0, 640, 100))  # a blue strip at the far right must survive
    pixels = preprocessing(image)
    assert pixels.shape == (3, 448, 448)
    red = (1.0 - 0.485) / 0.229
    assert pixels[0, 200, 10].item() == pytest.approx(red, abs=1e-4)
    assert pixels[2, 200, -1].item() > 2.0, "no centre crop: the right edge is still in the input"


def _randomise_batch_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                n = norm.num_features
                norm.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                norm.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                norm.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                norm.bias.copy_(torch.rand(n, generator=generator) - 0.5)


def _batch_norms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize(
    ("name", "fine_grid"),
    [(name, False) for name in sorted(EXPECTED)] + [("efficientnet_lite0", True), ("mobilenet_v3_large", True)],
)
def test_prepared_for_inference_every_backbone_computes_the_same_features(name: str, fine_grid: bool) -> None:
    config = EncoderConfig(backbone=name, weights=None, fine_grid=fine_grid)
    reference = Encoder(config).eval()
    _randomise_batch_norms(reference)
    prepared = Encoder(config)
    prepared.load_state_dict(reference.state_dict())
    prepared.prepare_for_inference()
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(pixels), prepared(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert got.is_contiguous(), "features come out (B, R, C) contiguous whatever the CNN's layout"
    assert _batch_norms(prepared) == 0, "every batch norm of these CNNs follows a convolution and is folded"
    conv = next(m for m in prepared.body.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


class _SharedConvolution(torch.nn.Module):
    """A convolution read by a batch norm and by a skip connection, and a norm after an addition."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(3)
        self.after_sum = torch.nn.BatchNorm2d(3)
        self.second = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.second_norm = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.after_sum(self.norm(y) + y)
        return self.second_norm(self.second(z))


def test_folding_only_touches_a_norm_that_is_the_only_reader_of_a_convolution() -> None:
    net = _SharedConvolution().eval()
    _randomise_batch_norms(net)
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(pixels)
        assert fold_batch_norms(net) == 1
        torch.testing.assert_close(net(pixels), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(net.second_norm, torch.nn.Identity) and net.second.bias is not None
    assert isinstance(net.norm, torch.nn.BatchNorm2d) and isinstance(net.after_sum, torch.nn.BatchNorm2d)


def test_only_a_frozen_encoder_is_prepared_for_inference() -> None:
    encoder = Encoder(EncoderConfig(backbone="efficientnet_lite0", weights=None, fine_tune_stages=1))
    with pytest.raises(ValueError, match="frozen"):
        encoder.prepare_for_inference()
    assert _batch_norms(encoder) > 0, "a refused encoder is left as it was"


class _DataDependent(torch.nn.Module):
    """Control flow on a tensor's value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.norm = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return y if bool(y.sum() > 0) else -y


def test_a_cnn_that_cannot_be_traced_is_left_as_it_is() -> None:
    net = _DataDependent().eval()
    _randomise_batch_norms(net)
    pixels = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net(pixels)
        assert fold_batch_norms(net) == 0
        torch.testing.assert_close(net(pixels), expected)
    assert isinstance(net.norm, torch.nn.BatchNorm2d)


def test_lite0_convolutions_take_over_their_symmetric_padding_and_compute_the_same() -> None:
    torch.manual_seed(5)
    original = build_lite_classifier("efficientnet_lite0", None).eval()
    moved = build_lite_classifier("efficientnet_lite0", None).eval()
    moved.load_state_dict(original.state_dict())
    assert pad_inside_convolutions(moved) == 12  # every stride-1 convolution with a kernel above 1x1
    assert moved.state_dict().keys() == original.state_dict().keys(), "checkpoints keep their names"
    pads = [m for m in moved.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert len(pads) == 5 and all(pad.padding[0] != pad.padding[1] for pad in pads), "strided ones keep theirs"
    for size in (224, 256):
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(moved.extract_features(pixels), original.extract_features(pixels))


class _Activations(torch.nn.Module):
    """A ReLU called twice on fresh convolution outputs, one whose convolution also feeds a skip
    connection, and one called once on a fresh output and once on the network's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3, self.conv4 = (torch.nn.Conv2d(3, 3, 1) for _ in range(4))
        self.twice_fresh = torch.nn.ReLU()
        self.beside_skip = torch.nn.ReLU6()
        self.once_on_input = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.twice_fresh(self.conv1(x))
        y = self.twice_fresh(self.conv2(y))
        z = self.conv3(y)
        y = self.beside_skip(z) + z
        return self.once_on_input(self.conv4(y)) + self.once_on_input(x)


def test_activations_run_in_place_only_where_nothing_else_reads_their_input() -> None:
    net = _Activations().eval()
    pixels = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = net(pixels.clone())
        assert activations_in_place(net) == 1
        given = pixels.clone()
        torch.testing.assert_close(net(given), expected)
    assert torch.equal(given, pixels), "the network's input is never overwritten"
    assert net.twice_fresh.inplace and not net.beside_skip.inplace and not net.once_on_input.inplace


def test_a_prepared_lite0_runs_its_activations_in_place() -> None:
    encoder = Encoder(EncoderConfig(backbone="efficientnet_lite0", weights=None))
    relus = [m for m in encoder.modules() if isinstance(m, torch.nn.ReLU6)]
    assert relus and not any(m.inplace for m in relus)
    encoder.prepare_for_inference()
    assert all(m.inplace for m in relus)


@pytest.mark.parametrize(
    ("name", "stages"),
    [("efficientnet_lite0", 1), ("efficientnet_lite0", 2), ("efficientnet_lite0", 7), ("efficientnet_lite0", 18),
     ("resnet50", 1), ("mobilenet_v3_large", 3)],
)  # fmt: skip
def test_the_trainable_stages_finish_what_the_frozen_ones_leave_into_the_same_features(name: str, stages: int) -> None:
    encoder = Encoder(EncoderConfig(backbone=name, weights=None, fine_tune_stages=stages)).eval()
    _randomise_batch_norms(encoder)
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = encoder(pixels)  # (2, R, C)
        cached = encoder.encode_frozen(pixels)  # (2, C', h, w)
        got = encoder.encode_trainable(cached)
    assert cached.dim() == 4 and (stages < len(encoder._stages) or torch.equal(cached, pixels))
    torch.testing.assert_close(got, expected)
    # A cache is filled by a frozen, prepared copy told how many stages the run trains.
    prepared = Encoder(EncoderConfig(backbone=name, weights=None))
    prepared.load_state_dict(encoder.state_dict())
    prepared.prepare_for_inference()
    with torch.no_grad():
        from_prepared = prepared.encode_frozen(pixels, stages)
    torch.testing.assert_close(from_prepared, cached, rtol=1e-4, atol=1e-4 * float(cached.abs().max()))


def test_a_frozen_encoder_caches_its_features_and_a_fine_grid_cannot_cache_a_cut() -> None:
    encoder = Encoder(EncoderConfig(backbone="efficientnet_lite0", weights=None)).eval()
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = encoder.encode_frozen(pixels)
        assert torch.equal(cached, encoder(pixels)) and encoder.encode_trainable(cached) is cached
    fine = Encoder(EncoderConfig(backbone="efficientnet_lite0", weights=None, fine_grid=True, fine_tune_stages=1))
    for call in (lambda: fine.encode_frozen(pixels), lambda: fine.encode_trainable(torch.zeros(1, 320, 2, 2))):
        with pytest.raises(ValueError, match="fine_grid"):
            call()
