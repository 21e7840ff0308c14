"""Tests for captioner.images.load_image: every colour mode, every source type, every way input goes bad.

All images are generated here (the large ones by bench/image_decode.py, which times the same files), so
the expected pixels follow from how each image was drawn.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import struct
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import GifImagePlugin, Image, ImageFile, TiffImagePlugin, features

from captioner.config import EncoderConfig
from captioner.encoder import Encoder, build_lite_classifier, preprocessing_for
from captioner.errors import ImageError
from captioner.images import DEFAULT_MAX_PIXELS, load_image
from tests.test_bench import load_bench

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

WIDTH, HEIGHT = 32, 16
LEFT, RIGHT = (8, 8), (24, 8)  # centres of the two 16x16 halves (whole JPEG blocks, so colours stay clean)
WHITE, RED, BLUE, GREEN = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 255, 0)
BRICK, COBALT = (200, 30, 40), (20, 60, 220)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _halves(mode: str, left: object, right: object) -> Image.Image:
    """A WIDTH x HEIGHT image whose left half is ``left`` and right half ``right``."""
    image = Image.new(mode, (WIDTH, HEIGHT), left)
    image.paste(right, (WIDTH // 2, 0, WIDTH, HEIGHT))
    return image


def _palette_halves(transparent_index: int | None) -> Image.Image:
    """A palette image: index 0 (black) on the left, index 1 (red) on the right."""
    image = _halves("P", 0, 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    if transparent_index is not None:
        image.info["transparency"] = transparent_index
    return image


def _noise(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _png_claiming(width: int, height: int, scanlines: bytes = b"\x00" * 16) -> bytes:
    """A structurally valid 8-bit grayscale PNG whose IHDR claims ``width`` x ``height``.

    Each chunk carries a correct CRC, so PIL accepts the header; ``scanlines`` is the (tiny)
    uncompressed pixel data put into IDAT.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")


def _animated(fmt: str, **options: object) -> bytes:
    first = _halves("RGB", RED, BLUE)
    later = Image.new("RGB", (WIDTH, HEIGHT), GREEN)
    return _encode(first, fmt, save_all=True, append_images=[later], duration=100, **options)


def _assert_colour(image: Image.Image, point: tuple[int, int], expected: tuple[int, int, int], tol: int) -> None:
    actual = image.getpixel(point)
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)), (point, actual, expected)


# --- colour modes -----------------------------------------------------------------------------------

