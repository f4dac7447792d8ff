"""OrderedResultStream end to end: real Redis, real Celery worker processes."""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from celery_ordered import (
    DispatchError,
    OrderedResultStream,
    OrderedStreamError,
    RemoteTraceback,
    StreamClosedError,
    StreamEmpty,
    StreamExhausted,
    StreamFull,
    StreamStats,
    TaskFailed,
    UnsendableError,
)
from celery_ordered.errors import ProducerFailed
from tests.apps.tasks import (
    CustomError,
    check_positive,
    echo,
    fail,
    fail_two_args,
    fail_value_error,
    gate,
    plain_add,
    plain_fail,
    sleep_echo,
    unencodable_result,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def gates(redis_url: str, redis_client: redis.Redis) -> Any:
    """Put tasks that finish only when the test opens their gate."""
    shut: set[str] = set()

    class Gates:
        def put(self, stream: OrderedResultStream, value: Any) -> tuple[int, str]:
            key = f"co-test-gate:{uuid.uuid4().hex}"
            shut.add(key)
            return stream.put(gate, redis_url, key, value), key

        def open(self, key: str) -> None:
            shut.discard(key)
            redis_client.rpush(key, 1)

    yield Gates()
    # Open any gate a failing test left shut, so no worker stays blocked; the
    # token expires if its task was never dispatched.
    for key in shut:
        redis_client.rpush(key, 1)
        redis_client.expire(key, 10)


# -- order -----------------------------------------------------------------


def test_order_preserved_over_uneven_tasks_and_reordering_happened(make_stream):
    rng = random.Random(20261127)
    durations = [rng.uniform(0, 0.02) for _ in range(300)]
    stream = make_stream(window=64)

    def produce() -> None:
        for i, seconds in enumerate(durations):
            stream.put(sleep_echo, i, seconds)
        stream.close()

    with ThreadPoolExecutor(1) as pool:
        producing = pool.submit(produce)
        results = list(stream)
        producing.result(timeout=60)

    assert results == list(range(300))
    # Results really finished out of order on the 4 worker processes, and the
    # consumer still handed them out in order: the test can fail.
    assert stream.peak_out_of_order > 0
    stats = stream.stats()
    assert (stats.claimed, stats.delivered, stats.in_flight, stats.buffered) == (300, 300, 0, 0)


def test_results_arrive_as_soon_as_possible_not_after_close(make_stream):
    stream = make_stream(window=8)
    first = stream.put(echo, "early")
    # The stream is still open: the consumer gets outcomes while work is put.
    assert stream.get(timeout=30) == "early"
    assert stream.put(echo, "later") == first + 1
    assert stream.get(timeout=30) == "later"
    stream.close()
    assert list(stream) == []


# -- failures at their position ------------------------------------------------


def test_task_exceptions_raise_at_their_position_with_remote_traceback(make_stream):
    stream = make_stream(window=16)
    assert stream.put(echo, "a") == 0
    custom_seq = stream.put(fail, "custom boom")
    stream.put(echo, "b")
    value_seq = stream.put(fail_value_error, "bad value")
    stream.put(echo, "c")
    stream.close()

    assert stream.get(timeout=30) == "a"

    with pytest.raises(CustomError, match="custom boom") as info:
        stream.get(timeout=30)
    err = info.value
    assert type(err) is CustomError  # its own class, rebuilt in the consumer
    assert err.seq == custom_seq
    assert err.stream == stream.name
    assert err.task_name == "tests.apps.tasks.fail"
    assert "in fail" in err.stack_trace
    assert "raise CustomError(message)" in err.stack_trace
    assert isinstance(err.__cause__, RemoteTraceback)
    assert err.__cause__.stack_trace == err.stack_trace
    assert "raise CustomError(message)" in str(err.__cause__)

    assert stream.get(timeout=30) == "b"  # the stream goes on after a failure

    with pytest.raises(ValueError, match="bad value") as info:
        stream.get(timeout=30)
    assert type(info.value) is ValueError
    assert info.value.seq == value_seq
    assert "raise ValueError(message)" in info.value.stack_trace
    assert isinstance(info.value.__cause__, RemoteTraceback)

    assert stream.get(timeout=30) == "c"
    with pytest.raises(StreamExhausted):
        stream.get(timeout=30)


def test_exception_that_cannot_be_rebuilt_raises_task_failed_naming_it(make_stream):
    stream = make_stream(window=8)
    stream.put(echo, "before")
    two_args_seq = stream.put(fail_two_args, 7)
    stream.put(echo, "after")
    stream.close()

    assert stream.get(timeout=30) == "before"
    # NeedsTwoArgs cannot be rebuilt from its args: TaskFailed names it.
    with pytest.raises(TaskFailed, match="NeedsTwoArgs") as info:
        stream.get(timeout=30)
    failed = info.value
    assert failed.exc_type == "NeedsTwoArgs"
    assert failed.exc_module == "tests.apps.tasks"
    assert failed.seq == two_args_seq
    assert failed.stream == stream.name
    assert "7: detail" in str(failed)
    assert "raise NeedsTwoArgs(code, " in failed.stack_trace
    assert "in fail_two_args" in failed.stack_trace
    assert isinstance(failed.__cause__, RemoteTraceback)
    assert stream.get(timeout=30) == "after"
    assert list(stream) == []


def test_plain_functions_run_on_workers_and_fail_at_position(make_stream):
    stream = make_stream(window=8)
    stream.put(plain_add, 2, y=3)
    failing = stream.put(plain_fail, "missing-key")
    stream.put(plain_add, 10)
    stream.close()

    assert stream.get(timeout=30) == 5
    with pytest.raises(KeyError) as info:
        stream.get(timeout=30)
    assert info.value.args == ("missing-key",)
    assert info.value.seq == failing
    assert "in plain_fail" in info.value.stack_trace
    assert "raise KeyError(message)" in info.value.stack_trace
    assert stream.get(timeout=30) == 10
    assert list(stream) == []


def test_unencodable_result_is_an_error_at_its_position(make_stream):
    stream = make_stream(window=8)
    stream.put(echo, 1)
    bad = stream.put(unencodable_result)
    stream.put(echo, 3)
    stream.close()

    assert stream.get(timeout=30) == 1
    with pytest.raises(
        UnsendableError, match=r"result of tests\.apps\.tasks\.unencodable_result"
    ) as info:
        stream.get(timeout=30)
    assert info.value.seq == bad
    assert isinstance(info.value, TypeError)
    assert stream.get(timeout=30) == 3
    assert list(stream) == []


def test_iteration_resumes_with_next_after_a_failure(make_stream):
    stream = make_stream(window=8)
    stream.put(echo, 0)
    stream.put(fail, "in the middle")
    stream.put(echo, 2)
    stream.close()

    seen: list[Any] = []

    def consume() -> None:
        for value in stream:
            seen.append(value)

    with pytest.raises(CustomError, match="in the middle"):
        consume()
    assert seen == [0]
    assert iter(stream) is stream
    assert next(stream) == 2
    with pytest.raises(StopIteration):
        next(stream)
    with pytest.raises(StreamExhausted):
        stream.get()


def test_dispatch_failure_fills_its_number_with_dispatch_error(make_stream, app):
    stream = make_stream(window=8)
    # The same stream, attached by name, whose apply_async fails after the
    # number was claimed (an unknown compression is refused by kombu).
    broken = make_stream(name=stream.name, task_options={"compression": "no-such-codec"})
    stream.put(echo, "before")
    with pytest.raises(DispatchError, match="no-such-codec") as info:
        broken.put(echo, "lost")
    assert info.value.seq == 1
    assert info.value.stream == stream.name
    stream.put(echo, "after")
    stream.close()

    assert stream.get(timeout=30) == "before"
    sending = r"sending task 'tests\.apps\.tasks\.echo'"
    with pytest.raises(DispatchError, match=sending) as delivered:
        stream.get(timeout=30)
    assert delivered.value.seq == 1
    assert stream.get(timeout=30) == "after"
    assert list(stream) == []
    assert stream.stats().claimed == 3


def test_pickle_serializer_round_trips_python_objects_and_exceptions(make_stream):
    stream = make_stream(window=8, serializer="pickle")
    stream.put(echo, [1, 2])  # arguments still travel as JSON (the task's serializer)
    stream.put(plain_add, 2, 3)
    failed = stream.put(fail, "pickled")
    stream.put((1, "tuple"))  # a marker keeps its Python type with pickle
    stream.put({1, 2, 3})
    stream.close()
    assert stream.get(timeout=30) == [1, 2]
    assert stream.get(timeout=30) == 5
    with pytest.raises(CustomError, match="pickled") as info:
        stream.get(timeout=30)
    assert info.value.seq == failed
    assert "raise CustomError(message)" in info.value.stack_trace
    assert stream.get(timeout=30) == (1, "tuple")
    assert stream.get(timeout=30) == {1, 2, 3}
    assert list(stream) == []


def test_consumer_refusing_a_content_type_gets_an_error_at_each_position(make_stream):
    producer = make_stream(window=8, serializer="pickle")
    consumer = make_stream(name=producer.name, accept=["json"])
    producer.put("pickled marker")
    producer.put(echo, "pickled result")
    producer.close()
    for seq in (0, 1):
        with pytest.raises(OrderedStreamError, match=r"accept=\[\.\.\.\]") as info:
            consumer.get(timeout=30)
        assert info.value.seq == seq
        assert "could not be decoded" in str(info.value)
    with pytest.raises(StreamExhausted):
        consumer.get(timeout=30)


# -- markers -----------------------------------------------------------------


def test_markers_pass_through_in_order_between_tasks(make_stream):
    stream = make_stream(window=16)
    items: list[Any] = [
        {"chapter": 1},
        (sleep_echo, "slow", 0.05),
        42,
        (echo, "fast"),
        "a string",
        None,
        [1, "two", 3.0],
        (echo, None),
        True,
    ]
    for item in items:
        if isinstance(item, tuple):
            stream.put(*item)
        else:
            stream.put(item)
    stream.close()
    assert list(stream) == [
        {"chapter": 1},
        "slow",
        42,
        "fast",
        "a string",
        None,
        [1, "two", 3.0],
        None,
        True,
    ]


def test_marker_with_arguments_is_refused_without_claiming(make_stream):
    stream = make_stream(window=8)
    stream.put("start")
    with pytest.raises(ValueError, match="marker takes no arguments"):
        stream.put({"a": 1}, "extra")
    with pytest.raises(ValueError, match="marker takes no arguments"):
        stream.put(5, key="value")
    assert stream.stats().claimed == 1
    stream.put("end")
    stream.close()
    assert list(stream) == ["start", "end"]


# -- signatures ------------------------------------------------------------------


def test_signatures_of_ordered_tasks_merge_their_arguments(make_stream):
    stream = make_stream(window=8)
    stream.put(echo.s("from signature"))
    stream.put(sleep_echo.s("partial"), 0.0)
    stream.put(sleep_echo.s(seconds=0.0), "kwargs merged")
    stream.close()
    assert list(stream) == ["from signature", "partial", "kwargs merged"]


# -- timeouts, blocking and lifecycle ---------------------------------------------


def test_get_timeout_on_empty_open_stream_raises_stream_empty(make_stream):
    stream = make_stream(window=4)
    started = time.monotonic()
    with pytest.raises(StreamEmpty) as info:
        stream.get(timeout=0.2)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, queue.Empty)
    assert 0.19 <= elapsed < 2.0
    assert info.value.seq == 0
    # Nothing was lost by timing out: a later outcome still comes.
    stream.put("marker")
    assert stream.get(timeout=5) == "marker"


