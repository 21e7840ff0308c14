"""Turning whatever the user supplied into an 8-bit RGB image.

This is the only place where untrusted image data meets the decoder, so it is written defensively:
the pixel count and the memory the decoder will need are checked from the header before any pixel
is decoded, only a small set of common raster formats is accepted, only the first frame of an
animated or multi-page file is read, and every failure of the decoder becomes an :class:`ImageError`
whose ``code`` says what was wrong with the input. Given the size the model needs (``min_size``), an
image is decoded for the model rather than for a viewer: a JPEG is scaled down by the decoder itself,
and every image is converted and reduced a tile at a time, so the decoder's own buffer is the only
full-size copy ever made. No global PIL setting (``MAX_IMAGE_PIXELS``,
``LOAD_TRUNCATED_IMAGES``, warning filters) is changed here, so the module is safe to use from
several threads and leaves the behaviour of other code in the same process alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from captioner.errors import ImageError

__all__ = ["DEFAULT_MAX_DECODE_BYTES", "DEFAULT_MAX_PIXELS", "load_image"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest ``width * height`` accepted by default.

40 megapixels is above every consumer camera and phone in common use (the images a captioner is
shown), yet the decoded RGB buffer stays around 120 MB, so a single request cannot exhaust the
memory of a modest server. Images are shrunk to a few hundred pixels before the encoder sees them,
so nothing is gained by accepting larger ones.
"""

DEFAULT_MAX_DECODE_BYTES = 256 * 2**20
"""Most memory the decoder may need for one image by default (see ``load_image``).

A 40-megapixel image takes 160 MiB in PIL (four bytes a pixel in every mode but grayscale), so every
format whose decoder writes straight into that buffer, and a progressive JPEG (which keeps all its
coefficients), is decoded up to the pixel limit. WebP and AVIF decoders hold further full-size copies
of their own, so those are refused from about 17 and 22 megapixels rather than taking three or four
times as much memory.
"""

# Formats a captioning user realistically uploads. Accepting every format PIL knows would expose
# rarely exercised decoders to untrusted data, let EPS files start Ghostscript, and let arbitrary
# bytes be misread as a header-less format (TGA) instead of being reported as "not an image".
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")

# Grayscale modes with more than 8 bits per sample; they are rescaled, not clipped (see _rescale_to_l).
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_WHITE = (255, 255, 255, 255)

# Conversion and reduction work on tiles of about a million pixels (a few MB in any mode), so that no
# full-size copy of the decoded image is ever made, while the tiles stay few enough to cost nothing.
_TILE_SIDE = 1024

# Box-averaging straight down to the model's size, then resampling by a factor near 1, smooths edges
# differently from one resampling of the full image (measured: up to half the normalised range at a
# sharp edge); stopping at twice the size leaves the final resize a real share of the filtering.
_REDUCE_GAP = 2

# How many times PIL's buffer a format's decoder needs in all. Measured with Pillow 13 on 40-megapixel
# RGB images: WebP about 15 bytes a pixel (libwebp composes onto canvases of its own and PIL copies
# one out), AVIF about 9 (the YUV planes and an RGB copy; more at 4:4:4 or above 8 bits).
_DECODER_COPIES = {"WEBP": 4, "AVIF": 3}


@dataclass(frozen=True)
class _Budget:
    """What one image may cost, and the size it is wanted at (None: full size)."""

    max_pixels: int
    max_decode_bytes: int
    min_size: int | None


ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Image.Image