# (source factory, expected colour at LEFT, expected colour at RIGHT, tolerance for lossy formats)
MODE_CASES: dict[str, tuple[Callable[[], object], tuple[int, int, int], tuple[int, int, int], int]] = {
    "RGBA transparent over white": (
        lambda: _encode(_halves("RGBA", (0, 0, 0, 0), (255, 0, 0, 255)), "PNG"),
        WHITE,
        RED,
        0,
    ),
    "LA transparent over white": (lambda: _encode(_halves("LA", (0, 0), (40, 255)), "PNG"), WHITE, (40, 40, 40), 0),
    "La premultiplied": (lambda: _halves("La", (0, 0), (90, 255)), WHITE, (90, 90, 90), 0),
    "P with transparency (PNG)": (lambda: _encode(_palette_halves(0), "PNG"), WHITE, RED, 0),
    "P with transparency (GIF)": (lambda: _encode(_palette_halves(0), "GIF", transparency=0), WHITE, RED, 0),
    "P": (lambda: _encode(_palette_halves(None), "PNG"), (0, 0, 0), RED, 0),
    "RGB with colour-key transparency": (
        lambda: _encode(_halves("RGB", GREEN, RED), "PNG", transparency=GREEN),
        WHITE,
        RED,
        0,
    ),
    "L": (lambda: _encode(_halves("L", 0, 200), "PNG"), (0, 0, 0), (200, 200, 200), 0),
    "1": (lambda: _encode(_halves("1", 0, 1), "PNG"), (0, 0, 0), WHITE, 0),
    "CMYK JPEG": (
        lambda: _encode(_halves("CMYK", (255, 0, 0, 0), (0, 255, 255, 0)), "JPEG", quality=95),
        (0, 255, 255),
        RED,
        12,
    ),
    "YCbCr TIFF": (lambda: _encode(_halves("RGB", RED, BLUE).convert("YCbCr"), "TIFF"), RED, BLUE, 4),
    "YCbCr image": (lambda: _halves("RGB", RED, BLUE).convert("YCbCr"), RED, BLUE, 4),
    # 8-bit LAB is coarse at the edge of the sRGB gamut, so these use colours well inside it.
    "LAB TIFF": (lambda: _encode(_halves("RGB", BRICK, COBALT).convert("LAB"), "TIFF"), BRICK, COBALT, 4),
    "LAB image": (lambda: _halves("RGB", BRICK, COBALT).convert("LAB"), BRICK, COBALT, 4),
    "HSV image": (lambda: _halves("RGB", RED, BLUE).convert("HSV"), RED, BLUE, 4),
    "animated GIF (first frame)": (lambda: _animated("GIF"), RED, BLUE, 0),
    "APNG (first frame)": (lambda: _animated("PNG"), RED, BLUE, 0),
    "animated WebP (first frame)": (lambda: _animated("WEBP", lossless=True), RED, BLUE, 0),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_rgb(case: str) -> None:
    make, left, right, tol = MODE_CASES[case]
    image = load_image(make())
    assert image.mode == "RGB"
    assert image.size == (WIDTH, HEIGHT)
    _assert_colour(image, LEFT, left, tol)
    _assert_colour(image, RIGHT, right, tol)


def test_partial_transparency_is_blended_with_white() -> None:
    # Alpha 102/255 = 0.4: 40 % blue over 60 % white.
    image = load_image(_encode(Image.new("RGBA", (4, 4), (0, 0, 255, 102)), "PNG"))
    _assert_colour(image, (1, 1), (153, 153, 255), 1)


def _gradient(dtype: str, start: float, step: float) -> np.ndarray:
    """Four identical rows rising linearly over 65 columns."""
    return np.repeat((start + np.arange(65) * step).astype(dtype)[None, :], 4, axis=0)


# Deep grayscale gradients that use only part of their type's range (12 of 16 bits, negative
# integers, floats in 0..1): stretching by the actual range maps them onto the full 0..255.
GRADIENTS: dict[str, Callable[[], object]] = {
    "I;16 PNG": lambda: _encode(Image.fromarray(_gradient("uint16", 1000, 60)), "PNG"),
    "I;16B image": lambda: Image.fromarray(_gradient(">u2", 1000, 60)),
    "I TIFF": lambda: _encode(Image.fromarray(_gradient("int32", -70000, 3000)), "TIFF"),
    "F TIFF": lambda: _encode(Image.fromarray(_gradient("float32", 0.0, 1 / 64)), "TIFF"),
}


@pytest.mark.parametrize("case", list(GRADIENTS))
def test_deep_grayscale_is_stretched_over_its_range(case: str) -> None:
    image = load_image(GRADIENTS[case]())
    assert image.mode == "RGB"
    assert image.size == (65, 4)
    row = np.asarray(image)[0]
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 0] == row[:, 2]).all()  # still gray
    expected = np.arange(65) * 255 / 64
    assert np.abs(row[:, 0] - expected).max() <= 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.full((4, 4), 65535, dtype=np.uint16), 255),  # a constant positive image is white...
        (np.zeros((4, 4), dtype=np.uint16), 0),  # ...and zero is black,
        (np.full((4, 4), 0.5, dtype=np.float32), 128),  # a float constant sits within 0..1,
        (np.full((4, 4), np.nan, dtype=np.float32), 0),  # and an image with no numbers at all is black.
    ],
    ids=["uint16-max", "uint16-zero", "float-half", "float-nan"],
)
def test_constant_deep_grayscale(values: np.ndarray, expected: int) -> None:
    image = load_image(Image.fromarray(values))
    assert (np.asarray(image) == expected).all()