def test_get_with_timeout_zero_polls(make_stream):
    stream = make_stream(window=4)
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0)
    stream.put("ready")
    assert stream.get(timeout=0) == "ready"
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0)


def test_closing_an_empty_stream(make_stream):
    stream = make_stream(window=4)
    stream.close()
    stream.join(timeout=5)
    assert not stream.is_alive()
    assert list(stream) == []
    with pytest.raises(StreamExhausted, match="closed"):
        stream.get(timeout=0)
    assert stream.stats().claimed == 0


def test_get_timeout_while_head_task_runs(make_stream, gates):
    stream = make_stream(window=4)
    _, key = gates.put(stream, "head")
    stream.put("behind")
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0.2)
    gates.open(key)
    assert stream.get(timeout=30) == "head"
    assert stream.get(timeout=5) == "behind"


def test_a_get_behind_another_threads_get_keeps_its_timeout(make_stream, gates):
    # As for queue.Queue: a second thread's get(timeout=...) on the same handle
    # raises Empty within its timeout, while the first thread's get() waits on.
    stream = make_stream(window=4)
    _, key = gates.put(stream, "head")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(stream.get, 60)
        wait_until(stream.consumer._lock.locked, "the first get() to hold the consumer")
        with pytest.raises(StreamEmpty, match=r"another get\(\) on this handle"):
            stream.get(timeout=0.2)
        assert not first.done()
        gates.open(key)
        assert first.result(timeout=30) == "head"
    stream.put("behind")
    assert stream.get(timeout=30) == "behind"  # nothing lost, nothing stalled


