"""gunicorn settings (``gunicorn -c python:service.gunicorn_config service.wsgi:app``), read from the environment.

Worker class ``service.worker.RequestBufferingWorker``, gunicorn's gthread whose event loop reads each
request whole before a thread runs it, so that slow clients hold no thread: each worker's threads run
requests concurrently, decode their images, and hand them to the worker's batcher thread, which is
what lets concurrent requests share model calls.
On SIGTERM the master closes the listening socket and each worker stops accepting, finishes the
requests it holds (up to ``graceful_timeout``) and exits.
"""

from __future__ import annotations

from typing import Any

from service.config import ServerSettings

_settings = ServerSettings.from_env()

bind = [_settings.bind]
workers = _settings.workers
threads = _settings.threads
worker_class = "service.worker.RequestBufferingWorker"
# Load the application (and so the model) in each worker after the fork, never in the master.
preload_app = False
graceful_timeout = _settings.graceful_timeout_s
# The gthread heartbeat comes from the worker's main loop, not from the threads running the model,
# so this only catches a worker that is truly stuck.
timeout = 120
keepalive = 5
accesslog = "-" if _settings.access_log else None
errorlog = "-"
loglevel = _settings.log_level
proc_name = "captioner-service"
# Nothing manages the server through gunicorn's control socket, and several servers on one host
# (tests, benchmarks) would otherwise contend for the same socket path.
control_socket_disable = True


def worker_exit(server: Any, worker: Any) -> None:
    """Let the worker's batcher run what it still holds before the process ends."""
    from service.runtime import EXTENSION

    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get(EXTENSION)
    if runtime is not None:
        runtime.close(timeout=graceful_timeout)
