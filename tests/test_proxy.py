"""deploy/nginx/nginx.conf, the reverse proxy of docker-compose.yml, under a real nginx.

The shipped file is the one tested: it is copied with a few substitutions, each of which must match
exactly once (listen and upstream addresses on 127.0.0.1, temporary directories in the test's folder
and, for the slow-client tests, 2 s client timeouts instead of 10 s and 30 s), and nginx runs it in the
foreground with its own pid and log files. In front of it runs a real ``python -m service`` with the
tiny random-weight model and only two request threads, so that a few slow clients would hold all of
gunicorn's threads if nginx let them through. A stand-in upstream records what nginx forwards.

The tests need the ``nginx`` binary (Debian's ``nginx`` package, which .ci/run installs) and are
skipped without it, except the check that the body limit equals the service's.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from service.config import ServiceConfig
from tests.conftest import http_stand_in
from tests.test_service_server import Response, Server, free_port, parse_prometheus, png

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "deploy" / "nginx"
SHIPPED = CONFIG_DIR / "nginx.conf"
# Debian installs nginx in /usr/sbin, which is not on an unprivileged user's PATH.
NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="the nginx binary is absent (install Debian's 'nginx' package; .ci/run does)"
)
TIMEOUT_S = 2  # the client header and body timeouts the slow-client tests run with
MAX_BODY = ServiceConfig().max_upload_bytes
FAST = "beam_size=1&max_length=3"
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def directive(text: str, name: str) -> str:
    """The value of a directive that occurs once in ``text``."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", text, flags=re.MULTILINE)
    assert len(values) == 1, (name, values)
    return values[0].strip()


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit.lower()]


def test_the_body_limit_is_the_services_upload_limit() -> None:
    """nginx must refuse exactly what the service would refuse (changed together; see the comment)."""
    assert size_bytes(directive(SHIPPED.read_text(), "client_max_body_size")) == MAX_BODY
    assert "CAPTIONER_MAX_UPLOAD_BYTES" in SHIPPED.read_text()


class Nginx:
    """The shipped config, rendered into ``folder`` and run by a foreground nginx."""

    def __init__(self, folder: Path, upstream_port: int, *, api_conf: Path | None = None, **timeouts: int) -> None:
        self.folder = folder
        self.port = free_port()
        self.conf = folder / "conf" / "nginx.conf"
        self.conf.parent.mkdir(parents=True)
        text = SHIPPED.read_text()
        temp = "".join(
            f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        substitutions = [("listen 8080;", f"listen 127.0.0.1:{self.port};"), ("http {\n", "http {\n" + temp)]
        for name, seconds in timeouts.items():
            substitutions.append((f"{name} {directive(text, name)};", f"{name} {seconds}s;"))
        for old, new in substitutions:
            assert text.count(old) == 1, f"{old!r} is not in {SHIPPED} exactly once"
            text = text.replace(old, new)
        self.conf.write_text(text)
        upstream = api_conf.read_text() if api_conf else f"set $captioner_api 127.0.0.1:{upstream_port};\n"
        (self.conf.parent / "captioner-api.conf").write_text(upstream)
        globals_ = f"daemon off; pid {folder / 'nginx.pid'};"
        if os.geteuid() == 0:  # else the workers run as nobody, who cannot enter pytest's private tmp folder
            globals_ += " user root;"
        self.command = [NGINX or "nginx", "-p", f"{folder}/", "-c", str(self.conf), "-e", str(folder / "error.log")]
        self.command += ["-g", globals_]
        self.process: subprocess.Popen[bytes] | None = None

    def test(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, "-t"], capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        with (self.folder / "access.log").open("wb") as out, (self.folder / "stderr.log").open("wb") as err:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=err)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited with {self.process.returncode}:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nginx did not listen within 30 s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-3000:]
            for path in (self.folder / "error.log", self.folder / "stderr.log", self.folder / "access.log")
            if path.exists()
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@needs_nginx
@pytest.mark.parametrize("api_conf", sorted(CONFIG_DIR.glob("api*.conf")), ids=lambda path: path.name)
def test_nginx_accepts_the_shipped_config(api_conf: Path, tmp_path: Path) -> None:
    """``nginx -t`` on the shipped file with each shipped upstream file (names resolve per request)."""
    result = Nginx(tmp_path, 0, api_conf=api_conf).test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


