"""The HTTP caption service: ``create_app(ServiceConfig)`` builds the Flask application;
``python -m service`` runs it under gunicorn.

``create_app`` is imported on first use (PEP 562) so that the gunicorn master, which only reads
``service.gunicorn_config`` and ``service.config``, never imports torch: the model is loaded in each
worker after the fork.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.config import ServiceConfig

if TYPE_CHECKING:
    from service.app import create_app

__all__ = ["ServiceConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(f"module 'service' has no attribute {name!r}")
