"""Throughput and latency of the HTTP service, with and without dynamic batching, against the batch CLI.

    python bench/service_load.py [--model DIR] [--requests 256] [--images 32] [--cli-images 256] [--size 224]
                                 [--clients 1,4,16] [--workers 1] [--max-batch-size 16] [--beam-size 3]
                                 [--max-length 20]

Starts ``python -m service`` (one worker unless --workers says otherwise) twice on a free local
port: with batching (maximum batch --max-batch-size) and without (maximum batch 1). At each number of
concurrent clients, every client sends one image per request over its own kept-alive connection,
first a warm-up round, then the measured one; reported are requests per second, the p50/p95/p99
latency, the worker's CPU time per request and the mean batch size of the model calls (from the
service's /metrics). At the highest number of clients each round is followed by one of
``python -m captioner.cli caption`` on the same images (copied to --cli-images files) with the same
model and options, so that the service and the CLI are measured under the same load from elsewhere;
the CLI's images per second exclude the process start-up and model loading (a run on one image is
timed and subtracted), the stricter comparison.

The last line printed is one JSON object, holding among others ``batching_speedup_16`` (requests/s
with batching over without, at 16 clients) and ``service_vs_cli`` (the service's images/s at 16
clients over the CLI's).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_images(count: int, size: int) -> list[bytes]:
    """Smooth random images as JPEG (noise would be an unrealistically large upload)."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """``python -m service`` in a subprocess, stopped with SIGTERM."""

    def __init__(self, model: str | None, max_batch_size: int, workers: int, log: Path) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "service", "--port", str(self.port), "--workers", str(workers)]
        command += ["--threads", "16", "--max-batch-size", str(max_batch_size)]
        if model:
            command += ["--model", model]
        env = os.environ | {"CAPTIONER_ACCESS_LOG": "0"}
        with log.open("wb") as output:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the service exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit("the service did not become ready within 300 s")

    def cpu_seconds(self) -> float:
        """CPU time used so far by the worker processes (Linux /proc), robust to other load on the machine."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended while we looked
            if int(fields[1]) == self.process.pid:
                total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        return total / os.sysconf("SC_CLK_TCK")

    def batch_totals(self) -> tuple[float, float]:
        """(images, model calls) of the dynamic batcher so far, from the service's /metrics."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/metrics")
        totals = {}
        for line in connection.getresponse().read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in ("captioner_batch_size_sum", "captioner_batch_size_count"):
                totals[name] = float(value)
        connection.close()
        return totals["captioner_batch_size_sum"], totals["captioner_batch_size_count"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)


def run_clients(port: int, images: list[bytes], clients: int, total: int, query: str) -> dict[str, float]:
    """``total`` requests spread over ``clients`` threads; returns throughput and latency percentiles."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        mine = []
        for n in range(index, total, clients):
            started = time.perf_counter()
            connection.request("POST", f"/predict?{query}", body=images[n % len(images)],
                               headers={"Content-Type": "image/jpeg"})  # fmt: skip
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                with lock:
                    failures.append(f"{response.status}: {body[:200]!r}")
            mine.append(time.perf_counter() - started)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests_per_s": round(total / elapsed, 2),
        "p50_ms": round(quantiles[49] * 1000, 1),
        "p95_ms": round(quantiles[94] * 1000, 1),
        "p99_ms": round(quantiles[98] * 1000, 1),
        "requests": total,
    }


def measure_services(
    args: argparse.Namespace, images: list[bytes], workdir: Path, cli: CliTimer
) -> dict[str, dict[str, Any]]:
    """Both services run side by side and are measured in alternation, round after round, so that load
    from elsewhere on the machine affects both alike; each keeps its best round (highest throughput).
    At the highest number of clients each round is followed by a round of the CLI, for the same reason."""
    query = f"beam_size={args.beam_size}&max_length={args.max_length}"
    modes = {"batching": args.max_batch_size, "no_batching": 1}
    services = {
        name: Service(args.model, batch, args.workers, workdir / f"{name}.log") for name, batch in modes.items()
    }
    results: dict[str, dict[str, Any]] = {name: {} for name in modes}
    try:
        for clients in args.clients:
            total = max(args.requests, clients * 4)
            for service in services.values():
                run_clients(service.port, images, clients, max(clients * 2, 8), query)  # warm-up
            for _ in range(args.rounds):
                for name, service in services.items():
                    cpu_before, (images_before, calls_before) = service.cpu_seconds(), service.batch_totals()
                    measured = run_clients(service.port, images, clients, total, query)
                    measured["worker_cpu_ms_per_request"] = round(
                        (service.cpu_seconds() - cpu_before) / total * 1000, 1
                    )
                    images_after, calls_after = service.batch_totals()
                    batched_images, calls = images_after - images_before, calls_after - calls_before
                    measured["mean_batch_size"] = round(batched_images / calls, 2)
                    best = results[name].get(str(clients))
                    if best is None or measured["requests_per_s"] > best["requests_per_s"]:
                        results[name][str(clients)] = measured
                if clients == max(args.clients):
                    cli.round()
            for name in modes:
                print(f"{name:>11}, {clients:>2} clients: {results[name][str(clients)]}", flush=True)
    finally:
        for service in services.values():
            service.stop()
    return results


