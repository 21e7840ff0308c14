"""Decode time and peak memory of one image, for the hostile inputs of issue 21 and a phone photo.

    python bench/image_decode.py --baseline --repeat 3

Every input is generated here, small on disk and large once decoded: a 16-bit grayscale PNG, an RGBA
PNG, a float TIFF and a deflate-compressed TIFF of 40 megapixels (the default pixel limit), a WebP and
an AVIF of the same size (AVIF only where PIL can write it), a GIF of 5,000 frames and a TIFF of 3,000
pages (each page 40 megapixels), and a 4032x3024 JPEG of quality 90 like a phone's. Each is decoded by
``load_image`` as ``Captioner.preprocess`` does (``min_size`` the model's input, --min-size) and, with
--baseline, at full size as before (``min_size=None``: no JPEG scaling, no reduction), in the same run.

Each measurement runs in a Python process of its own, because peak RSS only ever rises: the figure is
the process's peak RSS after the first decode minus its peak before it. The peak is Linux's VmHWM, not
``ru_maxrss``: a child started by ``subprocess`` inherits its parent's peak in ``ru_maxrss`` (Linux
carries the peak of the memory it replaced across ``exec``), which would hide any decode smaller than
what the parent once held. Times are the median of --repeat decodes. The last line printed is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, features

from captioner.errors import ImageError
from captioner.images import load_image

WIDTH, HEIGHT = 8000, 5000  # 40,000,000 pixels: captioner.images.DEFAULT_MAX_PIXELS
GIF_FRAMES, TIFF_PAGES = 5000, 3000


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def grey16_png(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    return encode(Image.new("I;16", (width, height), 1000), "PNG")


def rgba_png(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    return encode(Image.new("RGBA", (width, height), (200, 30, 40, 128)), "PNG")


def float_tiff(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    return encode(Image.new("F", (width, height), 0.25), "TIFF", compression="tiff_adobe_deflate")


def deflate_tiff(width: int = WIDTH, height: int = HEIGHT, mode: str = "RGB", **options: object) -> bytes:
    return encode(Image.new(mode, (width, height)), "TIFF", compression="tiff_adobe_deflate", **options)


def webp(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    return encode(Image.new("RGB", (width, height), (20, 60, 220)), "WEBP", lossless=True)


def avif(width: int = WIDTH, height: int = HEIGHT) -> bytes:
    return encode(Image.new("RGB", (width, height), (20, 60, 220)), "AVIF", quality=10, speed=10)


def many_frame_gif(frames: int = GIF_FRAMES, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A GIF whose first frame fills a ``width`` x ``height`` canvas, followed by ``frames - 1`` frames of
    one pixel each (PIL's writer would keep every frame in memory, so those are written by hand)."""
    first = encode(Image.new("L", (width, height), 0), "GIF")
    assert first.endswith(b";")
    # Image descriptor (1x1 at the origin, no local palette), LZW minimum code size 2, then one data
    # sub-block holding the codes clear (4), pixel 0 and end (5), 3 bits each: 0b101_000_100.
    one_pixel = b"," + struct.pack("<4HB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return first[:-1] + one_pixel * (frames - 1) + b";"


def many_page_tiff(pages: int = TIFF_PAGES, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    """A TIFF of ``pages`` pages, each a grayscale ``width`` x ``height`` image: the pages after the first
    are copies of its directory, which point at the same compressed data, so the file stays small. The
    data is one strip, so that every directory holds its values itself and every page can be loaded
    (PIL reads values stored elsewhere in the file against one budget for all pages)."""
    single = deflate_tiff(width, height, mode="L", strip_size=width * height)
    assert single[:4] == b"II*\x00"
    first = struct.unpack_from("<I", single, 4)[0]
    entries = struct.unpack_from("<H", single, first)[0]
    next_pointer = first + 2 + 12 * entries
    directory = single[first:next_pointer]  # its offsets to values and strips are absolute: they stay valid
    out = bytearray(single) + b"\x00" * (len(single) % 2)  # directories start on a word boundary
    previous = next_pointer
    for _ in range(pages - 1):
        struct.pack_into("<I", out, previous, len(out))
        previous = len(out) + len(directory)
        out += directory + b"\x00\x00\x00\x00"
    return bytes(out)


def phone_photo(width: int = 4032, height: int = 3024, seed: int = 0) -> bytes:
    """A JPEG of quality 90 with a photo's mix of smooth areas, edges and sensor grain (3-4 MB)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    scene = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    edges = np.asarray(coarse.resize((width, height), Image.Resampling.NEAREST), dtype=np.int16)
    grain = rng.normal(0.0, 4.0, (height, width, 3)).astype(np.int16)
    pixels = np.clip((scene + edges) // 2 + grain, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


INPUTS: dict[str, Callable[[], bytes]] = {
    "16-bit grey PNG": grey16_png,
    "RGBA PNG": rgba_png,
    "float TIFF": float_tiff,
    "deflate TIFF": deflate_tiff,
    "WebP": webp,
    "AVIF": avif,
    f"{GIF_FRAMES:,}-frame GIF": many_frame_gif,
    f"{TIFF_PAGES:,}-page TIFF": many_page_tiff,
    "4032x3024 JPEG q90": phone_photo,
}


def measure(path: Path, min_size: int | None, repeat: int) -> dict[str, object]:
    """Decode ``path`` ``repeat`` times in this process: the first decode's peak RSS increase, the
    median time, and what came out (the image's size, or the error's code and message)."""
    data = path.read_bytes()
    before = peak_rss()
    outcome, first = decode_once(data, min_size)
    peak_added = peak_rss() - before
    seconds = [first] + [decode_once(data, min_size)[1] for _ in range(repeat - 1)]
    return {"seconds": statistics.median(seconds), "peak_added_mb": peak_added / 1e6, **outcome}


def decode_once(data: bytes, min_size: int | None) -> tuple[dict[str, object], float]:
    """What ``load_image`` made of ``data`` (the image's size, or the error's code and message), and
    how long it took."""
    start = time.perf_counter()
    try:
        outcome: dict[str, object] = {"size": list(load_image(data, min_size=min_size).size)}
    except ImageError as error:
        outcome = {"code": error.code, "message": error.message}
    return outcome, time.perf_counter() - start


def peak_rss() -> int:
    """This process's peak resident set size in bytes (Linux's VmHWM; see the module's docstring)."""
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024


def measure_in_child(path: Path, min_size: int | None, repeat: int = 1) -> dict[str, object]:
    """``measure`` in a fresh Python process, so that its peak RSS is this decode's alone."""
    command = [sys.executable, __file__, "--measure", str(path), "--repeat", str(repeat)]
    command += ["--min-size", str(min_size)] if min_size is not None else ["--full-size"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def available_inputs() -> dict[str, Callable[[], bytes]]:
    return {name: make for name, make in INPUTS.items() if name != "AVIF" or features.check("avif")}


def describe(figures: dict[str, object]) -> str:
    outcome = "x".join(map(str, figures["size"])) if "size" in figures else f"refused ({figures['code']})"
    return f"{1000 * figures['seconds']:8.1f} ms {figures['peak_added_mb']:7.0f} MB  {outcome}"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-size", type=int, default=224, help="the model's input side (default 224)")
    parser.add_argument("--full-size", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help="also decode at full size, as before")
    parser.add_argument("--repeat", type=int, default=3, help="decodes per measurement (median time)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args(argv)
    if args.measure is not None:
        figures = measure(args.measure, None if args.full_size else args.min_size, args.repeat)
        print(json.dumps(figures))
        return figures

    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, make in available_inputs().items():
            data = make()
            path = Path(folder) / "input"
            path.write_bytes(data)
            row = {"bytes": len(data), "new": measure_in_child(path, args.min_size, args.repeat)}
            line = f"{name:22s} {len(data):>9,} B  new {describe(row['new'])}"
            if args.baseline:
                row["baseline"] = measure_in_child(path, None, args.repeat)
                line += f"  | baseline {describe(row['baseline'])}"
            print(line, flush=True)
            results[name] = row
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