def test_non_finite_floats_do_not_disturb_the_range() -> None:
    values = np.array([[0.0, 1.0, np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    image = load_image(Image.fromarray(values))
    assert np.asarray(image)[0, :, 0].tolist() == [0, 255, 0, 255, 0, 128]


# --- EXIF orientation -------------------------------------------------------------------------------


def _oriented_jpeg(orientation: int, exif_patch: tuple[bytes, bytes] | None = None) -> bytes:
    """A 48x32 blue JPEG with a red 16x16 marker at its stored top-left corner."""
    image = Image.new("RGB", (48, 32), BLUE)
    image.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Camera"
    exif_bytes = exif.tobytes()
    if exif_patch is not None:
        assert exif_bytes.count(exif_patch[0]) == 1
        exif_bytes = exif_bytes.replace(*exif_patch)
    return _encode(image, "JPEG", quality=95, exif=exif_bytes)


# Where the stored top-left marker must appear once the image is shown as the tag says.
ORIENTATIONS = [
    (1, (48, 32), (8, 8), (40, 24)),  # as stored
    (3, (48, 32), (40, 24), (8, 8)),  # rotated 180 degrees: marker bottom-right
    (6, (32, 48), (24, 8), (8, 8)),  # stored rotated 90 degrees counter-clockwise: marker top-right
    (8, (32, 48), (8, 40), (8, 8)),  # stored rotated 90 degrees clockwise: marker bottom-left
]


@pytest.mark.parametrize(("orientation", "size", "marker", "elsewhere"), ORIENTATIONS)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], marker: tuple[int, int], elsewhere: tuple[int, int]
) -> None:
    image = load_image(_oriented_jpeg(orientation))
    assert image.size == size
    _assert_colour(image, marker, RED, 16)
    _assert_colour(image, elsewhere, BLUE, 16)
    assert image.info == {}  # the orientation is in the pixels now; a leftover tag would rotate again


def test_exif_orientation_is_applied_to_a_pil_image_without_changing_it() -> None:
    source = Image.open(io.BytesIO(_oriented_jpeg(6)))
    image = load_image(source)
    assert image.size == (32, 48)
    _assert_colour(image, (24, 8), RED, 16)
    assert source.size == (48, 32)
    assert source.getexif()[0x0112] == 6


def test_malformed_exif_still_rotates() -> None:
    # Turning the "Make" tag (ASCII) into "ExtraSamples" (which must be numeric) leaves a tag that
    # cannot be written back; the orientation next to it is intact and must still be honoured.
    data = _oriented_jpeg(6, exif_patch=(b"\x01\x0f\x00\x02", b"\x01\x52\x00\x02"))
    image = load_image(data)
    assert image.size == (32, 48)
    _assert_colour(image, (24, 8), RED, 16)


# --- source types -----------------------------------------------------------------------------------


class _ReadOnlyStream:
    """A stream that can only be read (no seek/tell), like a socket or a pipe."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._buffer.read(size)


def _source(kind: str, data: bytes, path: Path) -> object:
    if kind == "str path":
        return str(path)
    if kind == "Path":
        return path
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(data)
    if kind == "BytesIO":
        return io.BytesIO(data)
    if kind == "read-only stream":
        return _ReadOnlyStream(data)
    assert kind == "PIL image"
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize(
    "kind", ["str path", "Path", "bytes", "bytearray", "memoryview", "BytesIO", "read-only stream", "PIL image"]
)
def test_source_types(kind: str, tmp_path: Path) -> None:
    original = _noise()
    data = _encode(original, "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    image = load_image(_source(kind, data, path))
    assert image.mode == "RGB"
    assert image.tobytes() == original.tobytes()


def test_open_binary_file(tmp_path: Path) -> None:
    original = _noise()
    path = tmp_path / "picture.png"
    original.save(path)
    with path.open("rb") as fh:
        assert load_image(fh).tobytes() == original.tobytes()


def test_file_object_is_read_from_its_current_position() -> None:
    original = _noise()
    stream = io.BytesIO(b"multipart preamble" + _encode(original, "PNG"))
    stream.seek(len(b"multipart preamble"))
    assert load_image(stream).tobytes() == original.tobytes()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_pil_image_is_not_mutated(mode: str) -> None:
    source = _noise().convert(mode)
    source.info["comment"] = "kept"
    before = (source.mode, source.size, source.tobytes(), dict(source.info))
    image = load_image(source)
    image.paste((1, 2, 3), (0, 0, WIDTH, HEIGHT))  # the result must not share pixels with the source
    assert (source.mode, source.size, source.tobytes(), dict(source.info)) == before
    assert image is not source


@pytest.mark.parametrize("source", [12345, None, ["picture.png"]], ids=["int", "None", "list"])
def test_unsupported_source_type_is_a_type_error(source: object) -> None:
    with pytest.raises(TypeError, match="image source"):
        load_image(source)  # type: ignore[arg-type]


def test_text_mode_file_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="binary mode"):
        load_image(io.StringIO("not bytes"))  # type: ignore[arg-type]


# --- bad input ----------------------------------------------------------------------------------------


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_gif_body() -> bytes:
    gif = _encode(_noise().convert("P"), "GIF")
    # Keep the header, the global palette and the start of the image descriptor; scramble the
    # LZW-compressed pixels that follow.
    keep = 13 + 256 * 3 + 12
    body = bytes((b * 7 + 3) & 0xFF for b in gif[keep:-1])
    return gif[:keep] + body + gif[-1:]


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return str(path)


# (source factory, expected code, text the message must contain)
BAD_INPUTS: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "zero bytes": (lambda tmp: b"", "empty", "empty"),
    "empty file": (_empty_file, "empty", "empty"),
    "empty stream": (lambda tmp: io.BytesIO(), "empty", "empty"),
    "text": (lambda tmp: b"This is a plain text file, not a picture.\n" * 4, "not_an_image", "not a recognised"),
    "format not accepted (PCX)": (lambda tmp: _encode(_noise(), "PCX"), "not_an_image", "not a recognised"),
    "truncated JPEG": (lambda tmp: _first_half(_encode(_noise(64, 64), "JPEG")), "truncated", "truncated"),
    "truncated PNG": (lambda tmp: _first_half(_encode(_noise(64, 64), "PNG")), "truncated", "truncated"),
    "truncated WebP": (lambda tmp: _first_half(_encode(_noise(64, 64), "WEBP")), "truncated", "truncated"),
    "truncated GIF": (lambda tmp: _first_half(_encode(_noise(64, 64).convert("P"), "GIF")), "truncated", "truncated"),
    "PNG signature, broken header": (lambda tmp: b"\x89PNG\r\n\x1a\n" + b"\xff" * 40, "undecodable", "PNG"),
    "GIF with corrupt body": (lambda tmp: _corrupt_gif_body(), "undecodable", "decoded"),
    "PNG claiming 60000x60000": (lambda tmp: _png_claiming(60000, 60000), "too_many_pixels", "too large"),
    "nonexistent path": (lambda tmp: tmp / "missing.jpg", "unreadable", "missing.jpg"),
    "nonexistent str path": (lambda tmp: str(tmp / "missing.jpg"), "unreadable", "missing.jpg"),
    "directory": (lambda tmp: tmp, "unreadable", "directory"),
    "FIFO": (_fifo, "unreadable", "not a regular file"),
    "NUL in path": (lambda tmp: str(tmp / "a\0b.png"), "unreadable", "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_image_error(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, code, needle = BAD_INPUTS[case]
    # Truncation must be detected by load_image itself, not left to whatever this flag happens to be.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    source = make(tmp_path)
    with pytest.raises(ImageError) as caught:  # any other exception type fails the test
        load_image(source)
    error = caught.value
    assert error.code == code
    assert needle in error.message
    assert error.message.strip()
    assert "\n" not in error.message and "Traceback" not in error.message and 'File "' not in error.message


def test_unreadable_path_message_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "holiday photos" / "beach.jpg"
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert str(path) in caught.value.message


def test_lazily_opened_truncated_pil_image() -> None:
    source = Image.open(io.BytesIO(_first_half(_encode(_noise(64, 64), "PNG"))))
    with pytest.raises(ImageError) as caught:
        load_image(source)
    assert caught.value.code == "truncated"


def test_crafted_png_is_valid_when_its_data_fits() -> None:
    # The oversized PNGs below are refused because of their size, not because the crafting is broken:
    # the same construction with matching data loads (4 rows of a filter byte and 4 pixels).
    image = load_image(_png_claiming(4, 4, scanlines=(b"\x00" + b"\x80" * 4) * 4))
    assert image.size == (4, 4)
    assert (np.asarray(image) == 128).all()


# --- pixel limit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"),
    [(60000, 60000), (8000, 6000)],
    ids=["beyond PIL's own bomb limit", "between DEFAULT_MAX_PIXELS and PIL's limit"],
)
def test_oversized_header_is_refused_before_decoding(width: int, height: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert width * height > DEFAULT_MAX_PIXELS
    decoded: list[object] = []
    original_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        decoded.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = _png_claiming(width, height)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as caught:
            load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "too_many_pixels"
    assert decoded == []
    assert peak < 50 * 1024 * 1024


@pytest.mark.parametrize("as_errors", [False, True], ids=["warning shown", "warnings are errors"])
def test_pil_decompression_bomb_warning_range_is_refused(as_errors: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between MAX_IMAGE_PIXELS and twice that, PIL only warns; load_image must refuse the image even
    # when the caller allows more pixels, and whether or not warnings are turned into errors.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    data = _png_claiming(8000, 8000)  # 64 M pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error" if as_errors else "ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as caught:
            load_image(data, max_pixels=10**9)
    assert caught.value.code == "too_many_pixels"
    assert "50,000,000" in caught.value.message  # the limit in force, in the project's words
    _assert_not_pils_words(caught.value.message)


def _assert_not_pils_words(message: str) -> None:
    """PIL's own texts (its bomb warning, its limit, its plugin names) must not reach the user."""
    for pils in ("decompression bomb", "DOS attack", "178956970", "178,956,970", "Plugin"):
        assert pils.lower() not in message.lower(), message


def test_pils_bomb_error_is_reported_with_the_projects_limit() -> None:
    # 60000x60000 is beyond twice MAX_IMAGE_PIXELS, so PIL raises while opening, before our own check.
    with pytest.raises(ImageError) as caught:
        load_image(_png_claiming(60000, 60000))
    assert caught.value.code == "too_many_pixels"
    assert f"{DEFAULT_MAX_PIXELS:,}" in caught.value.message
    _assert_not_pils_words(caught.value.message)


@pytest.mark.parametrize("as_pil_image", [False, True], ids=["bytes", "PIL image"])
def test_max_pixels_is_respected(as_pil_image: bool) -> None:
    image = _noise(100, 100)
    source = image if as_pil_image else _encode(image, "PNG")
    with pytest.raises(ImageError) as caught:
        load_image(source, max_pixels=5000)
    assert caught.value.code == "too_many_pixels"
    assert "100x100" in caught.value.message
    assert load_image(source, max_pixels=10_000).size == (100, 100)  # the bound itself is allowed


@pytest.mark.parametrize("max_pixels", [0, -5, 2.5, True, "100"])
def test_invalid_max_pixels(max_pixels: object) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(_encode(_noise(), "PNG"), max_pixels=max_pixels)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["min_size", "max_decode_bytes"])
@pytest.mark.parametrize("value", [0, -5, 2.5, True, "100"])
def test_invalid_min_size_and_max_decode_bytes(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        load_image(_encode(_noise(), "PNG"), **{name: value})  # type: ignore[arg-type]


def test_global_pil_state_is_left_alone() -> None:
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters))
    for source in (
        _encode(_noise(), "JPEG"),
        _first_half(_encode(_noise(64, 64), "JPEG")),
        _png_claiming(60000, 60000),
        b"not an image",
    ):
        with contextlib.suppress(ImageError):
            load_image(source)
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS, list(warnings.filters)) == before