class CliTimer:
    """``captioner caption`` on copies of the images, timed round by round; its images per second
    exclude the process start-up and model loading (a run on one image is timed and subtracted)."""

    def __init__(self, args: argparse.Namespace, images: list[bytes], workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.many, self.one = workdir / "images", workdir / "one-image"
        self.many.mkdir()
        self.one.mkdir()
        # Enough files that the run is long compared with the start-up subtracted from it.
        self.count = max(len(images), args.cli_images)
        for index in range(self.count):
            (self.many / f"{index:04d}.jpg").write_bytes(images[index % len(images)])
        (self.one / "0000.jpg").write_bytes(images[0])
        self.startups: list[float] = []
        self.totals: list[float] = []
        self._time(self.one)  # fills the OS file cache for the model and libraries

    def round(self) -> None:
        self.startups.append(self._time(self.one))
        self.totals.append(self._time(self.many))

    def result(self) -> dict[str, float]:
        startup, total = min(self.startups), min(self.totals)
        if total <= startup:
            raise SystemExit(f"the CLI run on {self.count} images was no longer than on one: too noisy to measure")
        return {
            "images": self.count,
            "seconds": round(total, 2),
            "startup_seconds": round(startup, 2),
            "images_per_s": round((self.count - 1) / (total - startup), 2),
            "images_per_s_with_startup": round(self.count / total, 2),
        }

    def _time(self, folder: Path) -> float:
        output = self.workdir / "cli.jsonl"
        output.unlink(missing_ok=True)
        command = [sys.executable, "-m", "captioner.cli", "caption", str(folder), "--output", str(output)]
        command += ["--beam-size", str(self.args.beam_size), "--max-length", str(self.args.max_length)]
        if self.args.model:
            command += ["--model", self.args.model]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if finished.returncode != 0:
            raise SystemExit(f"the CLI failed ({finished.returncode}): {finished.stderr[-2000:]}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the service's default model)")
    parser.add_argument("--requests", type=int, default=256, help="measured requests per concurrency level")
    parser.add_argument("--images", type=int, default=32, help="distinct images")
    parser.add_argument("--cli-images", type=int, default=256, help="files (copies of the images) the CLI captions")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per mode and level; the best is kept")
    parser.add_argument("--size", type=int, default=224, help="side of the square test images in pixels")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching service's maximum batch")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    args = parser.parse_args()
    args.clients = [int(part) for part in args.clients.split(",")]
    if args.model:
        args.model = str(Path(args.model).resolve())
    images = make_images(args.images, args.size)
    with tempfile.TemporaryDirectory(prefix="service-load-") as temporary:
        workdir = Path(temporary)
        cli_timer = CliTimer(args, images, workdir)
        services = measure_services(args, images, workdir, cli_timer)
        cli = cli_timer.result()
    batching, unbatched = services["batching"], services["no_batching"]
    print(f"CLI: {cli}", flush=True)
    top = str(max(args.clients))
    summary = {
        "batching_speedup_16": round(batching[top]["requests_per_s"] / unbatched[top]["requests_per_s"], 2)
        if top == "16"
        else None,
        "service_vs_cli": round(batching[top]["requests_per_s"] / cli["images_per_s"], 2),
        # Worker CPU time per request without batching over with it: the gain in work done per image,
        # which load from other processes on the machine does not blur the way it blurs throughput.
        "batching_cpu_ratio_top": round(
            unbatched[top]["worker_cpu_ms_per_request"] / batching[top]["worker_cpu_ms_per_request"], 2
        ),
        "service_batching": batching,
        "service_no_batching": unbatched,
        "cli": cli,
        "settings": {
            "model": args.model or "default",
            "max_batch_size": args.max_batch_size,
            "beam_size": args.beam_size,
            "max_length": args.max_length,
            "image_size": args.size,
            "workers": args.workers,
            "cpus": os.cpu_count(),
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
