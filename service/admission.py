"""What the application refuses from a request's headers alone, asked before its body is read.

The service's worker (``service.worker``) reads a request's body in its event loop before a thread
runs the application. When the application would refuse the request anyway, from its headers (no
valid API key, a Content-Length over the limit), waiting for the body only gives a slow client a
longer hold on the connection, so the worker asks first and answers at once. The question is
answered by the application's own before-request checks, so the two can never disagree.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from flask import Flask

# The key under ``app.extensions`` of the check a server may call: ``check(environ) -> bool``.
HEADER_CHECK = "captioner.header_check"


def install(app: Flask) -> None:
    app.extensions[HEADER_CHECK] = partial(refused_from_headers, app)


def refused_from_headers(app: Flask, environ: dict[str, Any]) -> bool:
    """Whether ``app``'s before-request checks refuse this request; they never read the body.

    A refusal here means the full request, run through the application, gets the same refusal
    from the same checks (with its JSON error, metrics and headers) without its body being read.
    """
    with app.request_context(environ):
        try:
            return app.preprocess_request() is not None
        except Exception:  # the checks refuse by raising ServiceError or werkzeug's HTTPException
            return True