def test_put_timeout_on_full_window_raises_stream_full_and_claims_nothing(make_stream):
    stream = make_stream(window=2)
    stream.put("a")
    stream.put("b")
    started = time.monotonic()
    with pytest.raises(StreamFull, match="window stayed full") as info:
        stream.put("c", timeout=0.2)
    assert time.monotonic() - started >= 0.19
    assert isinstance(info.value, queue.Full)
    with pytest.raises(StreamFull):
        stream.put(echo, "task", timeout=0)
    assert stream.stats().claimed == 2
    # Consuming frees the window: the put succeeds and takes the next number.
    assert stream.get(timeout=5) == "a"
    assert stream.put("c", timeout=5) == 2
    stream.close()
    assert list(stream) == ["b", "c"]


#: Seconds a handle polls Redis between two wake-ups, in the tests that show the
#: wake-up comes from Redis: far beyond any of their deadlines, so a wait that
#: ends in time was ended by a wake-up token, not by a poll.
NO_POLL = 3600.0


def _without_polling(stream: OrderedResultStream) -> OrderedResultStream:
    """``stream`` with its wait slice (how long one blocking wait lasts) set to :data:`NO_POLL`.

    Its waits then end only when Redis wakes them (or their own timeout).
    """
    stream.producer.protocol.wait_slice = NO_POLL
    return stream


