"""Settings of the caption service, read from ``CAPTIONER_*`` environment variables.

Environment variables are how ``python -m service`` hands its options to the gunicorn workers (which
exec, fork and import the application anew) and how containers are configured, so they are the one
source of configuration. This module deliberately imports nothing heavy (no torch, no captioner):
the gunicorn master and ``python -m service`` read it too, and they must stay small and fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

_Number = TypeVar("_Number", int, float)

DEFAULT_BEAM_SIZE = 3
DEFAULT_MAX_LENGTH = 20
# Who may read /metrics when an API key is set: the key's holders, or anyone.
METRICS_AUTH = ("key", "open")


class ConfigError(ValueError):
    """A setting with a value outside its allowed range; the message names the variable."""


@dataclass(frozen=True)
class ServiceConfig:
    """What one application instance (one gunicorn worker) needs to serve captions.

    ``model_dir`` None loads the captioner's default model. ``max_pixels`` None keeps the captioner's
    own bound on decoded image size, ``max_decode_bytes`` None its own bound on the memory one decode
    may take (``captioner.images.DEFAULT_MAX_DECODE_BYTES``). ``decode_concurrency`` bounds the images
    a worker decodes at once (None: ``torch_threads``, else the cores the process may use; see
    ``decode_slots``). ``queue_size`` counts images waiting for the model, so the memory
    held by waiting requests is bounded whatever the traffic. ``torch_threads`` None leaves torch's
    own setting. ``encoder_batch_size`` splits a batch for the CNN encoder only (None: 2 on a CPU,
    the whole batch on a GPU; see ``ModelRuntime``). ``api_key`` is kept out of ``repr`` so it never
    lands in a log line.

    ``metrics_auth`` (``CAPTIONER_METRICS_AUTH``) says who may read ``/metrics`` when an API key is
    set: ``key`` (the default) asks for the same ``Authorization: Bearer <key>`` as ``/predict``, since
    the metrics tell a stranger how busy the service is and which model it runs; ``open`` serves them
    to anyone, for a Prometheus on a private network that sends no credentials. Without an API key
    every endpoint is open and the setting changes nothing. ``/healthz`` and ``/readyz`` are always
    open: probes carry no credentials.
    """

    model_dir: str | None = None
    device: str = "auto"
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 64
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int | None = None
    max_decode_bytes: int | None = None
    decode_concurrency: int | None = None
    max_images: int = 16
    max_beam_size: int = 10
    max_caption_length: int = 50
    request_timeout_s: float = 60.0
    torch_threads: int | None = None
    encoder_batch_size: int | None = None
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    metrics_auth: str = "key"

    def __post_init__(self) -> None:
        _check_range("max_batch_size", self.max_batch_size, 1, 1024)
        _check_range("max_wait_ms", self.max_wait_ms, 0.0, 10_000.0)
        _check_range("queue_size", self.queue_size, 1, 100_000)
        _check_range("max_upload_bytes", self.max_upload_bytes, 1024, 2**40)
        if self.max_pixels is not None:
            _check_range("max_pixels", self.max_pixels, 1, 2**40)
        if self.max_decode_bytes is not None:
            _check_range("max_decode_bytes", self.max_decode_bytes, 1024, 2**40)
        if self.decode_concurrency is not None:
            _check_range("decode_concurrency", self.decode_concurrency, 1, 1024)
        _check_range("max_images", self.max_images, 1, 1024)
        _check_range("max_beam_size", self.max_beam_size, 1, 50)
        _check_range("max_caption_length", self.max_caption_length, 1, 200)
        _check_range("request_timeout_s", self.request_timeout_s, 0.001, 86_400.0)
        if self.torch_threads is not None:
            _check_range("torch_threads", self.torch_threads, 1, 1024)
        if self.encoder_batch_size is not None:
            _check_range("encoder_batch_size", self.encoder_batch_size, 1, 1024)
        if self.metrics_auth not in METRICS_AUTH:
            raise ConfigError(f"metrics_auth must be {' or '.join(METRICS_AUTH)}, not {self.metrics_auth!r}")
        if self.max_images > self.queue_size:
            raise ConfigError(
                f"max_images ({self.max_images}) must not exceed queue_size ({self.queue_size}): "
                "such a request could never be queued"
            )

    @property
    def default_beam_size(self) -> int:
        """The captioner's default beam, lowered when the operator capped beams below it."""
        return min(DEFAULT_BEAM_SIZE, self.max_beam_size)

    @property
    def default_max_length(self) -> int:
        return min(DEFAULT_MAX_LENGTH, self.max_caption_length)

    @property
    def decode_slots(self) -> int:
        """How many images one worker decodes at once. Decoding is CPU-bound work in C that releases
        the GIL, so more decodes than the worker's share of the cores only hold more memory at once
        without finishing sooner; ``python -m service`` sets ``torch_threads`` to that share."""
        return self.decode_concurrency or self.torch_threads or usable_cores()

    @property
    def metrics_need_key(self) -> bool:
        return self.api_key is not None and self.metrics_auth == "key"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceConfig:
        """Read every setting from ``environ`` (default ``os.environ``); unset or empty means default."""
        env = _Env(os.environ if environ is None else environ)
        defaults = cls()
        try:
            return cls(
                model_dir=env.text("CAPTIONER_MODEL_DIR"),
                device=env.text("CAPTIONER_DEVICE") or defaults.device,
                max_batch_size=env.integer("CAPTIONER_MAX_BATCH_SIZE", defaults.max_batch_size),
                max_wait_ms=env.number("CAPTIONER_MAX_WAIT_MS", defaults.max_wait_ms),
                queue_size=env.integer("CAPTIONER_QUEUE_SIZE", defaults.queue_size),
                max_upload_bytes=env.integer("CAPTIONER_MAX_UPLOAD_BYTES", defaults.max_upload_bytes),
                max_pixels=env.optional_integer("CAPTIONER_MAX_PIXELS"),
                max_decode_bytes=env.optional_integer("CAPTIONER_MAX_DECODE_BYTES"),
                decode_concurrency=env.optional_integer("CAPTIONER_DECODE_CONCURRENCY"),
                max_images=env.integer("CAPTIONER_MAX_IMAGES", defaults.max_images),
                max_beam_size=env.integer("CAPTIONER_MAX_BEAM_SIZE", defaults.max_beam_size),
                max_caption_length=env.integer("CAPTIONER_MAX_LENGTH", defaults.max_caption_length),
                request_timeout_s=env.number("CAPTIONER_REQUEST_TIMEOUT_S", defaults.request_timeout_s),
                torch_threads=env.optional_integer("CAPTIONER_TORCH_THREADS"),
                encoder_batch_size=env.optional_integer("CAPTIONER_ENCODER_BATCH_SIZE"),
                api_key=env.text("CAPTIONER_API_KEY"),
                cors_origins=env.origins("CAPTIONER_CORS_ORIGINS"),
                metrics_auth=(env.text("CAPTIONER_METRICS_AUTH") or defaults.metrics_auth).lower(),
            )
        except ConfigError as error:
            # Name the variable rather than the field: that is what the operator has to fix.
            raise ConfigError(env.rename(str(error))) from None


