"""The service's single error shape, ``{"error": {"code": ..., "message": ...}}``, and its handlers.

Every failure a client can see goes through here, so that clients need to understand one format and
nothing internal (a traceback, a file path, an exception's text) can leak into a response: errors the
client caused carry a message written for the client, and anything else becomes a generic 500 whose
details go only to the server log, tagged with the request id that the client also receives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Flask, Response, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

logger = logging.getLogger(__name__)

# ImageError.code -> HTTP status. An empty upload is as good as a missing one; a picture too large (or
# too costly) to decode is refused like a body too large to read; everything else is content that is not
# a usable image.
IMAGE_ERROR_STATUS = {
    "empty": 400,
    "too_many_pixels": 413,
    "too_costly": 413,
    "not_an_image": 422,
    "truncated": 422,
    "undecodable": 422,
    "unreadable": 422,
}

# Codes for the HTTP errors werkzeug raises itself (routing, body limits, malformed requests).
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


class ServiceError(Exception):
    """An error with its HTTP status, machine-readable code and a message meant for the client."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Make every error of ``app`` answer in the JSON shape."""

    @app.errorhandler(ServiceError)
    def _service_error(error: ServiceError) -> Response:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status >= 500:
            return _internal_error(error)
        # Keep the headers werkzeug attached (e.g. Allow on 405), replacing only the body.
        headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return error_response(status, _HTTP_CODES.get(status, "http_error"), _describe_http(error), headers)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        return _internal_error(error)


def _internal_error(error: BaseException) -> Response:
    request_id = g.get("request_id", "-")
    logger.error("request %s failed", request_id, exc_info=error)
    return error_response(500, "internal_error", f"internal server error (request id {request_id})")


def _describe_http(error: HTTPException) -> str:
    """werkzeug's descriptions are fixed English sentences: safe to show, and clearer than a bare status."""
    if error.code == 404:
        return "no such endpoint; see /openapi.json for the API"
    if error.code == 405:
        return "this endpoint does not accept that HTTP method"
    if error.code == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        return f"the request body is larger than the limit of {limit} bytes" if limit else error.name
    return " ".join((error.description or error.name).split())
