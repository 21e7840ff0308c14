"""The dynamic batcher on its own, with a recording stand-in for the model call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import BatcherClosed, BatchFailed, DynamicBatcher, QueueFull


class Recorder:
    """A model call that records each batch, can be held until released, and fails on request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, key: str, items: list[int]) -> list[int]:
        self.started.set()
        self.release.wait(10)
        with self.lock:
            self.calls.append((key, list(items)))
        if any(item < 0 for item in items):
            raise RuntimeError("a negative item")
        return [item * 10 for item in items]


def make(recorder: Recorder, **overrides: float) -> DynamicBatcher[str, int, int]:
    settings = {"max_batch_size": 4, "max_wait_ms": 50.0, "queue_size": 64} | overrides
    return DynamicBatcher(recorder, **settings)  # type: ignore[arg-type]


def test_requests_arriving_together_share_one_call_and_get_their_own_results() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_wait_ms=200.0)
    futures = [batcher.submit("greedy", [i]) for i in range(3)]
    assert [f.result(5) for f in futures] == [[0], [10], [20]]
    assert recorder.calls == [("greedy", [0, 1, 2])]
    batcher.close(5)


def test_a_batch_never_mixes_keys_nor_exceeds_the_batch_size() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=4, max_wait_ms=30.0)
    keys = ["beam3", "greedy"]
    with ThreadPoolExecutor(8) as pool:
        submitted = [pool.submit(batcher.submit, keys[i % 2], [i, i + 100]) for i in range(20)]
        results = [(i, s.result().result(10)) for i, s in enumerate(submitted)]
    assert all(result == [i * 10, (i + 100) * 10] for i, result in results)
    for key, items in recorder.calls:
        assert len(items) <= 4
        # Every item came from a request of that call's key (even i for beam3, odd for greedy).
        assert all(keys[(item % 100) % 2] == key for item in items)
    assert sorted(item for _, items in recorder.calls for item in items) == sorted(
        [i for i in range(20)] + [i + 100 for i in range(20)]
    )
    batcher.close(5)


def test_a_lone_request_waits_no_longer_than_max_wait() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=64, max_wait_ms=100.0)
    started = time.monotonic()
    assert batcher.submit("k", [1]).result(5) == [10]
    waited = time.monotonic() - started
    assert 0.09 <= waited < 3.0
    batcher.close(5)


def test_a_full_batch_runs_without_waiting_for_the_window() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2, max_wait_ms=5000.0)
    started = time.monotonic()
    first, second = batcher.submit("k", [1]), batcher.submit("k", [2])
    assert first.result(4) == [10] and second.result(4) == [20]
    assert time.monotonic() - started < 4.0
    batcher.close(5)


def test_a_request_larger_than_the_batch_size_is_split_into_several_calls() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2, max_wait_ms=0.0)
    assert batcher.submit("k", [1, 2, 3, 4, 5]).result(5) == [10, 20, 30, 40, 50]
    assert [items for _, items in recorder.calls] == [[1, 2], [3, 4], [5]]
    batcher.close(5)


def test_a_full_queue_refuses_at_once_and_frees_up_once_drained() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher = make(recorder, max_batch_size=1, max_wait_ms=0.0, queue_size=3)
    running = batcher.submit("k", [1])  # taken by the worker, which then blocks in the model call
    assert recorder.started.wait(5)
    queued = batcher.submit("k", [2, 3])
    queued_too = batcher.submit("k", [4])
    assert batcher.depth == 3
    started = time.monotonic()
    with pytest.raises(QueueFull):
        batcher.submit("k", [5])
    assert time.monotonic() - started < 1.0  # refusing does not wait for room
    recorder.release.set()
    assert running.result(5) == [10] and queued.result(5) == [20, 30] and queued_too.result(5) == [40]
    assert batcher.submit("k", [5]).result(5) == [50]
    assert batcher.depth == 0
    batcher.close(5)


def test_a_failing_call_fails_only_its_requests_and_the_worker_lives_on() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher = make(recorder, max_batch_size=8, max_wait_ms=0.0)
    blocker = batcher.submit("k", [1])
    assert recorder.started.wait(5)
    bad, good_same_batch = batcher.submit("k", [-1]), batcher.submit("k", [2])
    other_key = batcher.submit("other", [3])
    recorder.release.set()
    assert blocker.result(5) == [10]
    with pytest.raises(BatchFailed) as failure:
        bad.result(5)
    assert isinstance(failure.value.__cause__, RuntimeError)
    with pytest.raises(BatchFailed):
        good_same_batch.result(5)  # it shared the failing call
    assert other_key.result(5) == [30]
    assert batcher.alive
    assert batcher.submit("k", [4]).result(5) == [40]
    batcher.close(5)


