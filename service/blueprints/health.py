"""Liveness, readiness and Prometheus metrics.

``/healthz`` says the process answers HTTP (a failing one should be restarted); ``/readyz`` says the
model is loaded and warmed up (until then load balancers should send no traffic). Both stay open when
an API key is configured, because probes carry no credentials; ``/metrics`` then needs the key too,
unless ``CAPTIONER_METRICS_AUTH=open`` (see ``ServiceConfig``).
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from service.auth import require_api_key
from service.metrics import CONTENT_TYPE
from service.runtime import runtime_of

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> Response:
    runtime = runtime_of(current_app)
    if runtime.ready:
        return jsonify({"status": "ready"})
    status = "failed" if runtime.failed else "loading"
    response = jsonify({"status": status})
    response.status_code = 503
    if not runtime.failed:
        response.headers["Retry-After"] = "5"
    return response


@blueprint.get("/metrics")
def metrics() -> Response:
    runtime = runtime_of(current_app)
    if runtime.config.metrics_need_key:
        require_api_key(runtime.config)
    # Sampled when scraped rather than tracked on every change.
    runtime.metrics.queue_depth.set(runtime.batcher.depth if runtime.batcher is not None else 0)
    runtime.metrics.ready.set(1 if runtime.ready else 0)
    return Response(runtime.metrics.render(), content_type=CONTENT_TYPE)
