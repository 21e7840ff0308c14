"""Reading a request's body: its size limits, and what a client can get wrong while sending it.

Reading the body is where a client's transport mistakes surface: a chunked body with a malformed
chunk, or a connection closed before the body's end. They are the client's doing, so they become
400s, logged in one line rather than as a traceback. Which exception the server's input stream
raises for them depends on the server: gunicorn raises its own parse errors for a malformed chunk
and ``NoMoreData`` (an OSError) for a closed connection, werkzeug's development server an OSError for
both, and werkzeug's limited stream, which wraps the input of a multipart body, turns OSErrors into
``ClientDisconnected``.

werkzeug refuses a multipart body with the same bare 413 for each of three limits (the body's size,
the number of parts, the memory for one text field), so the form is parsed here from a stream that
counts the parts as they arrive, and the 413 names the limit the client actually exceeded.
"""

from __future__ import annotations

import logging
from typing import IO, cast

from flask import g, request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from service.errors import ServiceError

logger = logging.getLogger(__name__)

_MalformedBody: tuple[type[Exception], ...]
try:  # gunicorn's errors for a malformed chunked body (and a bad trailer); none when served otherwise
    from gunicorn.http.errors import ParseException

    _MalformedBody = (ParseException,)
except ImportError:  # not installed, or a platform gunicorn does not run on
    _MalformedBody = ()


def body_too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"the request body is larger than the limit of {limit} bytes")


def read_body(limit: int) -> bytes:
    """The whole body, or 413 when it is longer than ``limit`` (400 when it ends before its Content-Length).

    A body with a Content-Length was checked against the limit before the request reached the view.
    A chunked body is read here one byte past the limit, because werkzeug's limited stream returns a
    chunked body silently cut at the limit when read in one go, which would turn an oversized upload
    into a "truncated image" instead of the 413 it deserves.
    """
    if request.content_length is not None:
        stream = _BodyStream(request.stream)
        data = stream.read()
        stream.check_complete()
        return data
    if not request.environ.get("wsgi.input_terminated"):
        return b""  # a server that cannot delimit a chunked body: reading it could block forever
    stream, chunks, size = _BodyStream(request.environ["wsgi.input"]), [], 0
    while chunk := stream.read(min(65536, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
    return b"".join(chunks)


def read_form() -> tuple[MultiDict[str, str], MultiDict[str, FileStorage]]:
    """The text fields and the files of a multipart body; a 413 names the limit it exceeded."""
    boundary = request.mimetype_params.get("boundary", "").encode(errors="replace")
    stream = _FormStream(request.stream, boundary)
    parser = request.make_form_data_parser()
    try:
        _, form, files = parser.parse(
            cast(IO[bytes], stream), request.mimetype, request.content_length, request.mimetype_params
        )
    except RequestEntityTooLarge:
        raise _form_limit_error(stream) from None
    stream.check_complete()
    return form, files


def _form_limit_error(stream: _FormStream) -> ServiceError:
    if stream.limit_hit and request.max_content_length is not None:
        return body_too_large(request.max_content_length)
    parts = request.max_form_parts
    if parts is not None and stream.parts > parts:
        return ServiceError(413, "too_many_form_parts", f"the form has more parts than the limit of {parts}")
    return ServiceError(
        413, "form_field_too_large",
        f"a text field of the form (or a part's headers) is larger than the limit of {request.max_form_memory_size} "
        "bytes; send images as file parts",
    )  # fmt: skip


_INCOMPLETE = "the request body ended before it was complete (the connection closed)"


def _client_error(code: str, message: str) -> ServiceError:
    """A 400 for a body the client failed to send properly, with one log line and no traceback."""
    logger.info("request %s: %s", g.get("request_id", "-"), message)
    return ServiceError(400, code, message)


class _BodyStream:
    """The request body as the server delivers it, its failures (only the client causes them) as 400s."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.received = 0
        self.ended = False  # a read reached the end of the stream
        self.limit_hit = False

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except RequestEntityTooLarge:  # werkzeug's limited stream, at Flask's MAX_CONTENT_LENGTH
            self.limit_hit = True
            raise
        except (ClientDisconnected, OSError):
            raise _client_error("incomplete_body", _INCOMPLETE) from None
        except _MalformedBody:
            raise _client_error("malformed_body", "the request body's chunked transfer encoding is malformed") from None
        self.received += len(data)
        self.ended = self.ended or size < 0 or not data
        return data

    def check_complete(self) -> None:
        """400 when the stream ended before the bytes the Content-Length announced: werkzeug's stream
        ends quietly where the connection closed, and the body's parser would report the cut as bad
        content. (A parser that gave up on bad content early has not reached the end: not this case.)"""
        if request.content_length is not None and self.ended and self.received < request.content_length:
            raise _client_error("incomplete_body", _INCOMPLETE)


class _FormStream(_BodyStream):
    """A multipart body that counts its parts as they are read, to tell which limit a 413 is for.

    Parts are counted by their delimiters (``--boundary``) less the closing one (``--boundary--``),
    each when its last byte arrives, so one that straddles two reads counts once.
    """

    def __init__(self, stream: IO[bytes], boundary: bytes) -> None:
        super().__init__(stream)
        self._delimiter = b"--" + boundary
        self._closing = self._delimiter + b"--"
        self._tail = b""
        self.parts = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        window = self._tail + data
        # Count only occurrences that end in the new data: the tail's were counted by the last read.
        self.parts += window.count(self._delimiter, max(0, len(self._tail) - len(self._delimiter) + 1))
        self.parts -= window.count(self._closing, max(0, len(self._tail) - len(self._closing) + 1))
        self._tail = window[-(len(self._closing) - 1) :]
        return data