def _blocked_put(stream: OrderedResultStream, value: Any) -> tuple[Any, threading.Event]:
    """Start a producer thread whose put blocks; returns (future, started).

    The put waits without polling (:func:`_without_polling`): only a wake-up
    from Redis, or its :data:`NO_POLL` timeout, ends its wait.
    """
    started = threading.Event()
    _without_polling(stream)

    def produce() -> int:
        started.set()
        return int(stream.put(value, timeout=NO_POLL))

    pool = ThreadPoolExecutor(1)
    future = pool.submit(produce)
    pool.shutdown(wait=False)
    return future, started


def test_raising_the_window_unblocks_a_blocked_producer(make_stream):
    stream = make_stream(window=1)
    stream.put("first")
    future, started = _blocked_put(stream, "second")
    assert started.wait(10)
    # The window is full and nobody consumes: the put stays blocked.
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    assert stream.stats().claimed == 1

    stream.set_window(2)
    # Woken by Redis, not by a polling loop: the put polls once an hour.
    assert future.result(timeout=30) == 1
    assert stream.window == 2
    stream.close()
    assert list(stream) == ["first", "second"]


def test_consuming_unblocks_a_blocked_producer(make_stream):
    stream = make_stream(window=1)
    stream.put("first")
    future, started = _blocked_put(stream, "second")
    assert started.wait(10)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)

    assert stream.get(timeout=5) == "first"
    # The acknowledgement travels on the next round trip (or ack()), and wakes
    # the producer: it polls once an hour.
    stream.ack()
    assert future.result(timeout=30) == 1
    assert stream.get(timeout=5) == "second"