def load_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Image.Image:
    """Return ``source`` as a fully loaded, upright, 8-bit RGB image.

    ``source`` may be a path (``str`` or path-like), the encoded bytes of an image (``bytes``,
    ``bytearray``, ``memoryview``), a binary file object (read from its current position), or a PIL
    image. A PIL image is converted as it is now (its current frame) and is never modified; a file
    of an animated or multi-page format contributes its first frame, and its other frames are never
    read.

    The EXIF orientation is applied, because phones store pictures sideways and say so only in that
    tag. Transparent pixels are composited over white, which is how the image looks on a web page
    and avoids the black backgrounds a plain conversion would invent. Grayscale images deeper than
    8 bits are stretched over their actual range: a 12-bit scan clipped to 8 bits would be white.

    ``min_size`` is the side of the square the caller will resize the image to (the model's input).
    The image is then returned smaller than stored but with each side still at least ``min_size``
    (twice that where it is reduced after decoding), which changes what a model sees by well under
    a grey level on average and saves most of the decoding time and memory of a large photo. None
    returns the image at its full size.

    ``max_pixels`` bounds ``width * height`` and is checked from the header, before decoding. A value
    above ``PIL.Image.MAX_IMAGE_PIXELS`` is lowered to it, because PIL itself treats larger images
    as decompression bombs; images PIL refuses as such are reported with this limit, not PIL's.
    ``max_decode_bytes`` bounds the memory the decoder needs for the image as it will be decoded
    (after a JPEG's scaling), estimated from the header, also before decoding.

    Raises:
        ImageError: with ``code`` ``empty``, ``not_an_image``, ``truncated``, ``undecodable``,
            ``too_many_pixels``, ``too_costly`` or ``unreadable``.
        TypeError: ``source`` is of an unsupported type, or a file object is in text mode.
        ValueError: ``max_pixels``, ``max_decode_bytes`` or ``min_size`` is not a positive integer.
    """
    budget = _budget(max_pixels, max_decode_bytes, min_size)
    if isinstance(source, Image.Image):
        return _from_pil_image(source, budget)
    return _decode(_read_source(source), budget)


def _budget(max_pixels: int, max_decode_bytes: int, min_size: int | None) -> _Budget:
    limits = {"max_pixels": max_pixels, "max_decode_bytes": max_decode_bytes}
    if min_size is not None:
        limits["min_size"] = min_size
    for name, value in limits.items():
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if Image.MAX_IMAGE_PIXELS is not None:
        max_pixels = min(max_pixels, int(Image.MAX_IMAGE_PIXELS))
    return _Budget(max_pixels, max_decode_bytes, min_size)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_source(source: object) -> bytes | bytearray:
    """Return the encoded bytes of a non-PIL source, or raise ``empty`` / ``unreadable``."""
    if isinstance(source, bytes | bytearray):
        data: bytes | bytearray = source
    elif isinstance(source, memoryview):
        # tobytes() also copes with non-contiguous views and non-byte item formats.
        data = source.tobytes()
    elif isinstance(source, str | os.PathLike):
        data = _read_path(source)
    elif hasattr(source, "read"):
        try:
            data = source.read()
        except OSError as exc:
            raise ImageError(f"could not read the image data: {_describe(exc)}", code="unreadable") from exc
        if not isinstance(data, bytes | bytearray):
            raise TypeError("the file object must be opened in binary mode")
    else:
        kind = type(source).__name__
        raise TypeError(f"an image source must be a path, bytes, a binary file or a PIL image, not {kind}")
    if not data:
        raise ImageError("the image is empty (zero bytes)", code="empty")
    return data