def test_a_model_call_returning_the_wrong_number_of_results_is_a_failure() -> None:
    batcher: DynamicBatcher[str, int, int] = DynamicBatcher(
        lambda key, items: items[:-1], max_batch_size=4, max_wait_ms=0.0, queue_size=8
    )
    with pytest.raises(BatchFailed):
        batcher.submit("k", [1, 2]).result(5)
    assert batcher.alive
    batcher.close(5)


def test_a_cancelled_request_is_not_run_and_releases_its_room() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batcher = make(recorder, max_batch_size=1, max_wait_ms=0.0, queue_size=2)
    running = batcher.submit("k", [1])
    assert recorder.started.wait(5)
    abandoned = batcher.submit("k", [2, 3])
    assert abandoned.cancel()
    kept = batcher.submit("k", [4, 5])  # fits only because the cancelled request left the queue
    recorder.release.set()
    assert running.result(5) == [10] and kept.result(5) == [40, 50]
    assert all(2 not in items for _, items in recorder.calls)
    batcher.close(5)


def test_close_runs_what_is_queued_then_refuses_new_work() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=4, max_wait_ms=10_000.0)
    pending = batcher.submit("k", [7])
    batcher.close(5)
    assert pending.result(1) == [70]
    assert not batcher.alive
    with pytest.raises(BatcherClosed):
        batcher.submit("k", [1])


def test_the_batch_callback_sees_every_call_and_cannot_break_the_worker() -> None:
    seen: list[tuple[int, bool]] = []

    def on_batch(size: int, seconds: float, failed: bool) -> None:
        seen.append((size, failed))
        raise ValueError("a broken metrics callback")

    batcher: DynamicBatcher[str, int, int] = DynamicBatcher(
        Recorder(), max_batch_size=4, max_wait_ms=0.0, queue_size=8, on_batch=on_batch
    )
    assert batcher.submit("k", [1, 2]).result(5) == [10, 20]
    with pytest.raises(BatchFailed):
        batcher.submit("k", [-1]).result(5)
    assert batcher.submit("k", [3]).result(5) == [30]
    assert seen == [(2, False), (1, True), (1, False)]
    batcher.close(5)


# --- announced arrivals --------------------------------------------------------------------------


def test_with_nothing_announced_on_its_way_a_request_runs_without_waiting_the_window() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=64, max_wait_ms=5000.0, announced=True)
    started = time.monotonic()
    with batcher.arriving() as arrival:
        future = batcher.submit("k", [1], arrival)
    assert future.result(4) == [10], "a lone request must not wait out the 5 s window"
    assert time.monotonic() - started < 4.0
    batcher.close(5)


def test_a_batch_waits_for_an_announced_request_and_shares_its_call() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=64, max_wait_ms=5000.0, announced=True)
    second_ready = threading.Event()
    with batcher.arriving() as late:
        with batcher.arriving() as early:
            first = batcher.submit("k", [1], early)
        assert not first.done(), "the first request waits: another one has announced itself"
        threading.Timer(0.2, second_ready.set).start()
        assert second_ready.wait(5)
        second = batcher.submit("k", [2], late)
    assert first.result(4) == [10] and second.result(4) == [20]
    assert recorder.calls == [("k", [1, 2])]
    batcher.close(5)


def test_an_announced_request_that_never_submits_releases_the_waiting_batch() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=64, max_wait_ms=5000.0, announced=True)
    started = time.monotonic()
    with pytest.raises(ValueError, match="a bad image"), batcher.arriving():
        with batcher.arriving() as arrival:
            future = batcher.submit("k", [1], arrival)
        raise ValueError("a bad image")
    assert future.result(4) == [10]
    assert time.monotonic() - started < 4.0
    with batcher.arriving() as refused:  # a submit refused by a full queue also ends its announcement
        with pytest.raises(QueueFull):
            batcher.submit("k", list(range(65)), refused)
        assert not refused.pending
    batcher.close(5)
