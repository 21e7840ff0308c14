"""``python -m service``: run the caption service under gunicorn.

The options become ``CAPTIONER_*`` environment variables (the one channel through which gunicorn's
config module and the forked workers receive settings), then this process is replaced by
``python -m gunicorn`` so that signals sent to it (SIGTERM from ``docker stop``) reach gunicorn's
master directly. Settings are validated here first, so a typo fails with a clear message instead of
a worker that crashes at boot.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from service.config import ConfigError, ServerSettings, ServiceConfig, usable_cores

GUNICORN_ARGS = ("-m", "gunicorn", "-c", "python:service.gunicorn_config", "service.wsgi:app")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve image captions over HTTP (POST /predict; a web page at /). "
        "Options not given fall back to the CAPTIONER_* environment variables, then to the defaults.",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--workers", type=int, help="worker processes, each with its own model (default 1)")
    parser.add_argument("--threads", type=int, help="request threads per worker; they feed the batcher (default 16)")
    parser.add_argument(
        "--model", metavar="DIR", help="model directory (default: $CAPTIONER_MODEL_DIR or weights/default)"
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--max-batch-size", type=int, help="most images per model call (default 16; 1 disables batching)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        help="the longest a request waits for others still reading their images, to batch with them (default 10)",
    )
    return parser


def environment(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """``base`` with the given options written over it as CAPTIONER_* variables."""
    env = dict(base)
    given = {
        "CAPTIONER_HOST": args.host,
        "CAPTIONER_PORT": args.port,
        "CAPTIONER_WORKERS": args.workers,
        "CAPTIONER_THREADS": args.threads,
        "CAPTIONER_MODEL_DIR": os.path.abspath(args.model) if args.model else None,
        "CAPTIONER_DEVICE": args.device,
        "CAPTIONER_MAX_BATCH_SIZE": args.max_batch_size,
        "CAPTIONER_MAX_WAIT_MS": args.max_wait_ms,
    }
    env.update({name: str(value) for name, value in given.items() if value is not None})
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Validate the settings and exec gunicorn; returns (2) only when a setting is invalid."""
    args = build_parser().parse_args(argv)
    env = environment(args, dict(os.environ))
    try:
        settings = ServerSettings.from_env(env)
        # Each worker's model gets its share of the cores unless told otherwise: only the batcher
        # thread and the encoder threads it hands slices to run torch operations (request threads
        # decode and normalise with PIL and numpy), and the encoder runs one thread per intra-op
        # thread, so this count sets the worker's compute threads. More threads than cores
        # across the workers would leave OpenMP threads spinning while others hold the cores.
        env.setdefault("CAPTIONER_TORCH_THREADS", str(max(1, usable_cores() // settings.workers)))
        ServiceConfig.from_env(env)
    except ConfigError as error:
        print(f"python -m service: error: {error}", file=sys.stderr)
        return 2
    os.execve(sys.executable, [sys.executable, *GUNICORN_ARGS], env)


if __name__ == "__main__":
    sys.exit(main())