def _read_path(source: str | os.PathLike) -> bytes:
    """Read a whole file, refusing what is not a regular file (a FIFO would block, /dev/zero never ends)."""
    path = os.fspath(source)
    name = os.fsdecode(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(f"cannot read {name!r}: it is a directory", code="unreadable")
        if not stat.S_ISREG(mode):
            raise ImageError(f"cannot read {name!r}: it is not a regular file", code="unreadable")
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise ImageError(f"cannot read {name!r}: no such file", code="unreadable") from exc
    except PermissionError as exc:
        raise ImageError(f"cannot read {name!r}: permission denied", code="unreadable") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(f"cannot read {name!r}: {_describe(exc)}", code="unreadable") from exc


def _decode(data: bytes | bytearray, budget: _Budget) -> Image.Image:
    """Identify, size-check, decode and convert encoded image data."""
    with _decoder_errors(budget.max_pixels, data):
        opened = Image.open(io.BytesIO(data), formats=_available_formats())
    # Closing releases the decoded buffer and the file object as soon as the RGB copy exists.
    with opened:
        _check_pixels(opened.size, budget.max_pixels)
        full_size = opened.size
        if budget.min_size is not None:
            # Only JPEG acts on this (other formats ignore it): its decoder scales by 1/2, 1/4 or 1/8
            # in the inverse DCT, to the smallest size whose sides are still at least min_size.
            with _decoder_errors(budget.max_pixels, data):
                opened.draft("RGB", (budget.min_size, budget.min_size))
        _check_cost(opened, budget.max_decode_bytes, full_size)
        with _decoder_errors(budget.max_pixels, data):
            opened.load()
        return _upright_rgb(opened, budget.min_size)


def _from_pil_image(image: Image.Image, budget: _Budget) -> Image.Image:
    """Convert a caller's PIL image; every step below creates new images, so ``image`` is untouched."""
    _check_pixels(image.size, budget.max_pixels)
    if isinstance(image, ImageFile.ImageFile) and image.tile:  # opened lazily: not decoded yet
        _check_cost(image, budget.max_decode_bytes, image.size)
    with _decoder_errors(budget.max_pixels):
        # A lazily opened image decodes here; errors are the same as for encoded data.
        image.load()
    return _upright_rgb(image, budget.min_size)


def _available_formats() -> list[str]:
    """The accepted formats this PIL build can actually decode (AVIF support is optional)."""
    Image.init()  # idempotent; registers every plugin so the membership test below is meaningful
    return [name for name in _FORMATS if name in Image.OPEN]


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageError(
            f"the image is too large: {width}x{height} is {pixels:,} pixels, the limit is {max_pixels:,}",
            code="too_many_pixels",
        )
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})", code="undecodable")


def _check_cost(image: Image.Image, max_decode_bytes: int, full_size: tuple[int, int]) -> None:
    """Refuse an image whose decoding would need more than ``max_decode_bytes`` (see _decode_bytes)."""
    cost = _decode_bytes(image, full_size)
    if cost > max_decode_bytes:
        width, height = image.size
        kind = f"{image.format} image" if image.format else "image"
        raise ImageError(
            f"the image would take too much memory to decode: a {width}x{height} {kind} in mode {image.mode} "
            f"needs about {_amount(cost)}, the limit is {_amount(max_decode_bytes)}",
            code="too_costly",
        )


def _decode_bytes(image: Image.Image, full_size: tuple[int, int]) -> int:
    """The memory decoding ``image`` at its current size takes, from its header alone; ``full_size`` is
    its size before any scaling by the decoder.

    PIL keeps 1-bit, grayscale and palette pixels in a byte, 16-bit grayscale in two, everything else
    in four. A progressive JPEG holds every DCT coefficient of the full-size image (two bytes each)
    until its last scan, whatever size it is decoded at.
    """
    width, height = image.size
    per_pixel = 1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4
    cost = width * height * per_pixel * _DECODER_COPIES.get(image.format or "", 1)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        cost += full_size[0] * full_size[1] * 2 * len(image.getbands())
    return cost


