"""Turning whatever the user supplied into an 8-bit RGB image.

This is the only place where untrusted image data meets the decoder, so it is written defensively:
the pixel count is checked from the header before any pixel is decoded, only a small set of common
raster formats is accepted, and every failure of the decoder becomes an :class:`ImageError` whose
``code`` says what was wrong with the input. No global PIL setting (``MAX_IMAGE_PIXELS``,
``LOAD_TRUNCATED_IMAGES``, warning filters) is changed here, so the module is safe to use from
several threads and leaves the behaviour of other code in the same process alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from captioner.errors import ImageError

__all__ = ["DEFAULT_MAX_PIXELS", "load_image"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000
"""Largest ``width * height`` accepted by default.

40 megapixels is above every consumer camera and phone in common use (the images a captioner is
shown), yet the decoded RGB buffer stays around 120 MB, so a single request cannot exhaust the
memory of a modest server. Images are shrunk to a few hundred pixels before the encoder sees them,
so nothing is gained by accepting larger ones.
"""

# Formats a captioning user realistically uploads. Accepting every format PIL knows would expose
# rarely exercised decoders to untrusted data, let EPS files start Ghostscript, and let arbitrary
# bytes be misread as a header-less format (TGA) instead of being reported as "not an image".
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF")

# Grayscale modes with more than 8 bits per sample; they are rescaled, not clipped (see _rescale_to_l).
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_WHITE = (255, 255, 255, 255)

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return ``source`` as a fully loaded, upright, 8-bit RGB image.

    ``source`` may be a path (``str`` or path-like), the encoded bytes of an image (``bytes``,
    ``bytearray``, ``memoryview``), a binary file object (read from its current position), or a PIL
    image. A PIL image is converted as it is now (its current frame) and is never modified; a file
    of an animated format contributes its first frame.

    The EXIF orientation is applied, because phones store pictures sideways and say so only in that
    tag. Transparent pixels are composited over white, which is how the image looks on a web page
    and avoids the black backgrounds a plain conversion would invent. Grayscale images deeper than
    8 bits are stretched over their actual range: a 12-bit scan clipped to 8 bits would be white.

    ``max_pixels`` bounds ``width * height`` and is checked from the header, before decoding. A value
    above ``PIL.Image.MAX_IMAGE_PIXELS`` is lowered to it, because PIL itself treats larger images
    as decompression bombs.

    Raises:
        ImageError: with ``code`` ``empty``, ``not_an_image``, ``truncated``, ``undecodable``,
            ``too_many_pixels`` or ``unreadable``.
        TypeError: ``source`` is of an unsupported type, or a file object is in text mode.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if Image.MAX_IMAGE_PIXELS is not None:
        max_pixels = min(max_pixels, int(Image.MAX_IMAGE_PIXELS))

    if isinstance(source, Image.Image):
        return _from_pil_image(source, max_pixels)
    return _decode(_read_source(source), max_pixels)


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


def _decode(data: bytes | bytearray, max_pixels: int) -> Image.Image:
    """Identify, size-check, decode and convert encoded image data."""
    with _decoder_errors(data):
        opened = Image.open(io.BytesIO(data), formats=_available_formats())
    # Closing releases the decoded buffer and the file object as soon as the RGB copy exists.
    with opened:
        _check_pixels(opened.size, max_pixels)
        with _decoder_errors(data):
            opened.load()
        return _upright_rgb(opened)


def _from_pil_image(image: Image.Image, max_pixels: int) -> Image.Image:
    """Convert a caller's PIL image; every step below creates new images, so ``image`` is untouched."""
    _check_pixels(image.size, max_pixels)
    with _decoder_errors():
        # A lazily opened image decodes here; errors are the same as for encoded data.
        image.load()
    return _upright_rgb(image)


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


def _upright_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image with the EXIF orientation applied and no metadata.

    The orientation is read before converting because TIFF keeps it in tags that conversion does not
    carry over. ``info`` is emptied because its contents no longer describe the pixels: the
    orientation and transparency have been applied, and a caller applying them again would rotate
    the image twice or punch holes in it.
    """
    transpose = _orientation_transpose(image)
    rgb = _to_rgb(image)
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image converted from a loaded image of any mode (see load_image for the rules)."""
    try:
        if image.mode in _HIGH_DEPTH_MODES:
            return _rescale_to_l(image).convert("RGB")
        if image.has_transparency_data:
            # "La" (premultiplied) has no direct route to RGBA in PIL; "LA" does.
            rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        # convert() copies even when the mode is already RGB, so the result never shares pixels.
        return image.convert("RGB")
    except ValueError as exc:  # PIL has no conversion for this mode
        raise ImageError(
            f"the image uses an unsupported colour mode ({image.mode}): {_describe(exc)}", code="undecodable"
        ) from exc


def _rescale_to_l(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit or float grayscale image onto 0..255 using its actual value range.

    Medical, scientific and scanner images often use only part of the nominal range (12 bits of 16,
    or floats in 0..1), so a fixed divisor would produce near-black images and clipping near-white
    ones. A constant image has no range; it is placed within [min(v, 0), max(v, 1)] so that zero is
    black and any positive constant (e.g. 65535, or 1.0 for floats) is white.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size, 0)
    low = float(values[finite].min())
    high = float(values[finite].max())
    if high == low:
        low, high = min(low, 0.0), max(high, 1.0)
    # NaN and -inf become black, +inf white.
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = np.rint((values - low) * (255.0 / (high - low)))
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


@contextlib.contextmanager
def _decoder_errors(data: bytes | bytearray | None = None) -> Iterator[None]:
    """Turn any exception PIL raises while opening or decoding into the matching ImageError.

    PIL reports bad data with whatever exception the failing plugin happens to raise (OSError,
    ValueError, SyntaxError, struct.error, EOFError, IndexError, ZeroDivisionError...), so only the
    broad catch keeps them all from reaching the caller. MemoryError is passed through: it says the
    server is short of memory, not that the input is bad (the pixel bound keeps honest inputs small).
    ``data``, when known, lets the message be more precise.
    """
    try:
        yield
    except MemoryError:
        raise
    except Exception as exc:
        raise _translate(exc, data) from exc


def _translate(exc: Exception, data: bytes | bytearray | None) -> ImageError:
    """The ImageError that describes a PIL exception to the user."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageError(f"the image is too large: {_describe(exc)}", code="too_many_pixels")
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