def test_close_wakes_a_blocked_producer_with_stream_closed_error(make_stream):
    stream = make_stream(window=1)
    stream.put("only")
    future, started = _blocked_put(stream, "never")
    assert started.wait(10)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.3)
    # Another handle on the same stream closes it (as another process would).
    make_stream(name=stream.name).close()
    with pytest.raises(StreamClosedError):
        future.result(timeout=10)
    assert stream.stats().claimed == 1
    assert list(stream) == ["only"]


def test_put_after_close_is_refused(make_stream):
    stream = make_stream(window=4)
    stream.put(echo, 1)
    stream.close()
    with pytest.raises(StreamClosedError, match="after close") as info:
        stream.put(echo, 2)
    assert isinstance(info.value, ValueError)
    with pytest.raises(StreamClosedError):
        stream.put("marker")
    # A handle that did not close it learns from Redis.
    other = make_stream(name=stream.name)
    with pytest.raises(StreamClosedError, match="which is closed"):
        other.put(echo, 3)
    assert stream.stats().claimed == 1
    assert list(stream) == [1]
    stream.close()  # idempotent


def test_join_and_is_alive(make_stream, gates):
    stream = make_stream(window=8)
    _, key = gates.put(stream, "gated")
    stream.put(echo, "quick")

    # Not closed: join(timeout) returns and the stream is alive.
    started = time.monotonic()
    assert stream.join(timeout=0.2) is None
    assert time.monotonic() - started >= 0.19
    assert stream.is_alive()

    # Closed, but one outcome is still running: still alive.
    stream.close()
    stream.join(timeout=0.2)
    assert stream.is_alive()

    gates.open(key)
    stream.join(timeout=30)
    assert not stream.is_alive()
    # join() does not consume: the outcomes are all still there.
    assert stream.stats().buffered == 2
    assert list(stream) == ["gated", "quick"]
    stream.join()
    assert not stream.is_alive()


def test_join_wakes_when_the_last_outcome_arrives(make_stream, gates):
    stream = _without_polling(make_stream(window=8))
    _, key = gates.put(stream, "last")
    stream.close()
    with ThreadPoolExecutor(1) as pool:
        # join() polls once an hour: only the last outcome's arrival wakes it.
        joined = pool.submit(stream.join, timeout=NO_POLL)
        with pytest.raises(TimeoutError):
            joined.result(timeout=0.3)
        gates.open(key)
        joined.result(timeout=30)
    assert not stream.is_alive()
    assert stream.get(timeout=5) == "last"


def test_context_manager_closes_on_exit(make_stream):
    with make_stream(window=8) as stream:
        stream.put(echo, 1)
        stream.put("m")
    assert stream.stats().closed
    with pytest.raises(StreamClosedError):
        stream.put(echo, 2)
    assert list(stream) == [1, "m"]

    other = make_stream(window=8)

    def produce_and_break() -> None:
        with other:
            other.put(echo, 1)
            raise RuntimeError("producer broke")

    with pytest.raises(RuntimeError, match="producer broke"):
        produce_and_break()
    assert other.stats().closed
    # A failed producer is not a normal end: the outcome put before the
    # failure, then the producer's error, never StopIteration
    assert other.get(timeout=30) == 1
    with pytest.raises(ProducerFailed, match="RuntimeError: producer broke") as failed:
        next(other)
    assert failed.value.exc_type == "RuntimeError"
    assert 'raise RuntimeError("producer broke")' in failed.value.stack_trace
    with pytest.raises(ProducerFailed):  # and again: the stream stays failed
        other.get(timeout=5)
    other.join(timeout=5)  # join returns: every outcome is in
    assert not other.is_alive()