class Service(Server):
    """``python -m service`` on 127.0.0.1 with two request threads and the default upload limit."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        super().__init__(model_dir, log_path, threads=2, CAPTIONER_MAX_UPLOAD_BYTES=str(MAX_BODY))

    def predict_requests(self) -> dict[str, float]:
        """POST /predict requests the service has answered, by status."""
        samples = parse_prometheus(self.request("GET", "/metrics").body.decode())
        counts = {}
        for (name, pairs), value in samples.items():
            labels = dict(pairs)
            if name == "captioner_http_requests_total" and labels["endpoint"] == "/predict":
                counts[labels["status"]] = value
        return counts


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Response:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        answer = connection.getresponse()
        data = answer.read()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    finally:
        connection.close()


def good_request(port: int) -> Response:
    answer = request(port, "POST", f"/predict?{FAST}", png(), {"Content-Type": "image/png"})
    assert answer.status == 200, answer.body
    return answer


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if NGINX is None:
        pytest.skip("the nginx binary is absent")
    running = Service(tiny_model_dir, tmp_path_factory.mktemp("service") / "service.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def proxy(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """The shipped config in front of the service, with 2 s client header and body timeouts."""
    timeouts = {"client_header_timeout": TIMEOUT_S, "client_body_timeout": TIMEOUT_S}
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), service.port, **timeouts).start()
    yield nginx
    nginx.stop()


def read_response(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or resets) the connection or its response is complete."""
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, flags=re.IGNORECASE)
        if separator and length and len(body) >= int(length.group(1)):
            return data  # complete: do not wait out nginx's lingering close
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@needs_nginx
def test_a_good_request_through_nginx_is_answered_by_the_service(proxy: Nginx, service: Service) -> None:
    direct = good_request(service.port).json()
    proxied = good_request(proxy.port)
    assert set(proxied.json()) == set(direct) and set(proxied.json()["results"][0]) == set(direct["results"][0])
    assert proxied.json()["results"] == direct["results"]  # the same model, greedy: the same caption
    assert "content-security-policy" in proxied.headers  # the service's own response
    # The client's request id reaches the service and comes back; without one nginx makes one.
    tagged = request(
        proxy.port, "POST", f"/predict?{FAST}", png(), {"Content-Type": "image/png", "X-Request-ID": "t-1"}
    )
    assert tagged.status == 200 and tagged.headers["x-request-id"] == "t-1"
    assert re.fullmatch(r"[0-9a-f]{32}", proxied.headers["x-request-id"])
    assert f"request_id={proxied.headers['x-request-id']}" in (proxy.folder / "access.log").read_text()


@needs_nginx
def test_a_chunked_upload_reaches_the_service_whole(proxy: Nginx) -> None:
    image = png(3)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            f"POST /predict?{FAST} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        for start in range(0, len(image), 4096):
            piece = image[start : start + 4096]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.05)
        sock.sendall(b"0\r\n\r\n")
        response = read_response(sock)
    assert status_of(response) == 200, response[:500]
    assert json.loads(response.split(b"\r\n\r\n", 1)[1])["results"][0]["captions"][0]["caption"]