@dataclass(frozen=True)
class ServerSettings:
    """How gunicorn runs the application: the address, and the worker processes and their threads.

    Each worker loads its own copy of the model; its ``threads`` serve requests concurrently, which is
    what lets the dynamic batcher gather several requests into one model call, so there should be at
    least as many threads as the batch size.

    ``header_timeout_s`` and ``body_timeout_s`` bound how long a client may take to send a request:
    its headers from its first byte, its body from the end of its headers, as totals however the bytes
    trickle in (see ``service.worker``). A request over either is answered 408 and its connection closed.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 16
    graceful_timeout_s: int = 30
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    access_log: bool = True
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty")
        _check_range("port", self.port, 0, 65535)
        _check_range("workers", self.workers, 1, 256)
        _check_range("threads", self.threads, 1, 1024)
        _check_range("graceful_timeout_s", self.graceful_timeout_s, 1, 3600)
        _check_range("header_timeout_s", self.header_timeout_s, 0.1, 3600.0)
        _check_range("body_timeout_s", self.body_timeout_s, 0.1, 3600.0)
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(f"log_level must be debug, info, warning, error or critical, not {self.log_level!r}")

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address needs brackets
        return f"{host}:{self.port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        env = _Env(os.environ if environ is None else environ)
        defaults = cls()
        try:
            return cls(
                host=env.text("CAPTIONER_HOST") or defaults.host,
                port=env.integer("CAPTIONER_PORT", defaults.port),
                workers=env.integer("CAPTIONER_WORKERS", defaults.workers),
                threads=env.integer("CAPTIONER_THREADS", defaults.threads),
                graceful_timeout_s=env.integer("CAPTIONER_GRACEFUL_TIMEOUT_S", defaults.graceful_timeout_s),
                header_timeout_s=env.number("CAPTIONER_HEADER_TIMEOUT_S", defaults.header_timeout_s),
                body_timeout_s=env.number("CAPTIONER_BODY_TIMEOUT_S", defaults.body_timeout_s),
                access_log=env.boolean("CAPTIONER_ACCESS_LOG", defaults.access_log),
                log_level=(env.text("CAPTIONER_LOG_LEVEL") or defaults.log_level).lower(),
            )
        except ConfigError as error:
            raise ConfigError(env.rename(str(error))) from None


# Field name -> environment variable, so range errors raised by __post_init__ name the variable.
_VARIABLES = {
    "max_batch_size": "CAPTIONER_MAX_BATCH_SIZE",
    "max_wait_ms": "CAPTIONER_MAX_WAIT_MS",
    "queue_size": "CAPTIONER_QUEUE_SIZE",
    "max_upload_bytes": "CAPTIONER_MAX_UPLOAD_BYTES",
    "max_pixels": "CAPTIONER_MAX_PIXELS",
    "max_decode_bytes": "CAPTIONER_MAX_DECODE_BYTES",
    "decode_concurrency": "CAPTIONER_DECODE_CONCURRENCY",
    "max_images": "CAPTIONER_MAX_IMAGES",
    "max_beam_size": "CAPTIONER_MAX_BEAM_SIZE",
    "max_caption_length": "CAPTIONER_MAX_LENGTH",
    "request_timeout_s": "CAPTIONER_REQUEST_TIMEOUT_S",
    "torch_threads": "CAPTIONER_TORCH_THREADS",
    "encoder_batch_size": "CAPTIONER_ENCODER_BATCH_SIZE",
    "metrics_auth": "CAPTIONER_METRICS_AUTH",
    "host": "CAPTIONER_HOST",
    "port": "CAPTIONER_PORT",
    "workers": "CAPTIONER_WORKERS",
    "threads": "CAPTIONER_THREADS",
    "graceful_timeout_s": "CAPTIONER_GRACEFUL_TIMEOUT_S",
    "header_timeout_s": "CAPTIONER_HEADER_TIMEOUT_S",
    "body_timeout_s": "CAPTIONER_BODY_TIMEOUT_S",
    "log_level": "CAPTIONER_LOG_LEVEL",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(text: str) -> bool | None:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off`` in any case; None for anything else."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's CPU set, where the platform
    reports one; else every core)."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity call
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_range(name: str, value: _Number, low: _Number, high: _Number) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must lie between {low} and {high}, got {value!r}")


class _Env:
    """Typed access to environment variables; every parse error names the variable and its value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int) -> int:
        value = self.optional_integer(name)
        return default if value is None else value

    def optional_integer(self, name: str) -> int | None:
        text = self.text(name)
        if text is None:
            return None
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {text!r}") from None

    def number(self, name: str, default: float) -> float:
        text = self.text(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {text!r}") from None
        if value != value:  # NaN passes every range check, so refuse it here
            raise ConfigError(f"{name} must be a number, got {text!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        text = self.text(name)
        if text is None:
            return default
        value = parse_bool(text)
        if value is None:
            raise ConfigError(f"{name} must be true or false, got {text!r}")
        return value

    def origins(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of origins such as ``https://example.org``, or ``*`` for any."""
        text = self.text(name)
        if text is None:
            return ()
        origins = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(f"{name} entries must be '*' or start with http:// or https://, got {origin!r}")
        return origins

    @staticmethod
    def rename(message: str) -> str:
        """Replace a leading field name by its environment variable."""
        field_name, _, rest = message.partition(" ")
        variable = _VARIABLES.get(field_name)
        return f"{variable} ({field_name}) {rest}" if variable else message