def test_stats_reports_what_the_stream_holds(make_stream, gates):
    stream = make_stream(window=10)
    assert stream.stats() == StreamStats(
        claimed=0,
        delivered=0,
        in_flight=0,
        buffered=0,
        out_of_order=0,
        window=10,
        closed=False,
    )
    _, key = gates.put(stream, "head")
    stream.put("m1")
    stream.put("m2")
    stats = stream.stats()
    assert stats.blocker_waited is not None
    assert 0 <= stats.blocker_waited < 60
    assert dataclasses.replace(stats, blocker_waited=None) == StreamStats(
        claimed=3,
        delivered=0,
        in_flight=1,
        buffered=2,
        out_of_order=2,
        window=10,
        closed=False,
        blocker=0,  # the gated task holds up the two markers
    )
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0.1)
    assert stream.peak_out_of_order == 2

    gates.open(key)
    assert stream.get(timeout=30) == "head"
    stats = stream.stats()
    assert (stats.claimed, stats.delivered, stats.in_flight) == (3, 1, 0)
    assert (stats.buffered, stats.out_of_order) == (2, 0)

    stream.close()
    assert list(stream) == ["m1", "m2"]
    assert stream.stats() == StreamStats(
        claimed=3,
        delivered=3,
        in_flight=0,
        buffered=0,
        out_of_order=0,
        window=10,
        closed=True,
    )


