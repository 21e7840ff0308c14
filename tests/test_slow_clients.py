"""Slow clients against ``python -m service``: they hold no request thread, and their deadlines are totals.

The attack and the probes are bench/slow_clients.py's, run here against the tiny model; the unit tests
at the end check the worker's chunked-body framing on its own.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from service.worker import _ChunkedEnd, _MalformedChunk
from tests.test_bench import load_bench
from tests.test_service_server import Server, full_log, good_request, png

slow_clients = load_bench("slow_clients")


def assert_probes_answered(probes: list, healthz_within: float = 2.0, predict_within: float = 8.0) -> None:
    late = [
        p for p in probes if p.status != 200 or p.seconds > (healthz_within if p.path == "/healthz" else predict_within)
    ]
    assert not late, late
    assert sum(p.path == "/predict" for p in probes) >= 3


def test_64_slow_clients_for_40_s_hold_no_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Server(tiny_model_dir, tmp_path / "server.log")  # the default deadlines: 10 s headers, 30 s body
    try:
        with slow_clients.SlowClients(server.port, header_clients=32, body_clients=32, interval=2.0) as slow:
            time.sleep(1.0)
            assert slow.open_connections == 64
            probes = slow_clients.probe(server.port, seconds=40.0, image=png())
            closures = list(slow.closures)
        assert_probes_answered(probes)
        by_kind = {kind: [c for c in closures if c.kind == kind] for kind in ("headers", "body")}
        # Every trickler was closed by its deadline (the event loop checks deadlines once a second),
        # with a 408 since it had sent something; a header trickler reconnects and is closed again.
        assert len(by_kind["headers"]) >= 64 and len(by_kind["body"]) == 32, closures
        assert all(10.0 <= c.seconds <= 12.5 and c.status == 408 for c in by_kind["headers"]), by_kind["headers"]
        assert all(30.0 <= c.seconds <= 32.5 and c.status == 408 for c in by_kind["body"]), by_kind["body"]
        assert "Traceback" not in full_log(server)
        good_request(server)
    finally:
        server.stop()


def test_slow_clients_without_the_api_key_are_refused_at_their_headers(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Server(tiny_model_dir, tmp_path / "server.log", api_key="sesame")
    try:
        with slow_clients.SlowClients(server.port, header_clients=32, body_clients=32, interval=2.0) as slow:
            probes = slow_clients.probe(server.port, seconds=40.0, image=png(), api_key="sesame")
            closures = list(slow.closures)
        assert_probes_answered(probes)
        body = [c for c in closures if c.kind == "body"]
        headers = [c for c in closures if c.kind == "headers"]
        # A body trickler without a key is answered 401 at once and closed, without its body being read;
        # it reconnects half a second later, so each is refused many times over the 40 s.
        assert len(body) >= 32 * 20 and all(c.status == 401 and c.seconds < 2.0 for c in body), body[:5]
        assert len(headers) >= 64 and all(10.0 <= c.seconds <= 12.5 and c.status == 408 for c in headers), headers
        assert "Traceback" not in full_log(server)
    finally:
        server.stop()


def raw_exchange(port: int, data: bytes, wait_for: bytes = b"", then: bytes = b"") -> bytes:
    """Send ``data``; once the answer holds ``wait_for``, send ``then``; return all the server sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(data)
        answer = b""
        if wait_for:
            while wait_for not in answer:
                chunk = raw.recv(65536)
                assert chunk, answer
                answer += chunk
            raw.sendall(then)
        while chunk := raw.recv(65536):
            answer += chunk
    return answer


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    running = Server(tiny_model_dir, tmp_path_factory.mktemp("slow") / "server.log")
    yield running
    running.stop()


def predict_head(length: int, extra: str = "") -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode()


def test_expect_100_continue_is_answered_before_the_body(server: Server) -> None:
    image = png()
    answer = raw_exchange(
        server.port, predict_head(len(image), "Expect: 100-continue\r\n"), wait_for=b"\r\n\r\n", then=image
    )
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:200]
    assert answer.count(b"100 Continue") == 1  # the worker's thread does not send a second one


def test_a_request_refused_from_its_headers_gets_no_100_continue(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Server(tiny_model_dir, tmp_path / "server.log", api_key="sesame")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(predict_head(5000, "Expect: 100-continue\r\n"))  # no key, and the body never comes
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"100 Continue" not in answer
    finally:
        server.stop()


def test_pipelined_requests_on_one_connection_are_all_answered(server: Server) -> None:
    image = png()
    one = b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(image)
    last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(server.port, one + image + one + image + last)
    assert answer.count(b"HTTP/1.1 200 ") == 3, answer[:300]
    assert answer.rstrip().endswith(b'{"status":"ok"}'), answer[-100:]


def test_an_oversized_announced_body_is_refused_without_reading_it(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(predict_head(50 * 1024 * 1024))  # the body never comes
        started = time.monotonic()
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
        assert time.monotonic() - started < 2.0  # answered and closed at once, not after a deadline
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"Connection: close" in answer


@pytest.mark.parametrize(
    "chunks",
    [
        b"4\r\nabcd\r\n0\r\n\r\n",
        b"4;ext=1\r\nabcd\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nTrailer: yes\r\n\r\n",
        b"0\r\n\r\n",
    ],
    ids=["one-chunk", "extension-and-trailer", "empty"],
)
def test_the_end_of_a_chunked_body_is_found_however_it_is_split(chunks: bytes) -> None:
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    message = head + chunks + b"NEXT REQUEST"
    end = len(head) + len(chunks)
    for split in range(len(head), len(message) + 1):
        scanner = _ChunkedEnd(len(head))
        data = bytearray(message[:split])
        found = scanner.end(data)
        data += message[split:]
        found = found if found is not None else scanner.end(data)
        assert found == end, split
    incomplete = _ChunkedEnd(len(head))
    assert incomplete.end(bytearray(head + chunks[:-1])) is None


@pytest.mark.parametrize("chunks", [b"zz\r\nabc\r\n", b"\r\n", b"4\r\nabcd\r\n-1\r\n", b"9" * 2000])
def test_a_malformed_chunk_size_is_reported(chunks: bytes) -> None:
    with pytest.raises(_MalformedChunk):
        _ChunkedEnd(0).end(bytearray(chunks))
