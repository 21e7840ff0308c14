"""The API key: with ``CAPTIONER_API_KEY`` set, ``/predict`` (and ``/metrics``, unless
``CAPTIONER_METRICS_AUTH=open``) need ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac

from flask import request

from service.config import ServiceConfig
from service.errors import ServiceError


def require_api_key(config: ServiceConfig) -> None:
    """401 unless the request carries the configured key; nothing to check when none is configured."""
    key = config.api_key
    if key is None:
        return
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    # compare_digest takes the same time whatever the first differing byte, so the key cannot be guessed byte by byte.
    valid = scheme.lower() == "bearer" and hmac.compare_digest(supplied.strip().encode(), key.encode())
    if not valid:
        raise ServiceError(
            401, "unauthorized", "a valid API key is required: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": 'Bearer realm="captioner"'},
        )  # fmt: skip