@needs_nginx
def test_nginx_refuses_an_oversized_body_itself(proxy: Nginx, service: Service) -> None:
    before = service.predict_requests()
    # Announced: refused from the header alone, before any of the body is sent.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
            % (MAX_BODY + 1)
        )
        head, _, body = read_response(sock).partition(b"\r\n\r\n")
    assert status_of(head) == 413
    assert b"content-security-policy" not in head.lower()  # nginx's answer, not the service's
    assert json.loads(body)["error"]["code"] == "payload_too_large"  # the service's error shape
    # Chunked, with no announced length: refused once the limit is passed.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"\0" * 65536
        try:
            for _ in range(MAX_BODY // len(piece) + 1):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            pass  # nginx may answer and stop reading before the last chunk is sent
        response = read_response(sock)
    assert status_of(response) == 413, response[:300]
    assert service.predict_requests() == before  # the service saw neither
    # A body of exactly the limit passes nginx; the service answers it (not an image: 422).
    answer = request(proxy.port, "POST", "/predict", b"\0" * MAX_BODY, {"Content-Type": "image/png"})
    assert answer.status == 422 and answer.json()["error"]["code"] == "not_an_image"
    assert "content-security-policy" in answer.headers


def trickle(data: bytes, port: int, interval: float, head: bytes = b"", limit_s: float = 20) -> float | None:
    """Send ``head`` at once, then ``data`` one byte every ``interval`` seconds; the seconds from connecting
    to the moment the server ended the connection, or None when it was still open after ``limit_s`` or
    all was sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(head)
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                try:
                    received = sock.recv(65536)
                except ConnectionResetError:
                    received = b""
                if not received:
                    return time.monotonic() - started
                raise AssertionError(f"nginx answered a request it had not fully received: {received[:200]!r}")
            if time.monotonic() - started > limit_s:
                return None
    return None


def stall(head: bytes, port: int) -> float:
    """Send ``head`` at once, then nothing: the seconds until the server ends the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sent = time.monotonic()
        received = read_response(sock)
        assert not received, received[:200]  # cut without forwarding anything (a 408 is logged only)
        return time.monotonic() - sent


PREDICT_HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"


@needs_nginx
def test_slow_clients_are_cut_by_nginx_while_good_requests_pass(proxy: Nginx, service: Service) -> None:
    before = service.predict_requests()
    header = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + b"X-Padding: " + b"a" * 100
    with ThreadPoolExecutor(4) as pool:
        header_trickle = pool.submit(trickle, header, proxy.port, 1.0)  # one header byte a second
        body_stall = pool.submit(stall, PREDICT_HEAD + b"\x89PNG", proxy.port)  # a body that stops
        time.sleep(0.5)
        good = [good_request(proxy.port) for _ in range(3)]  # answered meanwhile
        header_cut, body_cut = header_trickle.result(60), body_stall.result(60)
    assert header_cut is not None, "a header trickled at one byte a second was never cut"
    print(f"\nnginx cut a header trickled at 1 B/s after {header_cut:.2f} s, a stalled body after {body_cut:.2f} s")
    assert TIMEOUT_S - 0.5 <= header_cut <= TIMEOUT_S + 2.5, header_cut
    assert TIMEOUT_S - 0.5 <= body_cut <= TIMEOUT_S + 2.5, body_cut
    assert all(answer.json()["results"] for answer in good)
    after = service.predict_requests()
    assert after == before | {"200": before.get("200", 0) + 3}, (before, after)  # only the good ones arrived
    log = (proxy.folder / "access.log").read_text()
    assert log.count('" 408 ') >= 2, log[-2000:]


@needs_nginx
def test_body_tricklers_hold_nginx_connections_not_gunicorn_threads(proxy: Nginx, service: Service) -> None:
    """client_body_timeout bounds the silence between reads, so a body trickled faster than that is not cut;
    but nginx buffers it, so more tricklers than the service has threads (2) do not stop a good request."""
    before = service.predict_requests()
    tricklers = 6
    with ThreadPoolExecutor(tricklers) as pool:
        held = [
            pool.submit(trickle, b"x" * 100, proxy.port, 0.5, head=PREDICT_HEAD, limit_s=5) for _ in range(tricklers)
        ]
        time.sleep(1)
        started = time.monotonic()
        good = good_request(proxy.port)
        elapsed = time.monotonic() - started
        results = [future.result(60) for future in held]
    assert good.json()["results"] and elapsed < 5, elapsed
    assert results == [None] * tricklers  # still open after 5 s: none was cut, none was answered
    after = service.predict_requests()
    assert after == before | {"200": before.get("200", 0) + 1}, (before, after)


@needs_nginx
def test_connections_per_client_address_are_limited(proxy: Nginx, service: Service) -> None:
    limit = int(directive(SHIPPED.read_text(), "limit_conn").split()[1])
    sockets = [socket.create_connection(("127.0.0.1", proxy.port), timeout=30) for _ in range(limit)]
    try:
        for sock in sockets:  # each request's header is complete, so each counts against the limit
            sock.sendall(PREDICT_HEAD + b"x")
        time.sleep(0.5)
        refused = request(proxy.port, "POST", f"/predict?{FAST}", png(), {"Content-Type": "image/png"})
    finally:
        for sock in sockets:
            sock.close()
    assert refused.status == 429, refused.body
    assert refused.json()["error"]["code"] == "too_many_requests" and refused.headers["retry-after"] == "1"
    time.sleep(0.5)
    good_request(proxy.port)  # the slots are free again once those connections are gone


@needs_nginx
def test_an_unreachable_service_is_a_503_in_the_services_error_shape(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path, free_port()).start()  # nothing listens on the upstream port
    try:
        answer = request(nginx.port, "POST", "/predict", png(), {"Content-Type": "image/png"})
    finally:
        nginx.stop()
    assert answer.status == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["error"]["code"] == "unavailable"


@needs_nginx
def test_the_compose_healthcheck_passes_through_the_proxy(proxy: Nginx) -> None:
    test = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["proxy"]["healthcheck"]["test"]
    if shutil.which(test[1]) is None:
        pytest.skip(f"{test[1]} is absent")
    listen = directive(SHIPPED.read_text(), "listen")
    local = [part.replace(f"127.0.0.1:{listen}", f"127.0.0.1:{proxy.port}") for part in test[1:]]
    assert local != test[1:]
    assert subprocess.run(local, capture_output=True, timeout=30).returncode == 0


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in upstream that records each request's headers, body and arrival time."""

    seen: list[tuple[float, dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.append((time.monotonic(), dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture()
def recorder() -> Iterator[tuple[int, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"seen": []})
    with http_stand_in(handler) as port:
        yield port, handler


@needs_nginx
def test_nginx_forwards_complete_requests_and_the_client_address(
    recorder: tuple[int, type[_Recorder]], tmp_path: Path
) -> None:
    port, handler = recorder
    nginx = Nginx(tmp_path, port).start()
    try:
        with socket.create_connection(("127.0.0.1", nginx.port), timeout=30) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: captioner.example\r\nTransfer-Encoding: chunked\r\n"
                b"X-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n5\r\nhello\r\n"
            )
            time.sleep(1.0)
            assert handler.seen == []  # half a body: nothing reaches the upstream yet
            finished = time.monotonic()
            sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
            assert status_of(read_response(sock)) == 200
    finally:
        nginx.stop()
    [(arrived, headers, body)] = handler.seen
    assert arrived >= finished and body == b"hello world"
    assert headers["Content-Length"] == "11" and "Transfer-Encoding" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"  # the edge replaces what the client claimed
    assert headers["X-Real-IP"] == "127.0.0.1" and headers["X-Forwarded-Proto"] == "http"
    assert headers["Host"] == "captioner.example"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
