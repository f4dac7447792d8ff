"""map, starmap and imap behave as ``multiprocessing.Pool.imap`` and
``concurrent.futures.Executor.map`` do, or differ as docs/api.md says (issue 15).

Every test runs real Celery worker processes (the session's ``worker``)
against real Redis.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time
from collections.abc import Iterator
from typing import Any

import pytest

import celery_ordered
from celery_ordered import OrderedResultStream, StreamEmpty
from celery_ordered.errors import ProducerFailed
from tests.apps.tasks import CustomError, echo, gate, inverse_or_fail, plain_add
from tests.support.streams import outcomes

#: Seconds any single outcome may take (a bound, not a pace).
RESULT_TIMEOUT = 30.0


def sqr(x: int) -> int:
    """The standard library's own example function."""
    return x * x


def pair(x: Any, y: Any) -> list[Any]:
    """Its two arguments, to show how they were passed."""
    return [x, y]


class InputBroke(Exception):
    """What the input iterable raises."""


def gen(n: int) -> Iterator[int]:
    """``range(n)``, then an exception: Python's own test of ``Pool.imap``."""
    yield from range(n)
    raise InputBroke(f"the input broke after {n} items")


def keys_of(redis_client: Any, name: str) -> list[bytes]:
    return list(redis_client.scan_iter(match=f"co:{{{name}}}:*"))


# -- reference: what the standard library does ----------------------------------


def test_pool_imap_yields_what_was_read_then_raises_the_inputs_error_once() -> None:
    # The behaviour this module holds celery-ordered to, from Pool.imap itself.
    # (With chunksize > 1, Pool.imap also drops the items of the chunk it was
    # filling: [0, 1] then the error for chunksize=2. celery-ordered hands
    # those out too, with any chunksize: see docs/api.md.)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        seen = outcomes(pool.imap(sqr, gen(3)))
    assert seen[:3] == [0, 1, 4]
    assert [type(x) for x in seen[3:]] == [InputBroke]


# -- issue 15 item 3: the input iterable's own exception -----------------------


@pytest.mark.parametrize("chunksize", [1, 2, 3, 4, 10])
def test_an_input_error_comes_once_after_every_item_read_before_it(
    worker: Any, make_stream: Any, chunksize: int
) -> None:
    stream = make_stream(window=2)
    seen = outcomes(stream.map(plain_add, gen(3), chunksize=chunksize))
    assert seen[:3] == [0, 1, 2]
    assert [type(x) for x in seen[3:]] == [InputBroke]
    assert "after 3 items" in str(seen[3])


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_yields_the_squares_then_the_input_error_then_ends(
    app: Any, worker: Any, redis_client: Any, chunksize: int
) -> None:
    results = celery_ordered.imap(sqr, gen(3), app=app, chunksize=chunksize, window=2)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(InputBroke):
        next(results)
    with pytest.raises(StopIteration):
        next(results)
    # The iteration ended: its private stream is gone.
    assert keys_of(redis_client, results.name) == []  # type: ignore[attr-defined]


