"""``captioner caption`` throughput from files on disk: phone-size photos against the same photos small.

    python bench/cli_throughput.py --images 96 --workers 2

Two folders of the same --images photos are captioned by the CLI's own path (listing, background
decoding, batching, captioning, writing JSONL records) with the shipped model (--model, default
weights/default): phone-size JPEGs (4032x3024, quality 90) and the same photos at 224x224. The photos
are Flickr8k's (--flickr-images, default ``shared/data/flickr8k/images`` beside the checkout, or
``$CAPTIONER_SHARED``) scaled up with a little sensor grain, so that the JPEGs hold photographic
content; without them, the synthetic photo of ``bench/image_decode.py``. They are written under
--photos-dir (reused when already there; default a temporary folder). The model loads once, and one
batch of the small photos warms it up before anything is timed.

Also printed: the milliseconds ``load_image`` takes for one of the phone photos as the model needs it
and at full size (``bench/image_decode.py``'s measurement, median of --repeat), and from those the
highest ratio the machine's cores allow (``cpu_bound_ratio``): when the small photos already keep
every core busy, a phone photo costs their core time plus its decoding, however well the two overlap.

The last line printed is one JSON object with every figure; ``ratio`` is the phone photos' images/s
over the small photos'.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from image_decode import decode_once, phone_photo  # bench/, beside this script
from PIL import Image

from captioner import Captioner
from captioner.batch import JsonlOutput, Progress, list_inputs, run_batches
from captioner.cli import _batch_captioner, _decoder

REPO_ROOT = Path(__file__).resolve().parents[1]
PHONE_SIZE = (4032, 3024)
SMALL_SIZE = (224, 224)


def default_flickr_images() -> Path:
    shared = Path(os.environ.get("CAPTIONER_SHARED") or REPO_ROOT.parent / "shared")
    return shared / "data" / "flickr8k" / "images"


def phone_version(photo: Image.Image, seed: int) -> Image.Image:
    """``photo`` scaled up to a phone's 12 megapixels, with the grain of a phone's sensor."""
    large = np.asarray(photo.convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = np.random.default_rng(seed).normal(0.0, 3.0, large.shape).astype(np.int16)
    return Image.fromarray(np.clip(large + grain, 0, 255).astype(np.uint8))


def make_photos(folder: Path, count: int, flickr_images: Path) -> tuple[Path, Path]:
    """``folder``/phone and ``folder``/small, each with ``count`` JPEGs of quality 90 (kept if present)."""
    phone_dir, small_dir = folder / "phone", folder / "small"
    phone_dir.mkdir(parents=True, exist_ok=True)
    small_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(flickr_images.glob("*.jpg"))[:count] if flickr_images.is_dir() else []
    for index in range(count):
        name = f"photo{index:03d}.jpg"
        if (phone_dir / name).exists() and (small_dir / name).exists():
            continue
        if index < len(sources):
            with Image.open(sources[index]) as opened:
                photo = opened.convert("RGB")
            phone = phone_version(photo, index)
        else:  # no Flickr8k here: the synthetic photo of bench/image_decode.py
            phone = Image.open(io.BytesIO(phone_photo(*PHONE_SIZE, seed=index))).convert("RGB")
        phone.save(phone_dir / name, "JPEG", quality=90)
        phone.resize(SMALL_SIZE, Image.Resampling.BILINEAR).save(small_dir / name, "JPEG", quality=90)
    return phone_dir, small_dir


def caption_folder(captioner: Captioner, folder: Path, output: Path, batch_size: int, workers: int) -> float:
    """Caption every image of ``folder`` as ``captioner caption FOLDER --output OUTPUT`` does; returns
    the seconds from listing the folder to the last record written."""
    output.unlink(missing_ok=True)
    options = captioner.search_options()
    start = time.perf_counter()
    paths = list_inputs([str(folder)])
    records = JsonlOutput(output)
    records.resume(set(paths))  # a fresh file: nothing to skip, but the CLI opens its output this way
    with open(os.devnull, "w") as quiet:
        progress = Progress(len(paths), quiet)
        try:
            summary = run_batches(
                paths,
                decode=_decoder(captioner, keep_image=False),
                caption_batch=_batch_captioner(captioner, options, None, {}, None, {}),
                output=records,
                batch_size=batch_size,
                workers=workers,
                progress=progress,
            )
        finally:
            progress.close()
            records.close()
    seconds = time.perf_counter() - start
    if summary.captioned != len(paths):
        raise RuntimeError(f"{summary.failed} of {len(paths)} images failed: {summary.errors}")
    return seconds


def decode_ms(photo: Path, min_size: int, repeat: int) -> dict[str, float]:
    """Milliseconds to decode ``photo`` for the model and at full size (median of ``repeat``)."""
    data = photo.read_bytes()
    return {
        "for_the_model": 1000 * statistics.median(decode_once(data, min_size)[1] for _ in range(repeat)),
        "full_size": 1000 * statistics.median(decode_once(data, None)[1] for _ in range(repeat)),
    }


def cpu_bound_ratio(small_images_per_s: float, decode_ms: float, cores: int) -> float:
    """The highest phone/small ratio the cores allow when captioning the small photos keeps them all
    busy: each phone photo costs the small photo's core time plus its decoding, whatever the overlap."""
    small_core_seconds = cores / small_images_per_s
    return small_core_seconds / (small_core_seconds + decode_ms / 1000)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "weights" / "default"), help="model directory")
    parser.add_argument("--images", type=int, default=96, help="photos in each folder (default 96)")
    parser.add_argument("--batch-size", type=int, default=32, help="the CLI's --batch-size (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="the CLI's --workers (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="decodes per decode-time figure (default 5)")
    parser.add_argument("--flickr-images", type=Path, default=default_flickr_images(), help="Flickr8k's images")
    parser.add_argument("--photos-dir", type=Path, help="where the photos are made, or found (default: temporary)")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        folder = args.photos_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        started = time.perf_counter()
        phone_dir, small_dir = make_photos(folder, args.images, args.flickr_images)
        print(f"photos ready in {folder} ({time.perf_counter() - started:.0f} s)", flush=True)
        captioner = Captioner.from_pretrained(args.model, device="cpu")
        captioner.caption([str(path) for path in sorted(small_dir.iterdir())[: args.batch_size]])  # warm-up
        output = folder / "records.jsonl"
        rates = {}
        for name, images in (("small", small_dir), ("phone", phone_dir)):
            seconds = caption_folder(captioner, images, output, args.batch_size, args.workers)
            rates[name] = args.images / seconds
            print(f"{name:5s} {args.images} images in {seconds:6.2f} s: {rates[name]:6.2f} images/s", flush=True)
        ratio = rates["phone"] / rates["small"]
        print(f"phone / small: {ratio:.2f}")
        decode = decode_ms(phone_dir / "photo000.jpg", captioner.info.preprocessing.image_size, args.repeat)
        model_ms, full_ms = decode["for_the_model"], decode["full_size"]
        print(f"one 4032x3024 JPEG: {model_ms:.1f} ms for the model, {full_ms:.1f} ms full size")
        bound = cpu_bound_ratio(rates["small"], model_ms, len(os.sched_getaffinity(0)))
        print(f"the most the ratio can be on these cores if the small photos keep them busy: {bound:.2f}")
    result: dict[str, object] = {
        "images": args.images,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "small_images_per_s": round(rates["small"], 2),
        "phone_images_per_s": round(rates["phone"], 2),
        "ratio": round(ratio, 3),
        "decode_ms": {name: round(value, 1) for name, value in decode.items()},
        "cpu_bound_ratio": round(bound, 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
