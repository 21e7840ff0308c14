"""Prometheus metrics, written in the text exposition format (version 0.0.4) without a client library.

The service needs only counters, gauges and histograms with a few labels, and the format is small, so
writing it here avoids a dependency. Every instrument is thread-safe: gunicorn's request threads and
the batcher thread update them concurrently.

Metrics live in the memory of one process. With several gunicorn workers each worker counts only the
requests it served, and a scrape of ``/metrics`` reaches whichever worker accepts the connection; run
one worker per container (scale with containers) when exact per-instance totals matter.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every label value must come from a fixed set: a value taken from the request would let any client
# add series (memory in the service, storage in Prometheus) with each request it invents.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED_ENDPOINT = "unmatched"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Instrument:
    """One metric family: a name, a help text, label names, and a value per combination of labels."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _label_text(self, key: tuple[str, ...], extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.labelnames, key, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}"

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        header = f"# HELP {self.name} {_escape_help(self.documentation)}\n# TYPE {self.name} {self.kind}\n"
        return header + "".join(line + "\n" for line in self.samples())


class _Value(_Instrument):
    """An instrument holding one number per label set: what counters and gauges share."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> Iterable[str]:
        with self._lock:
            values = sorted(self._values.items())
        return [f"{self.name}{self._label_text(key)} {_number(value)}" for key, value in values]


class Counter(_Value):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._add(amount, labels)


class Gauge(_Value):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self._add(-amount, labels)


class Histogram(_Instrument):
    """Cumulative buckets plus ``_sum`` and ``_count``, as Prometheus expects."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labelnames)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("histogram buckets must be distinct and increasing")
        self.buckets = tuple(float(b) for b in buckets)
        # Per label set: counts per bucket (non-cumulative, +Inf last), sum of observations.
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterable[str]:
        with self._lock:
            snapshot = sorted((key, list(counts), self._sums[key]) for key, counts in self._counts.items())
        lines = []
        for key, counts, total in snapshot:
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                le = (("le", _number(bound)),)
                lines.append(f"{self.name}_bucket{self._label_text(key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{self._label_text(key)} {_number(total)}")
            lines.append(f"{self.name}_count{self._label_text(key)} {cumulative}")
        return lines


class ServiceMetrics:
    """The instruments of one application instance."""

    def __init__(self) -> None:
        self.requests = Counter(
            "captioner_http_requests_total",
            "HTTP requests answered, by endpoint, method and status.",
            ("endpoint", "method", "status"),
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds",
            "Time from receiving a request to returning its response.",
            LATENCY_BUCKETS,
            ("endpoint",),
        )
        self.in_flight = Gauge("captioner_predict_in_flight", "Predict requests being handled right now.")
        self.images = Counter("captioner_images_captioned_total", "Images captioned successfully.")
        self.batch_size = Histogram(
            "captioner_batch_size", "Images per model call made by the dynamic batcher.", BATCH_SIZE_BUCKETS
        )
        self.batch_latency = Histogram(
            "captioner_batch_duration_seconds", "Duration of one model call on a batch.", LATENCY_BUCKETS
        )
        self.batch_failures = Counter("captioner_batch_failures_total", "Model calls that raised an error.")
        self.queue_depth = Gauge("captioner_queue_depth", "Images waiting in the batcher's queue.")
        self.queue_rejections = Counter(
            "captioner_queue_rejections_total", "Requests refused with 503 because the batcher's queue was full."
        )
        self.ready = Gauge("captioner_model_ready", "1 once the model is loaded and warmed up, else 0.")
        self.model_info = Gauge(
            "captioner_model_info", "The loaded model; the value is always 1.", ("name", "version", "device")
        )
        self.ready.set(0)

    def instruments(self) -> list[_Instrument]:
        return [
            self.requests, self.latency, self.in_flight, self.images, self.batch_size, self.batch_latency,
            self.batch_failures, self.queue_depth, self.queue_rejections, self.ready, self.model_info,
        ]  # fmt: skip

    def render(self) -> str:
        return "".join(instrument.render() for instrument in self.instruments())


def method_label(method: str) -> str:
    """The request's method as a label: a standard one by name (methods are case-sensitive), else ``other``."""
    return method if method in KNOWN_METHODS else "other"


def _number(value: float) -> str:
    """Integers without a trailing ``.0``; infinities as Prometheus spells them."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