# --- fuzzing ------------------------------------------------------------------------------------------

FUZZ_SEEDS = {
    "PNG": _encode(_noise(24, 16), "PNG"),
    "JPEG": _encode(_noise(24, 16), "JPEG"),
    "GIF": _encode(_noise(24, 16).convert("P"), "GIF"),
    "WEBP": _encode(_noise(24, 16), "WEBP"),
    "TIFF": _encode(_noise(24, 16), "TIFF"),
    "BMP": _encode(_noise(24, 16), "BMP"),
}

Edit = tuple[str, int, int]  # (operation, position, byte value or length)


def _mutate(data: bytes, edits: list[Edit]) -> bytes:
    """Apply byte-level edits; positions wrap around so that every edit lands inside the data."""
    mutated = bytearray(data)
    for operation, position, value in edits:
        if not mutated:
            break
        index = position % len(mutated)
        if operation == "set":
            mutated[index] = value
        elif operation == "delete":
            del mutated[index : index + 1 + value % 64]
        else:
            mutated[index:index] = bytes([value]) * (1 + value % 8)
    return bytes(mutated)


def _load_or_image_error(data: bytes) -> None:
    """The only acceptable outcomes for arbitrary bytes: an RGB image or an ImageError, whether the
    image is decoded at full size or scaled for a model (min_size 8 has the JPEG decoder halve the seeds)."""
    for min_size in (None, 8):
        try:
            image = load_image(data, min_size=min_size)
        except ImageError as error:
            assert error.message.strip()
        else:
            assert image.mode == "RGB"
            assert image.width * image.height <= DEFAULT_MAX_PIXELS


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("fmt", list(FUZZ_SEEDS))
def test_seeded_mutations_never_escape(fmt: str) -> None:
    rng = random.Random(f"captioner-{fmt}")
    for _ in range(40):
        edits = [
            (rng.choice(["set", "delete", "insert"]), rng.randrange(1 << 16), rng.randrange(256))
            for _ in range(rng.randint(1, 6))
        ]
        _load_or_image_error(_mutate(FUZZ_SEEDS[fmt], edits))


