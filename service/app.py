"""The application factory: one Flask application per worker process, with its model runtime."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable

from flask import Flask, Response, g, request

from service import admission
from service.blueprints import docs, health, predict
from service.config import ServiceConfig
from service.errors import ServiceError, register_error_handlers
from service.metrics import UNMATCHED_ENDPOINT, ServiceMetrics, method_label
from service.runtime import EXTENSION, Loader, ModelRuntime, load_captioner

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def create_app(
    config: ServiceConfig,
    *,
    loader: Loader = load_captioner,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> Flask:
    """Build the Flask application and start loading the model in the background.

    ``loader`` turns the configuration into a Captioner (tests pass one that reuses a model).
    ``on_load_failure`` is called from the loading thread if loading fails; without one the
    application stays up and answers 503 on ``/readyz`` and ``/predict``.
    """
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.debug = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep "results" first, as documented
    metrics = ServiceMetrics()
    app.extensions[EXTENSION] = ModelRuntime(config, metrics, loader, on_load_failure)

    register_error_handlers(app)
    app.register_blueprint(predict.blueprint)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(docs.blueprint)
    _install_request_hooks(app, config, metrics)
    admission.install(app)
    return app


def _install_request_hooks(app: Flask, config: ServiceConfig, metrics: ServiceMetrics) -> None:
    """Request ids, the early body-size check, metrics, CORS and security headers for every response."""
    known_paths = {rule.rule for rule in app.url_map.iter_rules()}

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # Refuse an announced oversized body before reading any of it; werkzeug enforces the same
        # limit while streaming a body that has no Content-Length (chunked encoding).
        length = request.content_length
        if length is not None and length > config.max_upload_bytes:
            raise ServiceError(
                413, "payload_too_large",
                f"the request body ({length} bytes) is larger than the limit of {config.max_upload_bytes} bytes",
            )  # fmt: skip

    @app.after_request
    def _finish(response: Response) -> Response:
        # Labels from fixed sets only (see service.metrics): the app's routes, standard methods, statuses.
        if request.url_rule is not None:
            endpoint = request.url_rule.rule
        else:  # unmatched paths are not used as labels: every probe of a random URL would add a series
            endpoint = request.path if request.path in known_paths else UNMATCHED_ENDPOINT
        status = str(response.status_code)
        metrics.requests.inc(endpoint=endpoint, method=method_label(request.method), status=status)
        metrics.latency.observe(time.perf_counter() - g.get("started", time.perf_counter()), endpoint=endpoint)
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'; form-action 'self'",
        )
        _add_cors_headers(response, config.cors_origins)
        return response


def _add_cors_headers(response: Response, allowed: tuple[str, ...]) -> None:
    """Let the configured origins (only those) call the API from a browser; nothing when none is configured."""
    origin = request.headers.get("Origin")
    if not allowed or not origin:
        return
    response.vary.add("Origin")
    if "*" not in allowed and origin.rstrip("/") not in allowed:
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
    response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"
    if request.method == "OPTIONS":  # a preflight request
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-ID"
        response.headers["Access-Control-Max-Age"] = "600"
