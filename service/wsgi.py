"""The WSGI application gunicorn serves (``service.wsgi:app``), configured from the environment.

gunicorn imports this module in each worker after forking (``preload_app`` is off), so every worker
loads its own model.
"""

from __future__ import annotations

import logging
import os
import sys

from service.app import create_app
from service.config import ServiceConfig

# gunicorn halts the whole server, instead of restarting the worker forever, when a worker exits
# with this status ("App failed to load"); a model that cannot be loaded is a configuration error.
_APP_LOAD_ERROR = 4


def _exit_worker(error: BaseException) -> None:
    """Called from the model-loading thread: os._exit is the only way to end the process from there."""
    logging.getLogger(__name__).critical("stopping: the model could not be loaded (%s)", error)
    sys.stderr.flush()
    os._exit(_APP_LOAD_ERROR)


logging.basicConfig(
    level=os.environ.get("CAPTIONER_LOG_LEVEL", "info").upper(),
    format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
)
app = create_app(ServiceConfig.from_env(), on_load_failure=_exit_worker)