if HAVE_HYPOTHESIS:

    @pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(
        fmt=st.sampled_from(["PNG", "JPEG"]),
        edits=st.lists(
            st.tuples(
                st.sampled_from(["set", "delete", "insert"]),
                st.integers(0, 1 << 16),
                st.integers(0, 255),
            ),
            min_size=1,
            max_size=8,
        ),
    )
    def test_hypothesis_mutations_never_escape(fmt: str, edits: list[Edit]) -> None:
        _load_or_image_error(_mutate(FUZZ_SEEDS[fmt], edits))

else:

    def test_hypothesis_mutations_never_escape() -> None:
        pytest.skip("hypothesis is not installed; test_seeded_mutations_never_escape covers the same ground")


# --- decoding for the model -----------------------------------------------------------------------
# Large inputs come from bench/image_decode.py, which times and measures the same files.

IMAGE_BENCH = load_bench("image_decode")
MODEL_INPUT = preprocessing_for(EncoderConfig())  # the shipped models' input: 224x224, mean and std about 0.5


@pytest.fixture(scope="module")
def phone_jpeg() -> bytes:
    return IMAGE_BENCH.phone_photo()  # 4032x3024, quality 90


@pytest.mark.parametrize(
    ("min_size", "size"),
    [(224, (504, 378)), (500, (1008, 756)), (1000, (2016, 1512)), (1600, (4032, 3024)), (None, (4032, 3024))],
)
def test_jpeg_is_scaled_by_its_decoder_to_the_smallest_size_at_least_min_size(
    phone_jpeg: bytes, min_size: int | None, size: tuple[int, int]
) -> None:
    # The DCT scales by 1/8, 1/4 or 1/2: 504x378 is the smallest size whose sides are at least 224;
    # for 1600 only the full size will do (1512 is short). Nothing is reduced after decoding, since
    # every result is below twice min_size.
    assert load_image(phone_jpeg, min_size=min_size).size == size


