"""OrderedExecutor: a concurrent.futures.Executor on real Celery workers.

The scenarios of CPython's ``Lib/test/test_concurrent_futures`` executor
tests (test_executor.py, test_shutdown.py) that apply, ported to an executor
whose work runs on Celery; then what is its own: futures complete in
submission order, errors carry the worker's traceback, asyncio's
``run_in_executor`` runs on the fleet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from celery_ordered import OrderedResultStream, UnsendableError
from celery_ordered.executor import OrderedExecutor
from tests.apps.tasks import (
    CustomError,
    echo,
    fail,
    gate,
    keywords,
    request_seen,
    sleep_echo,
)
from tests.support.waiting import wait_until

#: Seconds a test waits for any one result.
RESULT_TIMEOUT = 60


# Plain top-level functions: the workers run them through celery_ordered.call.


def power(x: int, y: int) -> int:
    """x ** y (the builtin pow is in a module workers refuse)."""
    return int(x**y)


def mul(x: int, y: int) -> int:
    """x * y."""
    return x * y


def capture(*args: Any, **kwargs: Any) -> Any:
    """What it was called with."""
    return [list(args), kwargs]


def divide(x: int, y: int) -> Any:
    """divmod(x, y): ZeroDivisionError for y == 0."""
    return divmod(x, y)


def stream_keys(client: redis.Redis, name: str) -> list[bytes]:
    """Every Redis key of stream ``name``."""
    return list(client.scan_iter(f"co:{{{name}}}:*"))


@pytest.fixture
def make_executor(
    app: Any, worker: Any, redis_client: redis.Redis
) -> Iterator[Callable[..., OrderedExecutor]]:
    """Executors on the tests' app; each is shut down after the test, leaving
    neither a thread nor a Redis key."""
    made: list[OrderedExecutor] = []

    def make(**kwargs: Any) -> OrderedExecutor:
        executor = OrderedExecutor(app, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True)
        assert not [t for t in executor._shared.threads if t.is_alive()]
        assert stream_keys(redis_client, executor.name) == []


# -- ported from CPython's test_concurrent_futures/test_executor.py ------------------


def test_submit(make_executor: Any) -> None:
    executor = make_executor()
    future = executor.submit(power, 2, 8)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(RESULT_TIMEOUT) == 256


def test_submit_keyword(make_executor: Any) -> None:
    executor = make_executor()
    assert executor.submit(mul, 2, y=8).result(RESULT_TIMEOUT) == 16
    # fn is positional-only: self= and fn= go to the function.
    future = executor.submit(capture, 1, self=2, fn=3)
    assert future.result(RESULT_TIMEOUT) == [[1], {"self": 2, "fn": 3}]
    with pytest.raises(TypeError):
        executor.submit(fn=capture, arg=1)
    with pytest.raises(TypeError):
        executor.submit(arg=1)
    # timeout= is the task's too (a stream's put keeps it for itself).
    assert executor.submit(keywords, timeout=3).result(RESULT_TIMEOUT) == {"timeout": 3}
    assert executor.submit(keywords.s(a=1), timeout=4).result(RESULT_TIMEOUT) == {
        "a": 1,
        "timeout": 4,
    }


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map(make_executor: Any, chunksize: int) -> None:
    executor = make_executor(window=4)
    assert list(executor.map(power, range(10), range(10), chunksize=chunksize)) == list(
        map(pow, range(10), range(10))
    )


def test_map_in_chunks_runs_a_task_as_a_direct_call_of_it_would(make_executor: Any) -> None:
    executor = make_executor(window=4)
    seen = list(executor.map(request_seen, range(5), chunksize=2))
    assert seen == [[i, [i], True, True, None] for i in range(5)]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_exception(make_executor: Any, chunksize: int) -> None:
    executor = make_executor()
    results = executor.map(divide, [1, 1, 1, 1], [2, 3, 0, 5], chunksize=chunksize)
    assert next(results) == [0, 1]  # with chunksize=2: the first chunk, one by one
    assert next(results) == [0, 1]
    with pytest.raises(ZeroDivisionError) as raised:
        next(results)
    assert "return divmod(x, y)" in raised.value.stack_trace  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):  # the map ends at its error, like the standard one
        next(results)


def test_map_timeout(make_executor: Any, redis_url: str, redis_client: Any, gate_key: str) -> None:
    executor = make_executor()
    redis_client.rpush(gate_key, 1, 1)  # the first two calls pass, the third waits
    results = executor.map(gate, [redis_url] * 3, [gate_key] * 3, [0, 1, 2], timeout=3)
    # The timeout runs from the call: the third call never ends before it, so
    # the iteration ends in TimeoutError, after whatever came out in time
    # (the first two, unless the machine is too loaded to run them in 3 s)
    got: list[Any] = []
    with pytest.raises(TimeoutError):
        got.extend(results)
    assert got == [0, 1][: len(got)]
    assert issubclass(concurrent.futures.TimeoutError, TimeoutError)
    redis_client.rpush(gate_key, 1)  # let the third finish before shutdown waits for it


def test_a_map_timeout_bounds_the_sending_on_a_full_window(
    make_executor: Any, redis_url: str, redis_client: Any, gate_key: str
) -> None:
    # The standard map never waits to send; this one waits on the window, and
    # the map's timeout bounds that wait too: the call returns with only a
    # window's worth sent while those two still wait on their gate (before,
    # it waited for them, and returned only once they had timed out).
    executor = make_executor(window=2)
    args = [redis_url] * 4, [gate_key] * 4, range(4), [20] * 4
    results = executor.map(gate, *args, timeout=0.5)
    stats = executor._shared.stream.stats()
    assert (stats.claimed, stats.delivered) == (2, 0)
    redis_client.rpush(gate_key, 1, 1)
    # The iteration ends in TimeoutError: at the first result not there in
    # time, or at the third item, which was never sent.
    got: list[Any] = []
    with pytest.raises(TimeoutError):
        got.extend(results)
    assert got == [0, 1][: len(got)]
    assert executor._shared.stream.stats().claimed == 2


def test_a_negative_map_timeout_has_already_passed_as_in_the_standard_library(
    make_executor: Any, redis_url: str, redis_client: Any, gate_key: str
) -> None:
    # The standard map takes a negative timeout: the first result not there yet times out
    release = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        standard = pool.map(release.wait, [60], timeout=-1)
        with pytest.raises(TimeoutError):
            next(standard)
        release.set()
    executor = make_executor()
    results = executor.map(gate, [redis_url], [gate_key], [0], timeout=-1)
    with pytest.raises(TimeoutError):
        next(results)
    redis_client.rpush(gate_key, 1)  # let the call finish before shutdown waits for it


def test_shutdown_race_issue12456(make_executor: Any) -> None:
    executor = make_executor()
    # Work submitted, then a shutdown before any of it is done: no hang.
    executor.map(echo, [2] * 5)
    executor.shutdown()


def test_map_buffersize_type_validation(make_executor: Any) -> None:
    executor = make_executor()
    for buffersize in ("1", 1.0, True):
        with pytest.raises(TypeError, match="buffersize"):
            executor.map(echo, range(4), buffersize=buffersize)


def test_map_buffersize_value_validation(make_executor: Any) -> None:
    executor = make_executor()
    for buffersize in (0, -1):
        with pytest.raises(ValueError, match="buffersize must be None or an int >= 1"):
            executor.map(echo, range(4), buffersize=buffersize)


def test_map_buffersize(make_executor: Any) -> None:
    executor = make_executor()
    for buffersize in (1, 2, 4, 11):
        assert list(executor.map(echo, range(10), buffersize=buffersize)) == list(range(10))


def test_map_buffersize_on_multiple_iterables(make_executor: Any) -> None:
    executor = make_executor()
    results = executor.map(power, range(10), range(10), buffersize=2)
    assert list(results) == list(map(pow, range(10), range(10)))


def test_map_buffersize_on_infinite_iterable(make_executor: Any) -> None:
    executor = make_executor()
    results = executor.map(echo, itertools.count(), buffersize=2)
    assert [next(results) for _ in range(3)] == [0, 1, 2]


def test_map_buffersize_on_multiple_infinite_iterables(make_executor: Any) -> None:
    executor = make_executor()
    results = executor.map(power, itertools.count(), itertools.count(), buffersize=2)
    assert [next(results) for _ in range(4)] == [1, 1, 4, 27]


def test_map_buffersize_on_empty_iterable(make_executor: Any) -> None:
    executor = make_executor()
    assert next(executor.map(echo, [], buffersize=2), None) is None


def test_map_buffersize_without_iterable(make_executor: Any) -> None:
    executor = make_executor()
    assert next(executor.map(echo, buffersize=2), None) is None


def test_map_buffersize_when_buffer_is_full(make_executor: Any) -> None:
    executor = make_executor()
    ints = iter(range(4))
    executor.map(echo, ints, buffersize=2)
    executor.shutdown(wait=True)
    assert next(ints) == 2  # only buffersize items were read


def test_map_closed_early_reads_no_further(make_executor: Any) -> None:
    executor = make_executor()
    ints = iter(range(100))
    results = executor.map(echo, ints, buffersize=3)
    assert next(results) == 0  # taking one submits one more: 4 read
    results.close()
    assert next(ints) == 4


# -- ported from CPython's test_concurrent_futures/test_shutdown.py ------------------


def test_run_after_shutdown(make_executor: Any) -> None:
    executor = make_executor()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(power, 2, 5)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(power, [2], [5])


def test_hang_issue12364(make_executor: Any) -> None:
    executor = make_executor(window=4)
    futures = [executor.submit(sleep_echo, n, 0.01) for n in range(20)]
    executor.shutdown()
    assert [future.result(0) for future in futures] == list(range(20))


def test_context_manager_shutdown(app: Any, worker: Any, redis_client: Any) -> None:
    with OrderedExecutor(app) as executor:
        assert list(executor.map(abs_of, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        threads = list(executor._shared.threads)
    assert threads
    assert not [t for t in threads if t.is_alive()]
    assert stream_keys(redis_client, executor.name) == []


def abs_of(x: int) -> int:
    """abs(x) (the builtin is in a module workers refuse)."""
    return abs(x)


def test_del_shutdown(app: Any, worker: Any, redis_client: Any) -> None:
    executor = OrderedExecutor(app)
    name = executor.name
    results = executor.map(abs_of, range(-5, 5))
    threads = list(executor._shared.threads)
    del executor
    gc.collect()
    # The finalizer shut the collected executor down: its threads end once
    # every outcome was handed out, and the stream is deleted.
    for thread in threads:
        thread.join(RESULT_TIMEOUT)
        assert not thread.is_alive()
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert stream_keys(redis_client, name) == []


def test_an_unused_collected_executor_leaves_no_key(app: Any, redis_client: Any) -> None:
    executor = OrderedExecutor(app)
    name = executor.name
    assert stream_keys(redis_client, name)  # the window is stored at creation
    del executor
    gc.collect()
    assert stream_keys(redis_client, name) == []


def test_shutdown_no_wait(make_executor: Any) -> None:
    executor = make_executor(window=4)
    futures = [executor.submit(sleep_echo, n, 0.01) for n in range(8)]
    executor.shutdown(wait=False)
    threads = list(executor._shared.threads)
    for thread in threads:
        thread.join(RESULT_TIMEOUT)
        assert not thread.is_alive()
    assert [future.result(0) for future in futures] == list(range(8))


def test_cancel_futures(
    make_executor: Any, redis_url: str, redis_client: Any, gate_key: str
) -> None:
    executor = make_executor(window=1)
    held = executor.submit(gate, redis_url, gate_key, "held")
    refused: list[BaseException] = []

    def submit_more() -> None:
        try:
            executor.submit(echo, "never sent")  # blocks: the window is full
        except BaseException as exc:
            refused.append(exc)

    blocked = threading.Thread(target=submit_more)
    blocked.start()
    executor.shutdown(wait=False, cancel_futures=True)
    blocked.join(RESULT_TIMEOUT)
    assert [type(exc) for exc in refused] == [RuntimeError]
    # Sent work is running on Celery: it cannot be cancelled, and completes.
    assert held.running()
    assert not held.cancel()
    redis_client.rpush(gate_key, 1)
    assert held.result(RESULT_TIMEOUT) == "held"


# -- its own: order, errors, asyncio ------------------------------------------------


def test_futures_complete_in_submission_order(
    app: Any, make_executor: Any, redis_url: str, redis_client: Any, gate_key: str
) -> None:
    executor = make_executor()
    completed: list[int] = []
    first = executor.submit(gate, redis_url, gate_key, 0)
    later = [executor.submit(echo, n) for n in (1, 2)]
    for n, future in enumerate([first, *later]):
        future.add_done_callback(lambda _, n=n: completed.append(n))
    # Both later tasks are done on the workers (their outcomes wait in Redis)...
    watcher = OrderedResultStream(app, executor.name, create=False)
    wait_until(lambda: watcher.stats().buffered == 2, "the two later outcomes in Redis")
    # ...but their futures wait for the first.
    assert completed == []
    assert not any(future.done() for future in later)
    redis_client.rpush(gate_key, 1)
    assert [f.result(RESULT_TIMEOUT) for f in [first, *later]] == [0, 1, 2]
    assert completed == [0, 1, 2]


def test_a_failed_task_fails_its_future_with_the_workers_traceback(make_executor: Any) -> None:
    executor = make_executor()
    failed = executor.submit(fail, "boom")
    after = executor.submit(echo, "goes on")
    error = failed.exception(RESULT_TIMEOUT)
    assert isinstance(error, CustomError)
    assert "boom" in str(error)
    assert "raise CustomError(message)" in error.stack_trace  # type: ignore[attr-defined]
    assert after.result(RESULT_TIMEOUT) == "goes on"


def test_run_in_executor_runs_on_the_fleet(make_executor: Any) -> None:
    executor = make_executor(window=8)

    async def main() -> tuple[list[int], BaseException]:
        loop = asyncio.get_running_loop()
        squares = await asyncio.gather(
            *(loop.run_in_executor(executor, power, n, 2) for n in range(6))
        )
        try:
            await loop.run_in_executor(executor, divide, 1, 0)
        except ZeroDivisionError as exc:
            return list(squares), exc
        raise AssertionError("no error")

    squares, error = asyncio.run(main())
    assert squares == [0, 1, 4, 9, 16, 25]
    assert "divmod" in error.stack_trace  # type: ignore[attr-defined]


def test_bad_input_raises_at_the_call_and_the_executor_goes_on(make_executor: Any) -> None:
    executor = make_executor()
    with pytest.raises(UnsendableError, match="lambda"):
        executor.submit(lambda x: x, 1)
    with pytest.raises(TypeError, match="needs a callable"):
        executor.submit("not callable")
    with pytest.raises(UnsendableError, match=r"cannot|encode|serializ"):
        executor.submit(echo, object())
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(echo, [1], chunksize=0)
    with pytest.raises(ValueError, match="timeout"):
        executor.map(echo, [1], timeout="3")
    with pytest.raises(UnsendableError, match="chunksize"):
        executor.map(echo.s(), [1], chunksize=2)
    with pytest.raises(TypeError, match="private"):
        OrderedExecutor(executor.app, name=f"x-{uuid.uuid4().hex}")
    assert executor.submit(echo, "fine").result(RESULT_TIMEOUT) == "fine"


def test_a_chunk_fails_whole_as_in_process_pool_executor(make_executor: Any) -> None:
    executor = make_executor()
    results = executor.map(divide, [1, 1, 1, 1], [2, 0, 3, 5], chunksize=2)
    with pytest.raises(ZeroDivisionError):
        next(results)  # the first chunk holds the 0: its first item fails too


def test_a_done_callback_may_submit_on_a_full_window(make_executor: Any) -> None:
    # Callbacks run on the executor's completer thread, not on the thread that
    # reads the outcomes: a callback blocked on a full window does not stop
    # the outcomes that free it.
    executor = make_executor(window=2)
    done = threading.Event()
    futures: list[concurrent.futures.Future[Any]] = []

    def chain(future: concurrent.futures.Future[Any]) -> None:
        if len(futures) < 12:
            for _ in range(2):  # each outcome asks for two more: the window fills
                following = executor.submit(echo, len(futures))
                futures.append(following)
                following.add_done_callback(chain)
        elif all(f.done() for f in futures[:-1]):
            done.set()

    first = executor.submit(echo, "start")
    first.add_done_callback(chain)
    assert done.wait(RESULT_TIMEOUT)
    assert [f.result(RESULT_TIMEOUT) for f in futures] == list(range(len(futures)))
