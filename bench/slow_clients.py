"""The service under slow clients: its probes' latency while connections trickle requests a byte at a time.

    python bench/slow_clients.py [--model DIR] [--slow 64] [--seconds 40] [--interval 2]
                                 [--worker-classes service.worker.RequestBufferingWorker,gthread]

For each gunicorn worker class, starts the service (one worker, 16 threads, gunicorn run as
``python -m service`` runs it) on a free local port, opens ``--slow`` connections of which half send
a request's headers and half a request's body one byte every ``--interval`` seconds (each reconnects
once the server closes it), and meanwhile asks ``/healthz`` every second and ``/predict`` (one small
image) every four. Reported per worker class: how many probes failed or took over 2 s (``/healthz``)
or 8 s (``/predict``), their latency percentiles, and after how long the server closed the slow
connections. The last line printed is one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_WORKER = "service.worker.RequestBufferingWorker"
BODY_HEAD = b"POST /predict HTTP/1.1\r\nHost: slow\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
# A header that never ends: the trickle runs out of time long before it runs out of bytes.
ENDLESS_HEAD = b"POST /predict HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 4096


@dataclass
class Closure:
    """A slow connection the server closed: what it was trickling, after how long, and its answer."""

    kind: str  # "headers" or "body"
    seconds: float  # since the trickled part began: the connection's start, or the end of its headers
    status: int | None  # the status the server answered before closing; None for no answer


@dataclass
class _Slow:
    kind: str
    sock: socket.socket
    started: float
    next_send: float
    sent: int = 0
    answer: bytes = b""


@dataclass
class SlowClients:
    """``header_clients + body_clients`` connections trickling one byte every ``interval`` seconds."""

    port: int
    header_clients: int
    body_clients: int
    interval: float = 2.0
    reconnect_after: float = 0.5
    closures: list[Closure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._reconnects: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)

    def __enter__(self) -> SlowClients:
        for kind, count in (("headers", self.header_clients), ("body", self.body_clients)):
            for _ in range(count):
                self._connect(kind)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    @property
    def open_connections(self) -> int:
        return len(self._selector.get_map())

    def _connect(self, kind: str) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        now = time.monotonic()
        if kind == "body":
            sock.sendall(BODY_HEAD)
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, _Slow(kind, sock, now, now))

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                self._receive(key.data)
            now = time.monotonic()
            for key in list(self._selector.get_map().values()):
                slow: _Slow = key.data
                if now >= slow.next_send:
                    self._send_one(slow, now)
            due = [kind for at, kind in self._reconnects if at <= now]
            self._reconnects = [(at, kind) for at, kind in self._reconnects if at > now]
            for kind in due:
                try:
                    self._connect(kind)
                except OSError:
                    self._reconnects.append((now + self.reconnect_after, kind))

    def _send_one(self, slow: _Slow, now: float) -> None:
        byte = ENDLESS_HEAD[slow.sent : slow.sent + 1] if slow.kind == "headers" else b"x"
        try:
            slow.sock.send(byte)
        except BlockingIOError:
            pass
        except OSError:
            self._closed(slow)
            return
        slow.sent += 1
        slow.next_send = now + self.interval

    def _receive(self, slow: _Slow) -> None:
        try:
            data = slow.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            slow.answer += data
            return
        self._closed(slow)

    def _closed(self, slow: _Slow) -> None:
        status_line = slow.answer.split(b"\r\n", 1)[0].split()
        status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None
        self.closures.append(Closure(slow.kind, time.monotonic() - slow.started, status))
        self._selector.unregister(slow.sock)
        slow.sock.close()
        self._reconnects.append((time.monotonic() + self.reconnect_after, slow.kind))


@dataclass
class Probe:
    path: str
    status: int | None  # None: no answer (a timeout or a refused connection)
    seconds: float


def probe(port: int, seconds: float, image: bytes, api_key: str | None = None, timeout: float = 10.0) -> list[Probe]:
    """``GET /healthz`` every second and ``POST /predict`` with ``image`` every fourth, for ``seconds``."""
    probes: list[Probe] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    end = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < end:
        started = time.monotonic()
        for path in ["/healthz"] + (["/predict"] if tick % 4 == 0 else []):
            body = image if path == "/predict" else None
            content = {"Content-Type": "image/png"} if body else {}
            probe_start = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                connection.request("POST" if body else "GET", path, body=body, headers=headers | content)
                response = connection.getresponse()
                response.read()
                status: int | None = response.status
            except OSError:
                status = None
            finally:
                connection.close()
            probes.append(Probe(path, status, time.monotonic() - probe_start))
        tick += 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return probes


def probe_png(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: str, worker_class: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """gunicorn with the service's settings, as ``python -m service`` runs it, but the given worker class."""
    env = os.environ | {
        "CAPTIONER_HOST": "127.0.0.1", "CAPTIONER_PORT": str(port), "CAPTIONER_WORKERS": "1",
        "CAPTIONER_THREADS": "16", "CAPTIONER_MODEL_DIR": os.path.abspath(model), "CAPTIONER_ACCESS_LOG": "false",
    }  # fmt: skip
    command = [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_config", "-k", worker_class]
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "service.wsgi:app"], cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"the service did not become ready:\n{log.read_text()[-2000:]}")


def summarise(probes: list[Probe], closures: list[Closure]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for path, limit in (("/healthz", 2.0), ("/predict", 8.0)):
        mine = [p for p in probes if p.path == path]
        seconds = sorted(p.seconds for p in mine)
        name = path.strip("/")
        summary[f"{name}_probes"] = len(mine)
        summary[f"{name}_failed"] = sum(p.status != 200 or p.seconds > limit for p in mine)
        summary[f"{name}_p50_s"] = round(statistics.median(seconds), 3) if seconds else None
        summary[f"{name}_max_s"] = round(seconds[-1], 3) if seconds else None
    for kind in ("headers", "body"):
        closed = [c.seconds for c in closures if c.kind == kind]
        summary[f"slow_{kind}_closed"] = len(closed)
        summary[f"slow_{kind}_closed_after_s"] = round(statistics.median(closed), 1) if closed else None
    return summary


def main(args: argparse.Namespace) -> None:
    image = probe_png()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for worker_class in args.worker_classes.split(","):
            port = free_port()
            process = start_service(args.model, worker_class, port, Path(scratch) / "server.log")
            try:
                with SlowClients(port, args.slow // 2, args.slow - args.slow // 2, args.interval) as slow:
                    probes = probe(port, args.seconds, image, timeout=args.probe_timeout)
                    closures = list(slow.closures)
            finally:
                process.terminate()
                process.wait(60)
            summary = summarise(probes, closures)
            results[worker_class] = summary
            print(f"{worker_class}: " + ", ".join(f"{key} {value}" for key, value in summary.items()), flush=True)
    print(json.dumps({"slow": args.slow, "seconds": args.seconds, "interval": args.interval, "results": results}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "weights" / "default"))
    parser.add_argument("--slow", type=int, default=64, help="slow connections, half headers, half body")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between two bytes of a slow client")
    parser.add_argument("--probe-timeout", type=float, default=10.0, help="seconds a probe waits for its answer")
    parser.add_argument("--worker-classes", default=f"{SERVICE_WORKER},gthread")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
