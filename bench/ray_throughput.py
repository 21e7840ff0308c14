"""Images per second of ``captioner caption --engine ray`` against the local engine, on the same images.

    python bench/ray_throughput.py --model weights/synthetic --images 500

Writes --images JPEGs (--size pixels square, smooth gradients with noise, so they compress like photos)
into a temporary folder, then in this process: captions them with the local engine (``cli.main``, as
the command runs them), starts a local Ray (timed: the start-up overhead), and captions them again with
``--engine ray`` into a fresh output (the run includes starting the actors and loading the model in
each; records are compared with the local ones). The figures are wall-clock seconds of each run,
images/s, and Ray's start; the last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from captioner import cli
from captioner.distributed import start_ray


def write_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for index in range(count):
        colour = rng.uniform(0.2, 1.0, 3).astype(np.float32)
        base = (ramp[None, :, None] * colour + ramp[:, None, None] * (1 - colour)) / 2  # (size, size, 3)
        pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:05d}.jpg", quality=90)


def timed_run(arguments: list[str]) -> float:
    started = time.monotonic()
    status = cli.main(arguments)
    if status != cli.EXIT_OK:
        raise SystemExit(f"captioner exited with {status}")
    return time.monotonic() - started


def records(path: Path) -> dict[str, dict]:
    return {record["path"]: record for record in map(json.loads, path.read_text().splitlines())}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/synthetic")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=320, help="side of the generated JPEGs (default 320)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--actors", type=int, help="caption actors (default: the engine's)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ray-bench-") as scratch:
        folder = Path(scratch) / "images"
        folder.mkdir()
        write_images(folder, args.images, args.size)
        common = ["caption", str(folder), "--model", args.model, "--batch-size", str(args.batch_size)]
        local_seconds = timed_run([*common, "--output", f"{scratch}/local.jsonl"])
        ray_start_seconds = start_ray()
        ray_arguments = [*common, "--output", f"{scratch}/ray.jsonl", "--engine", "ray"]
        ray_arguments += ["--actors", str(args.actors)] if args.actors else []
        ray_seconds = timed_run(ray_arguments)
        local, distributed = records(Path(scratch) / "local.jsonl"), records(Path(scratch) / "ray.jsonl")
        same_captions = sum(local[path]["caption"] == distributed[path]["caption"] for path in local)

    import ray

    figures: dict[str, object] = {
        "images": args.images,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "ray_cpus": ray.cluster_resources().get("CPU"),
        "local_seconds": round(local_seconds, 2),
        "local_images_per_s": round(args.images / local_seconds, 2),
        "ray_start_seconds": round(ray_start_seconds, 2),
        "ray_seconds": round(ray_seconds, 2),
        "ray_images_per_s": round(args.images / ray_seconds, 2),
        "ray_images_per_s_with_start": round(args.images / (ray_seconds + ray_start_seconds), 2),
        "same_captions": same_captions,
    }
    ray.shutdown()
    print(f"local engine: {local_seconds:.1f} s, {figures['local_images_per_s']} images/s")
    print(f"local Ray start: {ray_start_seconds:.1f} s")
    print(f"ray engine:   {ray_seconds:.1f} s, {figures['ray_images_per_s']} images/s (Ray started already)")
    print(f"captions identical for {same_captions} of {args.images} images")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
