"""Dynamic batching: requests that arrive close together share one model call.

A model call on N images costs much less than N calls on one image (the encoder's convolutions and
every decoder step run once for the whole batch), so under load the service gathers the images of
concurrent requests. Request threads ``submit`` their already preprocessed items and wait on a
future; one worker thread takes the oldest waiting request, waits at most ``max_wait_ms`` after its
arrival for companions with the same key (decoding options: a beam of 5 and a greedy search cannot
share a call), runs up to ``max_batch_size`` items at once and hands every request its own results.

The queue is bounded by a number of items, and ``submit`` never blocks: when the queue is full it
raises ``QueueFull`` at once, so the memory held by waiting requests is bounded and a client under
overload gets a quick answer to retry later instead of a slow timeout.

Waiting for companions only pays when some are on their way. A caller may announce each request as
it starts reading and decoding its images (``arriving``), before it can submit; then a batch waits
only while an announced request has not submitted yet, and a request with nothing else on its way
runs at once instead of paying ``max_wait_ms`` of latency for a batch of one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Key = TypeVar("Key", bound=Hashable)
Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """The queue has no room for the submitted items; the client should retry later."""


class BatcherClosed(QueueFull):
    """The batcher is shutting down and takes no new work."""


class BatchFailed(Exception):
    """The model call that held this request's items raised; the cause is logged, not shown."""


class Arrival:
    """One announced request (``DynamicBatcher.arriving``); its announcement ends when it submits."""

    def __init__(self) -> None:
        self.pending = True


@dataclass
class _Work(Generic[Key, Item, Result]):
    key: Key
    items: Sequence[Item]
    arrived: float
    future: Future[list[Result]] = field(default_factory=Future)


class DynamicBatcher(Generic[Key, Item, Result]):
    """Runs ``run(key, items) -> results`` (one result per item, same order) on batches of submitted items.

    ``on_batch(size, seconds, failed)`` is called after each model call, for metrics.
    """

    def __init__(
        self,
        run: Callable[[Key, list[Item]], list[Result]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        on_batch: Callable[[int, float, bool], None] | None = None,
        name: str = "batcher",
        announced: bool = False,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_size must be positive and max_wait_ms not negative")
        self._run = run
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue_size = queue_size
        self._on_batch = on_batch
        self._pending: deque[_Work[Key, Item, Result]] = deque()
        self._depth = 0  # items in _pending
        # With ``announced`` the callers announce their requests (``arriving``), and a batch waits
        # only while some announced request has not submitted yet.
        self._announced = announced
        self._arriving = 0
        self._closed = False
        self._condition = threading.Condition()
        # A daemon thread: a worker process that is exiting must not wait on it (close() drains it first).
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting to be run (not counting a batch being run now)."""
        with self._condition:
            return self._depth

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Announce a request that is preparing its items; pass the ``Arrival`` to ``submit``. Leaving
        the block without submitting (a bad image, a refused option) withdraws the announcement."""
        arrival = Arrival()
        with self._condition:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._condition:
                self._end_arrival(arrival)

    def _end_arrival(self, arrival: Arrival | None) -> None:
        if arrival is not None and arrival.pending:
            arrival.pending = False
            self._arriving -= 1
            self._condition.notify()

    def submit(self, key: Key, items: Sequence[Item], arrival: Arrival | None = None) -> Future[list[Result]]:
        """Queue ``items`` to be run together with others of the same ``key``; raises ``QueueFull``.

        Cancelling the returned future before its batch starts withdraws the items. ``arrival`` ends
        that request's announcement in the same step as it queues its items.
        """
        if not items:
            raise ValueError("submit needs at least one item")
        work: _Work[Key, Item, Result] = _Work(key, list(items), time.monotonic())
        with self._condition:
            self._end_arrival(arrival)
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            self._drop_cancelled()
            if self._depth + len(items) > self._queue_size:
                raise QueueFull(f"the queue is full ({self._depth} of {self._queue_size} images waiting)")
            self._pending.append(work)
            self._depth += len(items)
            self._condition.notify()
        return work.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, run what is queued, and stop the worker thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            self._execute(taken)

    def _next_batch(self) -> list[_Work[Key, Item, Result]] | None:
        """Wait until the oldest request's batch is full or has waited long enough, then take it."""
        with self._condition:
            while True:
                self._drop_cancelled()
                if not self._pending:
                    if self._closed:
                        return None
                    self._condition.wait()
                    continue
                first = self._pending[0]
                ready = sum(len(work.items) for work in self._pending if work.key == first.key)
                remaining = first.arrived + self._max_wait - time.monotonic()
                nothing_on_its_way = self._announced and self._arriving == 0
                if ready >= self._max_batch_size or remaining <= 0 or self._closed or nothing_on_its_way:
                    break
                self._condition.wait(remaining)
            taken, rest, size, full = [], deque(), 0, False
            for work in self._pending:
                # Requests of the batch's key are taken oldest first until the next one would not fit;
                # the first is always taken, even alone above the batch size (_execute splits it).
                fits = not taken or size + len(work.items) <= self._max_batch_size
                if work.key == first.key and not full and fits:
                    taken.append(work)
                    size += len(work.items)
                else:
                    full = full or work.key == first.key
                    rest.append(work)
            self._pending = rest
            self._depth -= size
        # A future cancelled after the check above is dropped here; the others can no longer be cancelled.
        return [work for work in taken if work.future.set_running_or_notify_cancel()]

    def _drop_cancelled(self) -> None:
        if any(work.future.cancelled() for work in self._pending):
            kept = deque(work for work in self._pending if not work.future.cancelled())
            self._depth = sum(len(work.items) for work in kept)
            self._pending = kept

    def _execute(self, works: list[_Work[Key, Item, Result]]) -> None:
        """Run the taken requests in calls of at most ``max_batch_size`` items and resolve their futures.

        Any exception of ``run`` fails exactly the requests of that call, and the thread lives on.
        """
        if not works:
            return
        key = works[0].key
        items = [item for work in works for item in work.items]
        results: list[Result] = []
        try:
            for start in range(0, len(items), self._max_batch_size):
                chunk = items[start : start + self._max_batch_size]
                began = time.perf_counter()
                failed = True
                try:
                    produced = self._run(key, chunk)
                    if len(produced) != len(chunk):
                        raise RuntimeError(f"run returned {len(produced)} results for {len(chunk)} items")
                    failed = False
                finally:
                    self._report(len(chunk), time.perf_counter() - began, failed)
                results.extend(produced)
        except Exception as error:
            logger.exception("a batch of %d images failed", len(items))
            for work in works:
                failure = BatchFailed("captioning failed")
                failure.__cause__ = error
                work.future.set_exception(failure)
            return
        offset = 0
        for work in works:
            work.future.set_result(results[offset : offset + len(work.items)])
            offset += len(work.items)

    def _report(self, size: int, seconds: float, failed: bool) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds, failed)
        except Exception:  # metrics must never take the batcher down
            logger.exception("the batch callback failed")