def test_window_property_and_set_window(make_stream):
    stream = make_stream(window=3)
    assert stream.window == 3
    assert stream.stats().window == 3
    stream.set_window(5)
    assert stream.window == 5
    for i in range(5):
        stream.put(i, timeout=1)
    with pytest.raises(StreamFull):
        stream.put(5, timeout=0.05)
    # Lowering the window below what is in flight holds new puts back until
    # the consumer catches up; nothing already claimed is lost.
    stream.set_window(2)
    assert [stream.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(StreamFull):
        stream.put(5, timeout=0.05)
    assert stream.get(timeout=5) == 3
    stream.ack()
    assert stream.put(5, timeout=1) == 5
    stream.close()
    assert list(stream) == [4, 5]


def test_delete_removes_every_key(make_stream, redis_client):
    stream = make_stream(window=4)
    stream.put(echo, 1)
    stream.put("m")
    assert stream.get(timeout=30) == 1
    stream.close()
    assert redis_client.keys(f"co:{{{stream.name}}}:*")
    stream.delete()
    assert redis_client.keys(f"co:{{{stream.name}}}:*") == []


# -- map -------------------------------------------------------------------------


def test_map_yields_in_order_with_a_window_smaller_than_the_input(make_stream):
    stream = make_stream(window=4)
    out = []
    for value in stream.map(echo, range(40)):
        out.append(value)
        stats = stream.stats()
        assert stats.claimed - stats.delivered <= 4
    assert out == list(range(40))
    assert stream.stats().closed
    assert stream.stats().claimed == 40


def test_map_with_a_plain_function_is_lazy(make_stream):
    stream = make_stream(window=3)
    consumed = []

    def numbers():
        for i in range(10):
            consumed.append(i)
            yield i

    results = stream.map(plain_add, numbers(), timeout=30)
    assert next(results) == 0
    # Only about a window's worth was taken from the input.
    assert len(consumed) <= 3 + 1
    assert list(results) == list(range(1, 10))
    assert consumed == list(range(10))


# -- the tasks stay plain Celery tasks ----------------------------------------------

#: Prefix of the result-backend keys of the in-process app below.
BACKEND_PREFIX = f"co-test-backend-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def celery_config(redis_url: str) -> dict[str, Any]:
    """The in-process app: memory broker, the tests' Redis as result backend."""
    backend = redis_url
    if backend.startswith("unix://"):
        backend = "redis+socket://" + backend[len("unix://") :]
    return {
        "broker_url": "memory://",
        "result_backend": backend,
        "result_backend_transport_options": {"global_keyprefix": BACKEND_PREFIX},
        "ordered_redis_url": redis_url,
        "broker_transport_options": {"polling_interval": 0.05},
    }


@pytest.fixture
def backend_keys(redis_client: redis.Redis) -> Any:
    """The result-backend keys the in-process app wrote; removed afterwards."""

    def keys() -> set[bytes]:
        return set(redis_client.scan_iter(match=f"{BACKEND_PREFIX}*"))

    yield keys
    for key in keys():
        redis_client.delete(key)


def test_ordered_task_still_works_as_a_plain_celery_task(
    celery_app, celery_worker, make_stream, backend_keys
):
    assert echo("called") == "called"
    assert echo.apply(("applied",)).get() == "applied"
    with pytest.raises(CustomError, match="eager"):
        fail.apply(("eager",)).get()

    delayed = echo.delay("delayed")
    assert delayed.get(timeout=30) == "delayed"
    assert f"{BACKEND_PREFIX}celery-task-meta-{delayed.id}".encode() in backend_keys()
    with pytest.raises(CustomError, match="delayed failure"):
        fail.delay("delayed failure").get(timeout=30)

    # The same task put into a stream: its outcome goes to the stream only,
    # never to the result backend (the backend stores before on_success runs,
    # so once the outcome is here anything stored would be visible).
    before = backend_keys()
    stream = make_stream(app=celery_app, window=4)
    stream.put(echo, "streamed")
    stream.put(fail, "streamed failure")
    stream.close()
    assert stream.get(timeout=30) == "streamed"
    with pytest.raises(CustomError, match="streamed failure"):
        stream.get(timeout=30)
    assert backend_keys() == before


def test_map_goes_on_after_a_failed_item(make_stream):
    stream = make_stream(window=3)
    results = stream.map(check_positive, [0, 1, -2, 3, -4, 5, 6])
    seen: list[Any] = []
    while True:
        try:
            seen.append(next(results))
        except StopIteration:
            break
        except ValueError as exc:
            seen.append(f"error at {exc.seq}: {exc}")
    assert seen == [0, 1, "error at 2: -2 is negative", 3, "error at 4: -4 is negative", 5, 6]
    assert stream.stats().closed


def test_map_raises_an_item_it_cannot_send_at_its_position(make_stream):
    stream = make_stream(window=3)
    results = stream.map(echo, [1, object(), 3, 4])
    seen: list[Any] = []
    while True:
        try:
            seen.append(next(results))
        except StopIteration:
            break
        except UnsendableError as exc:
            seen.append(f"refused: {exc}"[:40])
    # Outcomes line up with the inputs: the refused one raises in its place.
    assert seen == [1, "refused: cannot encode the arguments of ", 3, 4]


def test_map_goes_on_after_an_item_it_cannot_send(make_stream):
    stream = make_stream(window=3)
    results = stream.map(echo, [1, object(), 3])
    outcomes: list[Any] = []
    errors = []
    while True:
        try:
            outcomes.append(next(results))
        except StopIteration:
            break
        except UnsendableError as exc:
            errors.append(str(exc))
    assert outcomes == [1, 3]
    assert len(errors) == 1
    assert "cannot encode the arguments of tests.apps.tasks.echo" in errors[0]
    # The refused item took no number, and the stream was closed at the end.
    stats = stream.stats()
    assert (stats.claimed, stats.closed) == (2, True)
