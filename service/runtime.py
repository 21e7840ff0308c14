"""The model of one worker process: loading it in the background, warming it up, and feeding it
through the dynamic batcher.

Each gunicorn worker imports ``service.wsgi`` after the fork and so builds its own application, loads
its own model and runs its own batcher thread. Loading after the fork matters: torch starts thread
pools on first use, and a pool created in the master would not survive into the forked workers.
The model loads in a background thread so that ``/healthz`` answers at once while ``/readyz`` says
503 until the model is loaded and has captioned one dummy image (the first call on a fresh model is
slow while memory is allocated, and no user request should pay for it).

Uploaded images are decoded on the worker's decode threads, at most ``ServiceConfig.decode_slots`` at
once whatever the number of request threads: a decode holds up to ``max_decode_bytes`` of memory and
a core, so the bound keeps a burst of large images from multiplying either. A request waits for its
slots, its decodes and its batch within one deadline (``request_timeout_s`` from when it started).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager

import torch
from flask import Flask
from PIL import Image

from captioner import Captioner, CaptionerError, CaptionResult
from captioner.decoding import SearchOptions
from captioner.images import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS
from service.batching import Arrival, BatcherClosed, BatchFailed, DynamicBatcher, QueueFull
from service.config import ServiceConfig
from service.errors import IMAGE_ERROR_STATUS, ServiceError
from service.memory import HeapTrimmer
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

EXTENSION = "captioner"

Loader = Callable[[ServiceConfig], Captioner]


def load_captioner(config: ServiceConfig) -> Captioner:
    """The default loader: the configured model directory (or the default model) on the configured device."""
    return Captioner.from_pretrained(
        config.model_dir, device=config.device, encoder_batch_size=config.encoder_batch_size
    )


class ModelRuntime:
    """The model of one process, its loading state, and the batcher that feeds it."""

    def __init__(
        self,
        config: ServiceConfig,
        metrics: ServiceMetrics,
        loader: Loader,
        on_load_failure: Callable[[BaseException], None] | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.captioner: Captioner | None = None
        self.batcher: DynamicBatcher[SearchOptions, torch.Tensor, CaptionResult] | None = None
        self._load_failed = False
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._ready = threading.Event()
        # The pool starts its threads on first use: in a gunicorn worker, after the fork.
        self._decoders = ThreadPoolExecutor(config.decode_slots, thread_name_prefix="image-decoder")
        self._decoding = 0  # decodes running now, under _decoding_lock
        self._decoding_lock = threading.Lock()
        self._trimmer = HeapTrimmer()
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and the batcher thread is running."""
        return self._ready.is_set() and self.batcher is not None and self.batcher.alive

    @property
    def failed(self) -> bool:
        """Loading failed, or the batcher thread is gone (the process can no longer caption)."""
        return self._load_failed or (self._ready.is_set() and not self.ready)

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _load(self) -> None:
        try:
            if self.config.torch_threads is not None:
                torch.set_num_threads(self.config.torch_threads)
            started = time.perf_counter()
            captioner = self._loader(self.config)
            loaded = time.perf_counter()
            self._warm_up(captioner)
        except Exception as error:
            # A CaptionerError explains itself (missing directory, bad checkpoint); anything else needs its trace.
            logger.error("the model could not be loaded: %s", error, exc_info=not isinstance(error, CaptionerError))
            self._load_failed = True
            if self._on_load_failure is not None:
                self._on_load_failure(error)
            return
        logger.info(
            "model %s %s loaded on %s in %.1fs, warmed up in %.1fs",
            captioner.info.name, captioner.info.version, captioner.device,
            loaded - started, time.perf_counter() - loaded,
        )  # fmt: skip
        self.captioner = captioner
        self.batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=self.config.max_batch_size,
            max_wait_ms=self.config.max_wait_ms,
            queue_size=self.config.queue_size,
            on_batch=self._record_batch,
            name="caption-batcher",
            announced=True,  # every /predict announces itself while it reads and decodes its images
        )
        info = captioner.info
        self.metrics.model_info.set(1, name=info.name, version=info.version, device=str(captioner.device))
        self._ready.set()

    def _warm_up(self, captioner: Captioner) -> None:
        """One short caption, so that the first user request does not pay for first-call allocations."""
        size = captioner.info.preprocessing.image_size
        blank = Image.new("RGB", (size, size), (128, 128, 128))
        captioner.caption(blank, beam_size=self.config.default_beam_size, max_length=2)

    @torch.inference_mode()
    def _run_batch(self, options: SearchOptions, pixels: list[torch.Tensor]) -> list[CaptionResult]:
        """The batcher's model call; runs on the batcher thread only.

        The decoder runs on the whole batch; the encoder in slices (``Captioner.encoder_batch_size``).
        """
        assert self.captioner is not None  # the batcher exists only once the captioner does
        batch = torch.stack(pixels).to(self.captioner.device)  # (N, 3, S, S)
        return self.captioner.caption_pixels(batch, options)

    def _record_batch(self, size: int, seconds: float, failed: bool) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.batch_latency.observe(seconds)
        if failed:
            self.metrics.batch_failures.inc()

    def preprocess(self, data: bytes, label: str | None = None) -> torch.Tensor:
        """Decode one uploaded image into the model's input; an ImageError becomes its 4xx."""
        assert self.captioner is not None
        try:
            return self.captioner.preprocess(
                data,
                max_pixels=self.config.max_pixels or DEFAULT_MAX_PIXELS,
                max_decode_bytes=self.config.max_decode_bytes or DEFAULT_MAX_DECODE_BYTES,
            )
        except CaptionerError as error:  # ImageError; OptionError cannot happen for bytes
            status = IMAGE_ERROR_STATUS.get(error.code, 422)
            message = f"{label}: {error.message}" if label else error.message  # label: which of several images
            raise ServiceError(status, error.code, message) from None

    def preprocess_all(self, images: list[bytes], deadline: float) -> list[torch.Tensor]:
        """Decode the images of one request on the decode threads, before anything is queued, so that a
        bad image never reaches the batcher; the first bad one (in order) answers for the request.

        ``deadline`` (``time.monotonic``) bounds the wait for decode slots and decodes: past it the
        request is a 503 ``timeout`` and its decodes that have not started are dropped. One already
        running in C cannot be stopped; it finishes on its thread and its result is discarded.
        """
        if time.monotonic() >= deadline:
            raise _timeout_error()
        several = len(images) > 1
        futures: list[Future[torch.Tensor]] = [
            self._decoders.submit(self._decode, data, f"image {i + 1}" if several else None)
            for i, data in enumerate(images)
        ]
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except TimeoutError:
            raise _timeout_error() from None
        finally:
            for future in futures:  # after a timeout or a bad image: the rest need not run
                future.cancel()

    def _decode(self, data: bytes, label: str | None) -> torch.Tensor:
        """One decode on a decode thread; the last of a burst to finish returns freed memory to the system."""
        with self._decoding_lock:
            self._decoding += 1
        try:
            return self.preprocess(data, label)
        finally:
            with self._decoding_lock:
                self._decoding -= 1
                idle = self._decoding == 0
            if idle:
                self._trimmer.trim()

    def arriving(self) -> AbstractContextManager[Arrival]:
        """Announce a request to the batcher while it reads and decodes its images (see ``caption``)."""
        assert self.batcher is not None
        return self.batcher.arriving()

    def caption(
        self,
        pixels: list[torch.Tensor],
        options: SearchOptions,
        arrival: Arrival | None = None,
        deadline: float | None = None,
    ) -> list[CaptionResult]:
        """Queue the images of one request and wait for their batch; 503 when the queue is full.
        ``arrival``, from ``arriving``, ends the request's announcement as its images are queued.
        ``deadline`` (``time.monotonic``; None: ``request_timeout_s`` from now) bounds the wait."""
        assert self.batcher is not None
        if deadline is None:
            deadline = time.monotonic() + self.config.request_timeout_s
        if time.monotonic() >= deadline:
            raise _timeout_error()
        try:
            future = self.batcher.submit(options, pixels, arrival)
        except BatcherClosed:
            raise ServiceError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"}) from None
        except QueueFull:
            self.metrics.queue_rejections.inc()
            raise ServiceError(503, "queue_full", "the server is busy; retry shortly", {"Retry-After": "1"}) from None
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            raise _timeout_error() from None
        except BatchFailed:
            raise ServiceError(500, "captioning_failed", "captioning failed because of a server error") from None

    def close(self, timeout: float | None = None) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.close(timeout)


def _timeout_error() -> ServiceError:
    return ServiceError(
        503, "timeout", "the server did not caption the image in time; retry later", {"Retry-After": "5"}
    )


def runtime_of(app: Flask) -> ModelRuntime:
    """The runtime that ``create_app`` attached to ``app``."""
    return app.extensions[EXTENSION]