def _amount(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB" if size >= 2**20 else f"{size:,} bytes"


def _upright_rgb(image: Image.Image, min_size: int | None) -> Image.Image:
    """A new RGB image, reduced for ``min_size``, with the EXIF orientation applied and no metadata.

    The orientation is read before converting because TIFF keeps it in tags that conversion does not
    carry over. ``info`` is emptied because its contents no longer describe the pixels: the
    orientation and transparency have been applied, and a caller applying them again would rotate
    the image twice or punch holes in it.
    """
    transpose = _orientation_transpose(image)
    rgb = _to_rgb(image, _reduction(image.size, min_size))
    if transpose is not None:
        rgb = rgb.transpose(transpose)
    rgb.info = {}
    return rgb


# What each EXIF orientation value (TIFF 6.0 / EXIF 2.3, tag 0x0112) asks for to display the image.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transposition the image's EXIF orientation tag asks for, if any.

    This is the table ``PIL.ImageOps.exif_transpose`` uses, applied here without that function
    because it also rewrites the EXIF block, and that raises (struct.error) when some other tag in it
    has a malformed type. A broken EXIF block must not cost the user their caption: the pixels are
    intact, so the orientation is honoured when it can be read and otherwise ignored and logged.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:
        logger.warning("ignoring unreadable EXIF data: %s", _describe(exc))
        return None
    return _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def _reduction(size: tuple[int, int], min_size: int | None) -> tuple[int, int]:
    """The factor, per side, by which to box-average an image that will be resized to ``min_size``."""
    if min_size is None:
        return (1, 1)
    target = _REDUCE_GAP * min_size
    return (max(1, size[0] // target), max(1, size[1] // target))


def _to_rgb(image: Image.Image, factor: tuple[int, int]) -> Image.Image:
    """A new RGB image converted from a loaded image of any mode (see load_image for the rules) and
    reduced by ``factor``, a tile at a time: every conversion is per pixel but the deep grayscale
    range, which is found first."""
    width, height = image.size
    rgb = Image.new("RGB", (-(-width // factor[0]), -(-height // factor[1])))
    try:
        convert = _tile_converter(image)
        for box in _tiles(image.size, factor):
            rgb.paste(convert(image.crop(box)).reduce(factor), (box[0] // factor[0], box[1] // factor[1]))
    except ValueError as exc:  # PIL has no conversion for this mode
        raise ImageError(
            f"the image uses an unsupported colour mode ({image.mode}): {_describe(exc)}", code="undecodable"
        ) from exc
    return rgb


def _tiles(size: tuple[int, int], factor: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """Boxes covering an image of ``size``. Every side but the image's last row and column of tiles is a
    multiple of ``factor``, so reducing the tiles one by one gives the pixels of reducing the whole."""
    width, height = size
    tile_width = max(1, _TILE_SIDE // factor[0]) * factor[0]
    tile_height = max(1, _TILE_SIDE // factor[1]) * factor[1]
    for top in range(0, height, tile_height):
        for left in range(0, width, tile_width):
            yield left, top, min(left + tile_width, width), min(top + tile_height, height)


def _tile_converter(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The function that turns a tile of ``image`` into RGB."""
    if image.mode in _HIGH_DEPTH_MODES:
        value_range = _value_range(image)
        return lambda tile: _stretch_to_l(tile, value_range).convert("RGB")
    if image.has_transparency_data:
        return _over_white
    return lambda tile: tile.convert("RGB")


def _over_white(image: Image.Image) -> Image.Image:
    # "La" (premultiplied) has no direct route to RGBA in PIL; "LA" does.
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _value_range(image: Image.Image) -> tuple[float, float] | None:
    """The range a 16-bit, 32-bit or float grayscale image is stretched over; None if it has no finite value.

    Medical, scientific and scanner images often use only part of the nominal range (12 bits of 16,
    or floats in 0..1), so a fixed divisor would produce near-black images and clipping near-white
    ones. A constant image has no range; it is placed within [min(v, 0), max(v, 1)] so that zero is
    black and any positive constant (e.g. 65535, or 1.0 for floats) is white. The values are read a
    tile at a time, in their own type: a float64 copy of a 40-megapixel image would take 320 MB.
    """
    lows, highs = [], []
    for box in _tiles(image.size, (1, 1)):
        values = np.asarray(image.crop(box))
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]
        if values.size:
            lows.append(values.min())
            highs.append(values.max())
    if not lows:
        return None
    low, high = float(min(lows)), float(max(highs))
    return (min(low, 0.0), max(high, 1.0)) if high == low else (low, high)


def _stretch_to_l(tile: Image.Image, value_range: tuple[float, float] | None) -> Image.Image:
    """A tile of a deep grayscale image mapped onto 0..255 over ``value_range`` (see _value_range)."""
    if value_range is None:
        return Image.new("L", tile.size, 0)
    low, high = value_range
    # float32 is exact to far below a grey level, and the arithmetic below works in place on this copy.
    values = np.array(tile, dtype=np.float32)
    np.nan_to_num(values, copy=False, nan=low, posinf=high, neginf=low)  # NaN and -inf black, +inf white
    values -= low
    values *= 255.0 / (high - low)
    np.clip(np.rint(values, out=values), 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


@contextlib.contextmanager
def _decoder_errors(max_pixels: int, data: bytes | bytearray | None = None) -> Iterator[None]:
    """Turn any exception PIL raises while opening or decoding into the matching ImageError.

    PIL reports bad data with whatever exception the failing plugin happens to raise (OSError,
    ValueError, SyntaxError, struct.error, EOFError, IndexError, ZeroDivisionError...), so only the
    broad catch keeps them all from reaching the caller. MemoryError is passed through: it says the
    server is short of memory, not that the input is bad (the pixel bound keeps honest inputs small).
    ``max_pixels`` is the limit to name when PIL finds the image too large; ``data``, when known, lets
    the message be more precise.
    """
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:
        raise _translate(exc, max_pixels, data) from exc


def _translate(exc: Exception, max_pixels: int, data: bytes | bytearray | None) -> ImageError:
    """The ImageError that describes a PIL exception to the user."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # PIL checks before we can, against MAX_IMAGE_PIXELS (a warning, raised if warnings are errors)
        # and twice that; our limit is never above MAX_IMAGE_PIXELS, so the image is above it too, and
        # PIL's own message ("decompression bomb", its figure) would only confuse the user.
        return ImageError(
            f"the image is too large: it has more pixels than the limit of {max_pixels:,}", code="too_many_pixels"
        )
    if isinstance(exc, UnidentifiedImageError):
        claimed = _claimed_format(data) if data is not None else None
        if claimed is None:
            accepted = ", ".join(_available_formats())
            return ImageError(f"not a recognised image format (accepted: {accepted})", code="not_an_image")
        # PIL only says "cannot identify" even when the signature matched and the header after it
        # was broken; "not an image" would send the user looking for the wrong problem.
        return ImageError(
            f"the data has the signature of a {claimed} image but its header is damaged or incomplete",
            code="undecodable",
        )
    if _is_truncation(exc, data):
        return ImageError("the image file is truncated (its data ends too early)", code="truncated")
    return ImageError(f"the image could not be decoded: {_describe(exc)}", code="undecodable")


def _claimed_format(data: bytes | bytearray) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    prefix = bytes(data[:16])  # what Image.open hands to the plugins' signature tests
    for name in _available_formats():
        accept = Image.OPEN[name][1]
        # A signature test may return a string (a warning about a near miss); only True is a match.
        if accept is not None and accept(prefix) is True:
            return name
    return None


def _is_truncation(exc: Exception, data: bytes | bytearray | None) -> bool:
    """Whether PIL's exception means the data ended early.

    PIL has no exception class for this. Most plugins say "truncated" in the message (OSError "image
    file is truncated", OSError "Truncated File Read", SyntaxError "Truncated data"), some raise
    EOFError on a short read, and the WebP decoder only says it "could not create decoder object";
    for that case the length a RIFF container declares in its header is compared with what arrived.
    """
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return True
    if data is not None and data[:4] == b"RIFF" and len(data) >= 8:
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False


def _describe(exc: BaseException) -> str:
    """A one-line, bounded description of ``exc`` for a user-facing message (never a traceback)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