def test_reducing_by_tiles_gives_the_pixels_of_reducing_the_whole_image() -> None:
    original = _noise(3001, 2003, seed=3)  # 3x2 tiles; neither side a multiple of the tile or the factor
    image = load_image(_encode(original, "PNG", compress_level=1), min_size=224)
    # Each side stays at least twice min_size: 3001 // 448 = 6, 2003 // 448 = 4.
    assert image.size == (501, 501)
    assert image.tobytes() == original.reduce((6, 4)).tobytes()


def test_deep_grayscale_range_is_found_over_every_tile() -> None:
    # The lowest value is in the first tile and the highest in the last; a NaN, -inf and +inf in
    # other tiles must neither widen the range nor break it.
    values = np.tile(np.linspace(0.0, 1.0, 2100, dtype=np.float32), (1100, 1))
    values[5, 1500], values[1050, 50], values[600, 1100] = np.nan, -np.inf, np.inf
    grey = np.asarray(load_image(Image.fromarray(values)))[:, :, 0]
    expected = np.rint(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255)
    assert np.abs(grey - expected).max() <= 1
    assert (grey[5, 1500], grey[1050, 50], grey[600, 1100]) == (0, 0, 255)


def _photo_variants(jpeg: bytes) -> dict[str, bytes]:
    """The phone photo as each path through load_image sees it: scaled by the JPEG decoder (upright or
    stored sideways), and reduced after decoding (RGB, transparent, 16-bit grayscale)."""
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    transparent = photo.copy()
    transparent.putalpha(Image.linear_gradient("L").resize(photo.size))
    deep = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    return {
        "JPEG": jpeg,
        "JPEG stored sideways": _encode(photo, "JPEG", quality=90, exif=exif.tobytes()),
        "PNG": _encode(photo, "PNG", compress_level=1),
        "RGBA PNG": _encode(transparent, "PNG", compress_level=1),
        "16-bit grayscale PNG": _encode(deep, "PNG", compress_level=1),
    }


