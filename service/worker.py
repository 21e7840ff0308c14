"""The service's gunicorn worker: gthread, except that a request is read whole before a thread runs it.

gunicorn's threaded worker hands a connection to a request thread once its first byte arrives, and
the thread reads the headers and the body with blocking reads: a client sending one byte every few
seconds holds a thread as long as it likes, and as many such clients as threads stop the worker.
Here the worker's event loop reads each request with non-blocking reads and hands a thread only a
complete request, as a buffering proxy would. Each request has two deadlines, totals rather than
idle times, so trickled bytes do not extend them: its headers must arrive within
``header_timeout_s`` of its first byte (of the connection, for a new one), its body within
``body_timeout_s`` of the end of its headers. A request the application refuses from its headers
(``service.admission``: no API key, a body over the limit) is answered at once and its connection
closed, never drained. Closing never blocks the event loop: a closed connection lingers in it for a
moment, discarding what the client still sends, so the client gets the answer rather than a reset.

TLS and HTTP/2 connections are left to gthread's own handling (the service terminates TLS in its
proxy and speaks HTTP/1.1).
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import string
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.http import get_parser, wsgi
from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from service.admission import HEADER_CHECK
from service.config import ServerSettings

# How long a closed connection is read and discarded, so the kernel does not answer the client's
# late bytes with a reset that could destroy the response before the client reads it.
LINGER_S = 2.0
# Bytes of headers read before giving the request to gunicorn's parser, which refuses it by its limits.
_MAX_HEAD_BYTES = 1 << 20
# A chunk-size line longer than this is malformed (gunicorn's parser then answers 400).
_MAX_CHUNK_LINE = 1024
_HEX_DIGITS = frozenset(string.hexdigits.encode())


class _MalformedChunk(ValueError):
    pass


class _ChunkedEnd:
    """Finds where a chunked body ends as its bytes arrive; gunicorn's parser does the decoding."""

    def __init__(self, start: int) -> None:
        self.position = start  # the next unscanned byte: a size line, chunk data or a trailer line
        self.chunk_left = -1  # bytes of chunk data (plus its CRLF) still to skip; -1 outside a chunk
        self.in_trailers = False

    def end(self, data: bytearray) -> int | None:
        """The index just past the body, or None while it is incomplete; raises _MalformedChunk."""
        while True:
            if self.chunk_left >= 0:
                if len(data) < self.position + self.chunk_left + 2:
                    return None
                self.position += self.chunk_left + 2
                self.chunk_left = -1
                continue
            line_end = data.find(b"\r\n", self.position)
            if line_end < 0:
                if len(data) - self.position > _MAX_CHUNK_LINE:
                    raise _MalformedChunk("a chunk-size or trailer line is too long")
                return None
            line = bytes(data[self.position : line_end])
            self.position = line_end + 2
            if self.in_trailers:
                if not line:
                    return self.position  # the blank line that ends the trailers
                continue
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not size or not set(size) <= _HEX_DIGITS:
                raise _MalformedChunk(f"bad chunk size {size[:20]!r}")
            self.chunk_left = int(size, 16)
            if self.chunk_left == 0:
                self.chunk_left, self.in_trailers = -1, True


@dataclass
class _Incoming:
    """A request the event loop is reading."""

    conn: TConn
    data: bytearray
    deadline: float  # for the headers until they are complete, then for the body
    head_end: int = -1  # the index past the blank line that ends the headers, once it arrived
    body_length: int | None = None  # Content-Length; None for a chunked body
    chunked: _ChunkedEnd | None = None
    continued: bool = False  # "100 Continue" was sent


