"""The caption service as deployed: ``python -m service`` running real gunicorn on a local port.

One server (one worker, so its metrics are exact) is shared by the module; the SIGTERM test starts
its own because it stops it. Images are tiny and most requests ask for short greedy captions, so the
whole module stays fast on a two-core machine.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner
from tests.test_bench import load_bench

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
FAST = "beam_size=1&max_length=3"
UPLOAD_LIMIT = 1_000_000


def png(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header announcing ``width`` x ``height`` pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def multipart(fields: list[tuple[str, bytes | str]], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode form fields and files named ``image``; returns the body and its Content-Type."""
    boundary = "----captioner-test-boundary"
    parts = []
    for name, value in fields:
        text = value.encode() if isinstance(value, str) else value
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + text + b"\r\n")
    for filename, data in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
) -> Response:
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request(method, path, body=body, headers=headers)
    answer = connection.getresponse()
    data = answer.read()  # raises IncompleteRead if the response is cut short
    return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended while we looked
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS) or at its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


class Server:
    """``python -m service`` in a subprocess, its output in a log file."""

    def __init__(
        self, model_dir: Path, log_path: Path, threads: int = 16, api_key: str | None = None, **environment: str
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = os.environ | {"CAPTIONER_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)} | environment
        env.pop("CAPTIONER_API_KEY", None)  # never one from the environment the tests run in
        if api_key is not None:
            env["CAPTIONER_API_KEY"] = api_key
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--model", str(model_dir), "--workers", "1", "--threads", str(threads)]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/readyz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server was not ready within {timeout}s:\n{self.log()}")

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Response:
        connection = self.connect()
        try:
            return send(connection, method, path, body, content_type)
        finally:
            connection.close()

    def worker_pid(self) -> int:
        workers = children_of(self.process.pid)
        assert len(workers) == 1, workers
        return workers[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tiny_model_dir, tmp_path_factory.mktemp("service") / "server.log")
    yield running
    running.stop()


def caption_of(response: Response) -> str:
    assert response.status == 200, response.body
    return response.json()["results"][0]["captions"][0]["caption"]


def test_every_input_form_gives_the_python_api_caption(server: Server, tiny_model_dir: Path) -> None:
    image = png(5)
    expected = Captioner.from_pretrained(tiny_model_dir, device="cpu").caption(image)
    form, form_type = multipart([], [("x.png", image)])
    as_json = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    responses = [
        server.request("POST", "/predict", form, form_type),
        server.request("POST", "/predict", image, "image/png"),
        server.request("POST", "/predict", as_json, "application/json"),
    ]
    assert [caption_of(r) for r in responses] == [expected.caption] * 3
    for response in responses:
        assert response.json()["results"][0]["captions"][0]["score"] == pytest.approx(expected.score, abs=1e-4)


def good_request(server: Server) -> None:
    assert caption_of(server.request("POST", f"/predict?{FAST}", png(), "image/png"))


LONG_INTEGER = "1" * 5000  # over Python's limit on digits for int(), which raises ValueError
LONG_INTEGER_JSON = f'{{"image": "{base64.b64encode(png()).decode()}", "beam_size": {LONG_INTEGER}}}'.encode()
LONG_INTEGER_FORM = multipart([("beam_size", LONG_INTEGER)], [("x.png", png())])

BAD_REQUESTS = [
    pytest.param("POST", "/predict", b"", None, 400, "missing_image", id="no-image"),
    pytest.param("POST", "/predict", LONG_INTEGER_JSON, "application/json", 400, "invalid_json", id="long-int-json"),
    pytest.param("POST", "/predict", *LONG_INTEGER_FORM, 400, "invalid_option", id="long-int-form"),
    pytest.param("POST", "/predict", b"not an image at all", "image/png", 422, "not_an_image", id="not-an-image"),
    pytest.param("POST", "/predict", png()[:300], "image/png", 422, "truncated", id="truncated"),
    pytest.param("POST", "/predict", b"\x89PNG\r\n\x1a\n" + b"\xff" * 30, "image/png", 422, "undecodable", id="bad"),
    pytest.param("POST", "/predict", b"hello", "text/plain", 415, "unsupported_media_type", id="text-plain"),
    pytest.param("POST", "/predict?beam_size=0", png(), "image/png", 400, "invalid_option", id="bad-option"),
    pytest.param("POST", "/predict", b"{", "application/json", 400, "invalid_json", id="bad-json"),
    pytest.param("POST", "/predict", b"\0" * (UPLOAD_LIMIT + 1), "image/png", 413, "payload_too_large", id="too-big"),
    pytest.param("GET", "/nowhere", None, None, 404, "not_found", id="unknown-route"),
    pytest.param("PUT", "/predict", b"", None, 405, "method_not_allowed", id="wrong-method"),
]


@pytest.mark.parametrize(("method", "path", "body", "content_type", "status", "code"), BAD_REQUESTS)
def test_each_bad_input_class_then_a_good_request(
    server: Server, method: str, path: str, body: bytes | None, content_type: str | None, status: int, code: str
) -> None:
    response = server.request(method, path, body, content_type)
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code
    assert "Traceback" not in response.body.decode() and str(REPO_ROOT) not in response.body.decode()
    good_request(server)


def test_an_announced_oversized_body_is_refused_before_it_is_sent(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(
            b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: 100000000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = raw.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer
    good_request(server)


def test_a_chunked_body_over_the_limit_is_cut_off(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(UPLOAD_LIMIT // 65536 + 2):
            yield b"\0" * 65536

    connection = server.connect()
    connection.request("POST", "/predict", body=chunks(), headers={"Content-Type": "image/png"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "payload_too_large"
    connection.close()
    good_request(server)


FORM_TYPE = multipart([], [])[1]
BODY_TYPES = [
    pytest.param("image/png", id="raw"),
    pytest.param("application/json", id="json"),
    pytest.param(FORM_TYPE, id="multipart"),
]


def request_head(content_type: str, request_id: str, length: int | None = None) -> bytes:
    """A POST /predict head announcing a chunked body, or ``length`` bytes; the server closes after answering."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (
        f"POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Type: {content_type}\r\n{framing}\r\n\r\n"
    ).encode()


def exchange(server: Server, data: bytes, end_body: bool = False) -> tuple[int, Any]:
    """Send raw bytes (then, with ``end_body``, end the sending side as a client that stops mid-body) and
    read the whole answer: its status and JSON body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(data)
        if end_body:
            raw.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def full_log(server: Server) -> str:
    return server.log_path.read_text(errors="replace")


@pytest.mark.parametrize("content_type", BODY_TYPES)
@pytest.mark.parametrize(
    "chunks", [b"zz\r\nabc\r\n0\r\n\r\n", b"4\r\nabcd\r\nQQ\r\n0\r\n\r\n"], ids=["first-size", "later-size"]
)
def test_a_malformed_chunked_body_is_400(server: Server, content_type: str, chunks: bytes) -> None:
    # gunicorn raises InvalidChunkSize (its own ParseException) from the body stream.
    status, body = exchange(server, request_head(content_type, "malformed") + chunks)
    assert status == 400 and body["error"]["code"] == "malformed_body", body
    assert "Traceback" not in full_log(server)
    good_request(server)


@pytest.mark.parametrize("content_type", BODY_TYPES)
@pytest.mark.parametrize("length", [None, 1000], ids=["chunked", "content-length"])
def test_a_client_closing_mid_body_is_one_log_line(server: Server, content_type: str, length: int | None) -> None:
    # Chunked, gunicorn raises NoMoreData (an OSError; ClientDisconnected through werkzeug's stream); with
    # a Content-Length its stream just ends early.
    partial = b"100\r\nabcd" if length is None else b"abcd"
    tag = f"cut-{content_type.partition(';')[0].replace('/', '-')}-{length}"
    status, body = exchange(server, request_head(content_type, f"{tag}-half", length) + partial, end_body=True)
    assert status == 400 and body["error"]["code"] == "incomplete_body", body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:  # gone without reading the answer
        raw.sendall(request_head(content_type, f"{tag}-gone", length) + partial)
    deadline = time.monotonic() + 30
    while f"{tag}-gone" not in full_log(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = full_log(server)
    for request_id in (f"{tag}-half", f"{tag}-gone"):
        lines = [line for line in log.splitlines() if request_id in line]
        assert len(lines) == 1 and "[INFO]" in lines[0] and "ended before it was complete" in lines[0], lines
    assert "Traceback" not in log
    good_request(server)


def test_a_header_claiming_60000_by_60000_pixels_is_413_without_memory_growth(server: Server) -> None:
    worker = server.worker_pid()
    good_request(server)
    before = rss_bytes(worker)
    bomb = png_claiming(60000, 60000)
    for _ in range(3):
        response = server.request("POST", "/predict", bomb, "image/png")
        assert response.status == 413 and response.json()["error"]["code"] == "too_many_pixels"
    assert rss_bytes(worker) - before < 100 * 2**20
    good_request(server)


IMAGE_BENCH = load_bench("image_decode")  # the hostile files test_images.py decodes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "content_type"),
    [(lambda: IMAGE_BENCH.webp(4096, 4096), "image/webp"), (IMAGE_BENCH.float_tiff, "image/tiff")],
    ids=["WebP 4096x4096", "float TIFF 40 MP"],
)
def test_16_requests_of_the_costliest_allowed_images_stay_within_memory(
    tiny_model_dir: Path, tmp_path: Path, make: Any, content_type: str
) -> None:
    # A lossless WebP of 4096x4096 is the costliest image the default budget lets through (libwebp's
    # canvases and PIL's copy take about 270 MB while it decodes); a float TIFF at the pixel limit is
    # decoded in PIL's own blocks, which malloc keeps after they are freed unless trimmed. Both are
    # small on the wire. Two decode slots are set, as python -m service gives a worker on two cores, so
    # that the bound does not depend on the machine running the test.
    costly = make()
    assert len(costly) < UPLOAD_LIMIT
    server = Server(tiny_model_dir, tmp_path / "server.log", CAPTIONER_DECODE_CONCURRENCY="2")
    try:
        worker = server.worker_pid()
        good_request(server)
        before = rss_bytes(worker)
        with ThreadPoolExecutor(16) as pool:
            answers = [pool.submit(server.request, "POST", f"/predict?{FAST}", costly, content_type) for _ in range(16)]
            responses = [answer.result(120) for answer in answers]
        peak = rss_bytes(worker, "VmHWM")
        for response in responses:
            assert response.status in (200, 413, 422, 503), response.body
            if response.status == 503:
                assert response.json()["error"]["code"] == "timeout"
        good_request(server)
        assert peak < 2.5e9, (before, peak)
        # Freed decode buffers go back to the system (malloc_trim) rather than staying in malloc's arenas.
        settle = time.monotonic() + 10
        while rss_bytes(worker) > 1.25 * before and time.monotonic() < settle:
            time.sleep(0.5)
        after = rss_bytes(worker)
        assert after <= 1.25 * before, (before, peak, after)
        assert server.worker_pid() == worker  # the worker never died and was replaced
    finally:
        server.stop()


def soak(server: Server, total: int, clients: int) -> list[tuple[str, int, Any]]:
    """``total`` requests from ``clients`` threads on kept-alive connections, a quarter of them bad."""
    form, form_type = multipart([("beam_size", "1"), ("max_length", "3")], [("a.png", png(1))])
    document = {"image": base64.b64encode(png(4)).decode(), "beam_size": 1, "max_length": 3}
    good = [
        ("good", f"/predict?{FAST}", png(3), "image/png"),
        ("good", "/predict", form, form_type),
        ("good", "/predict", json.dumps(document).encode(), "application/json"),
    ]
    bad = [
        ("422", "/predict", b"garbage bytes", "image/png"),
        ("422", "/predict", png(5)[:150], "image/png"),
        ("400", f"/predict?{FAST}", b"", None),
        ("400", "/predict?beam_size=999", png(6), "image/png"),
        ("415", "/predict", b"text", "text/plain"),
    ]
    plan = [bad[(i // 4) % len(bad)] if i % 4 == 3 else good[i % len(good)] for i in range(total)]
    outcomes: list[tuple[str, int, Any]] = []
    lock = threading.Lock()

    def client(share: list[tuple[str, str, bytes, str | None]]) -> None:
        connection = server.connect()
        try:
            for kind, path, body, content_type in share:
                response = send(connection, "POST", path, body, content_type)
                with lock:
                    outcomes.append((kind, response.status, response.json()))
        finally:
            connection.close()

    with ThreadPoolExecutor(clients) as pool:
        for finished in [pool.submit(client, plan[i::clients]) for i in range(clients)]:
            finished.result()  # re-raises a dropped connection or a truncated response
    return outcomes


@pytest.mark.slow
def test_soak_1000_requests_from_16_clients_beside_32_slow_ones(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A server of its own: the slow clients' cut requests, answered after they leave, would count in
    # another test's metrics.
    server = Server(tiny_model_dir, tmp_path / "server.log")
    try:
        soak_beside_slow_clients(server)
    finally:
        server.stop()


def soak_beside_slow_clients(server: Server) -> None:
    worker = server.worker_pid()
    soak(server, total=100, clients=16)  # warm up: allocator arenas and caches reach their working size
    before = rss_bytes(worker)
    # Beside it, 32 connections trickle a request's headers or body (bench/slow_clients.py).
    with load_bench("slow_clients").SlowClients(server.port, header_clients=16, body_clients=16) as slow:
        outcomes = soak(server, total=1000, clients=16)
        closures = list(slow.closures)
    # Each slow connection was held until its deadline (10 s), then reconnected: they attacked throughout.
    assert all(closure.seconds >= 9.5 for closure in closures), closures
    after = rss_bytes(worker)
    assert len(outcomes) == 1000
    assert not [o for o in outcomes if o[1] >= 500]
    for kind, status, body in outcomes:
        if kind == "good":
            assert status == 200 and body["results"] and all(r["captions"][0]["caption"] for r in body["results"])
        else:
            assert status == int(kind) and set(body) == {"error"}
    assert sum(kind == "good" for kind, _, _ in outcomes) == 750
    assert abs(after - before) <= 0.10 * before, (before, after)
    assert server.worker_pid() == worker  # the worker never died and was replaced


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the text exposition format strictly enough to catch malformed output."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    sample_line = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"} and name not in types
            types[name] = kind
            continue
        match = sample_line.fullmatch(line)
        assert match, f"malformed line {line!r}"
        name, labels_text, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line before it"
        labels: list[tuple[str, str]] = []
        position = 0
        while labels_text and position < len(labels_text):
            found = label.match(labels_text, position)
            assert found, f"malformed labels in {line!r}"
            labels.append((found.group(1), found.group(2)))
            position = found.end()
        samples[(name, tuple(labels))] = float(value)
    for name, kind in types.items():
        if kind != "histogram":
            continue
        series = {key[1] for key in samples if key[0] == f"{name}_count"}
        for labels in series:
            buckets = sorted(
                (float(dict(k[1])["le"]), v)
                for k, v in samples.items()
                if k[0] == f"{name}_bucket" and tuple(p for p in k[1] if p[0] != "le") == labels
            )
            counts = [v for _, v in buckets]
            assert buckets[-1][0] == math.inf and counts == sorted(counts)
            assert samples[(f"{name}_count", labels)] == counts[-1]
    return samples


def test_metrics_parse_and_count_exactly_the_requests_sent(server: Server) -> None:
    def requests_counted() -> dict[tuple[str, str, str], float]:
        samples = parse_prometheus(server.request("GET", "/metrics").body.decode())
        return {
            (labels["endpoint"], labels["method"], labels["status"]): value
            for (name, pairs), value in samples.items()
            if name == "captioner_http_requests_total"
            for labels in [dict(pairs)]
        }

    response = server.request("GET", "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    before = requests_counted()
    sent = {
        ("/predict", "POST", "200"): 3,
        ("/predict", "POST", "422"): 2,
        ("/predict", "POST", "415"): 1,
        ("/healthz", "GET", "200"): 4,
        ("unmatched", "GET", "404"): 2,
    }
    for _ in range(3):
        good_request(server)  # each good request is also counted: 3 in all
    for _ in range(2):
        server.request("POST", "/predict", b"junk", "image/png")
    server.request("POST", "/predict", b"x", "text/plain")
    for _ in range(4):
        server.request("GET", "/healthz")
    server.request("GET", "/a")
    server.request("GET", "/b/c")
    after = requests_counted()
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in set(after) | set(before)}
    delta = {key: value for key, value in delta.items() if value and key[0] != "/metrics"}
    assert delta == sent
    samples = parse_prometheus(server.request("GET", "/metrics").body.decode())
    assert samples[("captioner_model_ready", ())] == 1
    assert samples[("captioner_queue_depth", ())] == 0
    assert samples[("captioner_batch_size_count", ())] >= 3
    info = [dict(labels) for name, labels in samples if name == "captioner_model_info"]
    assert info == [{"name": "tiny-test", "version": "0", "device": "cpu"}]


@pytest.mark.slow
def test_the_page_captions_a_dropped_image_and_shows_attention(
    server: Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (install Debian's 'chromium' package to run the browser test)")
    from playwright.sync_api import sync_playwright

    image_path = tmp_path / "photo.png"
    image_path.write_bytes(png(9, size=96))
    expected = Captioner.from_pretrained(tiny_model_dir, device="cpu").caption(image_path.read_bytes())
    arguments = [
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic",
    ]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=arguments)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.set_input_files("#file-input", str(image_path))
            page.wait_for_selector("#caption .word", timeout=60_000)
            words = page.locator("#caption .word").all_inner_texts()
            assert " ".join(words) == expected.caption
            assert page.locator("#n-best-list li").count() >= 1
            plain = page.evaluate("document.getElementById('canvas').toDataURL()")
            page.hover("#caption .word >> nth=0")
            highlighted = page.evaluate("document.getElementById('canvas').toDataURL()")
            assert highlighted != plain  # the heat map is drawn over the image
            page.mouse.move(0, 0)
            assert page.evaluate("document.getElementById('canvas').toDataURL()") == plain
        finally:
            browser.close()


@pytest.mark.slow
def test_sigterm_lets_accepted_requests_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    # A long batching window keeps the burst inside the server while it is told to stop.
    server = Server(
        tiny_model_dir, tmp_path / "server.log", CAPTIONER_MAX_WAIT_MS="3000", CAPTIONER_MAX_BATCH_SIZE="64"
    )
    try:
        burst = 8
        with ThreadPoolExecutor(burst) as pool:
            answers = [
                pool.submit(server.request, "POST", f"/predict?{FAST}", png(i), "image/png") for i in range(burst)
            ]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                metrics = parse_prometheus(server.request("GET", "/metrics").body.decode())
                if metrics[("captioner_predict_in_flight", ())] == burst:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the burst never reached the server")
            os.kill(server.process.pid, signal.SIGTERM)
            late: list[str] = []
            for _ in range(5):  # requests started after SIGTERM: refused, or (if still accepted) fully answered
                try:
                    response = server.request("POST", f"/predict?{FAST}", png(), "image/png")
                    late.append(str(response.status))
                    assert response.status == 200 and response.json()["results"]
                except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
                    late.append("refused")
                time.sleep(0.05)
            results = [answer.result(60) for answer in answers]
        assert [r.status for r in results] == [200] * burst
        assert all(r.json()["results"][0]["captions"][0]["caption"] for r in results)
        assert server.process.wait(60) == 0, server.log()
        assert late[-1] == "refused", late
        with pytest.raises(ConnectionRefusedError):
            server.request("GET", "/healthz")
    finally:
        server.stop()