def test_an_input_error_at_once_ends_the_map_without_outcomes(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream()
    seen = outcomes(stream.map(sqr, gen(0), chunksize=3))
    assert [type(x) for x in seen] == [InputBroke]


def test_a_consumer_elsewhere_sees_the_input_error_as_the_streams_end(
    app: Any, worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=4)
    elsewhere = OrderedResultStream(app, stream.name)  # consumes the same stream
    results = stream.map(plain_add, gen(2))
    with pytest.raises(InputBroke):
        list(results)
    with pytest.raises(ProducerFailed, match="InputBroke"):
        elsewhere.get(timeout=RESULT_TIMEOUT)


# -- issue 15 item 4: close() ends the iteration ------------------------------


def test_imap_after_close_is_exhausted_and_its_stream_gone(
    app: Any, worker: Any, redis_client: Any
) -> None:
    results = celery_ordered.imap(echo, range(50), app=app, window=8)
    name = results.name  # type: ignore[attr-defined]
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    with pytest.raises(StopIteration):
        next(results)
    assert list(results) == []
    assert keys_of(redis_client, name) == []


@pytest.mark.parametrize("chunksize", [1, 5])
def test_a_map_after_close_is_exhausted_and_its_stream_closed(
    worker: Any, make_stream: Any, chunksize: int
) -> None:
    stream = make_stream(window=4)
    read: list[int] = []

    def numbers() -> Iterator[int]:
        for i in itertools.count():
            read.append(i)
            yield i

    results = stream.map(echo, numbers(), chunksize=chunksize)
    assert next(results) == 0
    results.close()  # type: ignore[attr-defined]
    taken = len(read)
    with pytest.raises(StopIteration):
        next(results)
    assert len(read) == taken  # nothing more read from the input
    assert stream.stats().closed


# -- issue 15 item 5: timeouts ------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 2])
def test_a_map_timeout_is_a_timeout_error_and_loses_nothing(
    app: Any, worker: Any, redis_client: Any, redis_url: str, gate_key: str, chunksize: int
) -> None:
    # Given two items held on workers until the test opens the gate
    called = time.monotonic()
    results = celery_ordered.imap(
        gate,
        itertools.repeat(redis_url),
        itertools.repeat(gate_key),
        ["a", "b"],
        app=app,
        chunksize=chunksize,
        timeout=0.3,
    )
    # When next() waits longer than the timeout
    with pytest.raises(TimeoutError) as raised:
        next(results)
    # Then it is the concurrent.futures error and the queue module's
    assert isinstance(raised.value, StreamEmpty)
    # And the items are all still to come, in order, after the gate opens:
    # the timeout counts per next(), as Pool.imap's next(timeout), not from
    # the call as in Executor.map (which would raise from now on)
    assert time.monotonic() - called > 0.3
    redis_client.rpush(gate_key, 1, 1)
    assert list(results) == ["a", "b"]


def test_after_a_timeout_next_waits_for_the_same_item_again(
    worker: Any, make_stream: Any, redis_client: Any, redis_url: str, gate_key: str
) -> None:
    stream = make_stream(window=4)
    results = stream.map(gate.s(redis_url, gate_key), ["a", "b", "c"], timeout=0.3)
    with pytest.raises(TimeoutError):
        next(results)
    redis_client.rpush(gate_key, 1, 1, 1)
    assert list(results) == ["a", "b", "c"]


def test_map_refuses_bad_arguments_at_the_call(make_stream: Any) -> None:
    stream = make_stream()
    with pytest.raises(ValueError, match="timeout"):
        stream.map(echo, [1], timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        celery_ordered.imap(echo, [1], app=stream.app, timeout=float("nan"))
    with pytest.raises(ValueError, match="chunksize"):
        celery_ordered.imap(echo, [1], app=stream.app, chunksize=0)
    assert stream.stats().claimed == 0


# -- issue 15 item 6: several iterables and starmap ----------------------------


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_over_several_iterables_zips_them_shortest_first(
    app: Any, worker: Any, make_stream: Any, chunksize: int
) -> None:
    expected = list(map(pair, "abcd", range(3)))
    assert list(make_stream().map(pair, "abcd", range(3), chunksize=chunksize)) == expected
    assert list(celery_ordered.imap(pair, "abcd", range(3), app=app)) == expected
    endless = celery_ordered.imap(plain_add, itertools.count(), [10, 20], app=app)
    assert list(endless) == [10, 21]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_starmap_calls_with_each_tuple(
    app: Any, worker: Any, make_stream: Any, chunksize: int
) -> None:
    calls = [(1, 2), (3, 4), (5, 6), (7, 8)]
    expected = list(itertools.starmap(plain_add, calls))
    assert list(make_stream().starmap(plain_add, calls, chunksize=chunksize)) == expected
    assert list(celery_ordered.starmap(plain_add, calls, app=app, chunksize=chunksize)) == (
        expected
    )


@pytest.mark.parametrize("chunksize", [1, 3])
def test_starmap_fails_only_the_item_that_is_no_argument_tuple(
    worker: Any, make_stream: Any, chunksize: int
) -> None:
    seen = outcomes(make_stream().starmap(plain_add, [(1, 2), 5, (3,)], chunksize=chunksize))
    assert seen[0] == 3
    assert isinstance(seen[1], TypeError)
    assert seen[2] == 3


def test_a_failing_item_still_fails_only_its_place_in_a_starmap(
    worker: Any, make_stream: Any
) -> None:
    seen = outcomes(make_stream().starmap(inverse_or_fail, [(1,), (0,), (2,)], chunksize=2))
    assert seen[0] == 1.0
    assert isinstance(seen[1], CustomError)
    assert seen[2] == 0.5


# -- issue 11 item 12: a finished map is acknowledged --------------------------


@pytest.mark.parametrize("chunksize", [1, 10])
def test_a_finished_map_is_acknowledged_for_every_handle(
    app: Any, worker: Any, make_stream: Any, chunksize: int
) -> None:
    stream = make_stream(window=8)
    assert list(stream.map(echo, range(101), chunksize=chunksize)) == list(range(101))

    other = OrderedResultStream(app, stream.name, create=False)
    stats = other.stats()
    entries = 101 if chunksize == 1 else 11
    assert (stats.claimed, stats.delivered, stats.closed) == (entries, entries, True)
    assert list(other) == []  # a later consumer is handed nothing again