class RequestBufferingWorker(ThreadWorker):
    """gunicorn's gthread worker with requests read by its event loop (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = ServerSettings.from_env()
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.incoming: dict[TConn, _Incoming] = {}
        self.lingering: dict[socket.socket, float] = {}  # socket -> when it is closed at the latest
        self.close_after: set[TConn] = set()  # answered before their body was read: never kept alive
        self.continued: set[TConn] = set()  # "100 Continue" already sent by the event loop

    # -- the event loop's side ------------------------------------------------------------------

    def enqueue_req(self, conn: TConn) -> None:
        """A connection with a request arriving (new, kept alive, or with pipelined bytes): read it."""
        if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            super().enqueue_req(conn)
            return
        leftover = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        incoming = _Incoming(conn, bytearray(leftover), time.monotonic() + self.header_timeout_s)
        self.incoming[conn] = incoming
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, incoming))
        if leftover:
            self._advance(incoming)

    def _on_readable(self, incoming: _Incoming, _sock: socket.socket) -> None:
        try:
            data = incoming.conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client stopped sending before its request was complete
            if incoming.data:  # a half-closed client may still read: the thread's parse answers 400
                self._dispatch(incoming, close=True)
            else:
                self._drop(incoming)
            return
        incoming.data += data
        self._advance(incoming)

    def _advance(self, incoming: _Incoming) -> None:
        """Note what the bytes read so far complete, and act on it."""
        data = incoming.data
        if incoming.head_end < 0:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                if len(data) > _MAX_HEAD_BYTES:
                    self._dispatch(incoming, close=True)
                return
            incoming.head_end = head_end + 4
            if not self._read_head(incoming):
                return
        try:
            if incoming.chunked is not None:
                complete = incoming.chunked.end(data) is not None
            else:
                complete = len(data) - incoming.head_end >= (incoming.body_length or 0)
        except _MalformedChunk:
            self._dispatch(incoming, close=True)  # gunicorn's parser answers 400 from the bytes read
            return
        if complete:
            self._dispatch(incoming, close=False)

    def _read_head(self, incoming: _Incoming) -> bool:
        """Parse the complete headers: the body's framing, an early refusal, "100 Continue".

        False when the request has been handed on (a malformed head, or one refused from its headers).
        """
        conn = incoming.conn
        head = bytes(incoming.data[: incoming.head_end])
        try:
            request = next(get_parser(self.cfg, iter([head]), conn.client))
        except Exception:  # a malformed head: gunicorn's own handling answers it from the bytes read
            self._dispatch(incoming, close=True)
            return False
        reader = request.body.reader
        if isinstance(reader, ChunkedReader):
            incoming.chunked = _ChunkedEnd(incoming.head_end)
        elif isinstance(reader, LengthReader):
            incoming.body_length = reader.length
        has_body = incoming.chunked is not None or bool(incoming.body_length)
        if not has_body:
            return True
        expects_continue = request._expected_100_continue
        if self._refused_from_headers(request, conn):
            self._dispatch(incoming, close=True)
            return False
        incoming.deadline = time.monotonic() + self.body_timeout_s
        if expects_continue and len(incoming.data) == incoming.head_end:
            incoming.continued = True
            # A full or broken socket is ignored: the client sends its body anyway, or is gone.
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _refused_from_headers(self, request: Any, conn: TConn) -> bool:
        check = getattr(self.wsgi, "extensions", {}).get(HEADER_CHECK)
        if check is None:
            return False
        request._expected_100_continue = False  # building the environ must not send "100 Continue"
        try:
            _, environ = wsgi.create(request, conn.sock, conn.client, conn.server, self.cfg)
        except Exception:  # headers the application would never see: the thread's parse answers them
            return False
        return bool(check(environ))

    def _dispatch(self, incoming: _Incoming, close: bool) -> None:
        """Give the request, with every byte read so far, to a thread."""
        conn = incoming.conn
        del self.incoming[conn]
        self.poller.unregister(conn.sock)
        if conn.parser is None:
            conn.parser = get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(incoming.data))
        conn.data_ready = True
        if close:
            self.close_after.add(conn)
        if incoming.continued:
            self.continued.add(conn)
        super().enqueue_req(conn)

    def _drop(self, incoming: _Incoming) -> None:
        del self.incoming[incoming.conn]
        self.poller.unregister(incoming.conn.sock)
        self.nr_conns -= 1
        incoming.conn.close()

    def murder_pending(self) -> None:
        """gthread's expiry of idle connections, then the deadlines of requests being read."""
        super().murder_pending()
        now = time.monotonic()
        for incoming in [entry for entry in self.incoming.values() if entry.deadline <= now]:
            self._expire(incoming)
        for sock in [sock for sock, until in self.lingering.items() if until <= now]:
            self._close_lingering(sock)

    def _expire(self, incoming: _Incoming) -> None:
        """A request past its deadline: 408 when the client sent anything, then the connection closes."""
        conn = incoming.conn
        del self.incoming[conn]
        self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        if not incoming.data:  # an idle connection (a browser's spare one, say): nothing to answer
            conn.close()
            return
        part, limit = ("headers", self.header_timeout_s) if incoming.head_end < 0 else ("body", self.body_timeout_s)
        self.log.info("closing a connection from %s: its request's %s took over %g s", conn.client, part, limit)
        message = f"the request's {part} did not arrive within {limit:g} s"
        body = json.dumps({"error": {"code": "request_timeout", "message": message}}).encode()
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # a full or broken socket: closing is all that is left
            conn.sock.send(head.encode() + body)
        self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close ``sock`` without blocking: send FIN, then discard what arrives for up to LINGER_S."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        self.lingering[sock] = time.monotonic() + LINGER_S
        self.poller.register(sock, selectors.EVENT_READ, self._on_lingering_readable)

    def _on_lingering_readable(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close_lingering(sock)  # the client closed too (or failed): done

    def _close_lingering(self, sock: socket.socket) -> None:
        del self.lingering[sock]
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(sock)
        sock.close()

    def finish_request(self, conn: TConn, fs: Any) -> None:
        """Connections that end after their request close by lingering, not by gthread's blocking drain."""
        self.close_after.discard(conn)
        self.continued.discard(conn)
        if not fs.cancelled() and fs.exception() is None and fs.result() is False:
            self.nr_conns -= 1
            self._linger(conn.sock)
            return
        super().finish_request(conn, fs)

    # -- the request thread's side --------------------------------------------------------------

    def handle_request(self, req: Any, conn: TConn) -> bool:
        if conn in self.close_after:
            req.must_close = True  # its body was not read: the connection cannot carry another request
        if conn in self.close_after or conn in self.continued:
            # Sent already by the event loop, or not to be sent: a refused request's body is not wanted.
            req._expected_100_continue = False
        return super().handle_request(req, conn)