@pytest.mark.slow
def test_the_model_sees_the_same_picture_decoded_for_it(phone_jpeg: bytes) -> None:
    # Measured on this photo: a mean difference of 0.2 (reduced) to 0.36 (JPEG) grey levels, and a 99th
    # percentile of 1 to 3; pure noise, the worst case for any filter, gives a mean of 0.9. The next
    # test shows what such a difference does to the encoder's features.
    for name, data in _photo_variants(phone_jpeg).items():
        new = MODEL_INPUT(load_image(data, min_size=MODEL_INPUT.image_size)).numpy()
        old = MODEL_INPUT(load_image(data)).numpy()
        grey_levels = np.abs(new - old) * np.asarray(MODEL_INPUT.std, dtype=np.float32)[:, None, None] * 255
        assert grey_levels.mean() < 0.5, name
        assert np.percentile(grey_levels, 99) < 4, name


@pytest.mark.slow
def test_encoder_features_and_the_classifiers_answer_survive_decoding_for_the_model() -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    cat = np.asarray(Image.fromarray(skimage_data.chelsea()).resize((4032, 3024), Image.Resampling.BICUBIC))
    grain = np.random.default_rng(0).normal(0.0, 4.0, cat.shape)
    data = _encode(Image.fromarray(np.clip(cat + grain, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    pixels = torch.stack(
        [MODEL_INPUT(load_image(data, min_size=MODEL_INPUT.image_size)), MODEL_INPUT(load_image(data))]
    )
    encoder = Encoder(EncoderConfig(weights="packaged")).eval()
    classifier = build_lite_classifier("efficientnet_lite0", "packaged").eval()
    with torch.no_grad():
        new, old = encoder(pixels)
        labels = classifier(pixels).argmax(dim=1).tolist()
    # Measured: 0.044. Resizing the full image with bicubic instead of bilinear filtering moves the
    # features by 0.10, so this is well within what the choice of a resize filter already changes.
    assert float((new - old).norm() / old.norm()) < 0.06
    assert labels[0] == labels[1] and labels[0] in range(281, 286)  # the same cat


# --- the cost of an image -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_pil_image", [False, True], ids=["bytes", "lazily opened PIL image"])
def test_max_decode_bytes_is_respected_and_named(as_pil_image: bool) -> None:
    data = _encode(Image.new("RGBA", (100, 100)), "PNG")  # PIL holds it in 40,000 bytes

    def source() -> object:
        return Image.open(io.BytesIO(data)) if as_pil_image else data

    with pytest.raises(ImageError) as caught:
        load_image(source(), max_decode_bytes=39_999)
    assert caught.value.code == "too_costly"
    assert "39,999 bytes" in caught.value.message and "40,000 bytes" in caught.value.message
    assert load_image(source(), max_decode_bytes=40_000).size == (100, 100)


def test_a_decoded_pil_image_costs_no_decoding() -> None:
    image = Image.open(io.BytesIO(_encode(Image.new("RGBA", (100, 100)), "PNG")))
    image.load()
    assert load_image(image, max_decode_bytes=1).size == (100, 100)


def test_the_cost_of_a_jpeg_is_counted_at_the_size_it_is_decoded_at(phone_jpeg: bytes) -> None:
    # Full size, 4032x3024 takes 48.8 MB in PIL; scaled by 1/8 for the model, 0.8 MB.
    with pytest.raises(ImageError) as caught:
        load_image(phone_jpeg, max_decode_bytes=2**20)
    assert caught.value.code == "too_costly"
    assert load_image(phone_jpeg, max_decode_bytes=2**20, min_size=224).size == (504, 378)


def test_a_progressive_jpeg_costs_its_full_size_coefficients() -> None:
    photo = _noise(1000, 1000)
    baseline, progressive = _encode(photo, "JPEG"), _encode(photo, "JPEG", progressive=True)
    # Both decode at 125x125 (62,500 bytes), but the progressive one keeps 1000x1000x3 coefficients.
    assert load_image(baseline, min_size=100, max_decode_bytes=1_000_000).size == (125, 125)
    with pytest.raises(ImageError) as caught:
        load_image(progressive, min_size=100, max_decode_bytes=1_000_000)
    assert caught.value.code == "too_costly"
    assert load_image(progressive, min_size=100, max_decode_bytes=7_000_000).size == (125, 125)


@pytest.mark.parametrize(
    ("plugin", "make"),
    [
        (GifImagePlugin.GifImageFile, lambda: IMAGE_BENCH.many_frame_gif(5000, 64, 48)),
        (TiffImagePlugin.TiffImageFile, lambda: IMAGE_BENCH.many_page_tiff(3000, 64, 48)),
    ],
    ids=["5,000-frame GIF", "3,000-page TIFF"],
)
def test_only_the_first_frame_is_ever_read(
    plugin: type, make: Callable[[], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make()
    assert Image.open(io.BytesIO(data)).n_frames in (5000, 3000)  # the files are what they claim
    # Every way to another frame (seek, n_frames, is_animated, ImageSequence) goes through _seek.
    frames: list[int] = []
    original = plugin._seek

    def recording(self: ImageFile.ImageFile, frame: int, *args: object) -> None:
        frames.append(frame)
        original(self, frame, *args)

    monkeypatch.setattr(plugin, "_seek", recording)
    assert load_image(data, min_size=224).size == (64, 48)
    assert set(frames) == {0}


# --- hostile inputs -----------------------------------------------------------------------------------
# Small files that decode to the pixel limit (40 MP) or beyond what their format's decoder may spend.
# Each is decoded for the model in a Python process of its own, which reports the peak memory the
# decode added (bench/image_decode.py's measurement). Time is the benchmark's business, not a test's.

HOSTILE_OUTCOMES: dict[str, tuple[Callable[[], bytes], str | None]] = {  # (file, error code or None: decoded)
    "16-bit grey PNG, 40 MP": (IMAGE_BENCH.grey16_png, None),
    "RGBA PNG, 40 MP": (IMAGE_BENCH.rgba_png, None),
    "RGBA PNG, one row over the pixel limit": (lambda: IMAGE_BENCH.rgba_png(8000, 5001), "too_many_pixels"),
    "float TIFF, 40 MP": (IMAGE_BENCH.float_tiff, None),
    "deflate TIFF, 40 MP": (IMAGE_BENCH.deflate_tiff, None),
    "WebP, 40 MP": (IMAGE_BENCH.webp, "too_costly"),
    "WebP at the memory limit (4096x4096)": (lambda: IMAGE_BENCH.webp(4096, 4096), None),
    "AVIF, 40 MP": (IMAGE_BENCH.avif, "too_costly"),
    "AVIF at the memory limit (5464x4094)": (lambda: IMAGE_BENCH.avif(5464, 4094), None),
    "5,000-frame GIF, 40 MP": (IMAGE_BENCH.many_frame_gif, None),
    "3,000-page TIFF, 40 MP a page": (IMAGE_BENCH.many_page_tiff, None),
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")
@pytest.mark.parametrize("case", list(HOSTILE_OUTCOMES))
def test_hostile_input_is_decoded_or_refused_within_300_mb(case: str, tmp_path: Path) -> None:
    if "AVIF" in case and not features.check("avif"):
        pytest.skip("this Pillow was built without AVIF support, so it cannot write the test file")
    make, code = HOSTILE_OUTCOMES[case]
    data = make()
    assert len(data) < 400_000  # small on disk...
    path = tmp_path / "hostile"
    path.write_bytes(data)
    figures = IMAGE_BENCH.measure_in_child(path, MODEL_INPUT.image_size)
    assert figures["peak_added_mb"] < 300, figures  # ...and bounded once decoded
    if code is None:
        assert min(figures["size"]) >= MODEL_INPUT.image_size, figures
    else:
        assert figures["code"] == code, figures
        _assert_not_pils_words(figures["message"])
