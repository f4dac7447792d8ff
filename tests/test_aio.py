"""AsyncOrderedResultStream end to end: real Redis, real Celery worker processes.

Each test runs its coroutine with ``asyncio.run`` (a fresh event loop, whose
Redis clients close when it ends), under a deadline, so a test that hangs
fails instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import queue
import random
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis

from celery_ordered import (
    AsyncOrderedResultStream,
    ConsumerFenced,
    OrderedResultStream,
    ProducerFailed,
    RedisServer,
    RemoteTraceback,
    StreamClosedError,
    StreamDeleted,
    StreamEmpty,
    StreamExhausted,
    StreamFull,
    StreamNotFound,
)
from celery_ordered.redis.clients import async_client_for
from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.urls import socket_url
from tests.apps.tasks import (
    CustomError,
    echo,
    fail,
    gate,
    inverse_or_fail,
    plain_add,
    sleep_echo,
)
from tests.apps.topologyapp import topology_app
from tests.support.tools import require_tool
from tests.support.topologies import LocalSentinel, topology_worker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")

_T = TypeVar("_T")

#: Seconds one test's coroutine may take before it fails.
DEADLINE = 120.0


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on a fresh event loop, failing it after :data:`DEADLINE` seconds."""
    return asyncio.run(asyncio.wait_for(main, DEADLINE))


@pytest.fixture
def names(redis_client: redis.Redis) -> Iterator[Callable[[], str]]:
    """Unique stream names; every stream named is deleted after the test."""
    made: list[str] = []

    def name() -> str:
        made.append(f"test-aio-{uuid.uuid4().hex}")
        return made[-1]

    yield name
    for made_name in made:
        redis_client.delete(*StreamKeys(made_name).all())


@pytest.fixture
def open_gate(redis_url: str, redis_client: redis.Redis) -> Iterator[Callable[[str], None]]:
    """Open a ``gate`` task's gate (a Redis list); every gate is opened after the test."""
    keys: list[str] = []

    def open_(key: str) -> None:
        redis_client.rpush(key, 1)
        redis_client.expire(key, 60)

    def gate_key() -> str:
        keys.append(f"co-test-gate:{uuid.uuid4().hex}")
        return keys[-1]

    open_.key = gate_key  # type: ignore[attr-defined]
    yield open_
    for key in keys:
        open_(key)


async def consume(stream: AsyncOrderedResultStream) -> list[Any]:
    return [outcome async for outcome in stream]


async def gather(*coroutines: Coroutine[Any, Any, _T]) -> list[_T]:
    """``asyncio.gather`` as a coroutine, for :func:`run`."""
    return list(await asyncio.gather(*coroutines))


async def collect(outcomes: AsyncIterable[Any], seen: list[Any]) -> None:
    """Append each outcome to ``seen`` (which keeps them when the loop raises)."""
    async for outcome in outcomes:
        seen.append(outcome)


async def endless(read: list[int]) -> AsyncIterator[int]:
    """0, 1, 2... without end, each appended to ``read`` as it is read."""
    n = 0
    while True:
        read.append(n)
        yield n
        n += 1


# -- order, markers, errors ------------------------------------------------------


def test_order_preserved_over_uneven_tasks_while_putting(app, names):
    rng = random.Random(20260101)
    durations = [rng.uniform(0, 0.02) for _ in range(200)]

    async def main() -> tuple[list[Any], int]:
        stream = AsyncOrderedResultStream(app, names(), window=32)

        async def produce() -> None:
            async with stream:  # closes the stream at the end
                for i, seconds in enumerate(durations):
                    await stream.put(sleep_echo, i, seconds)

        producing = asyncio.ensure_future(produce())
        results = await consume(stream)
        await producing
        return results, stream.peak_out_of_order

    results, peak = run(main())
    assert results == list(range(200))
    # Outcomes really finished out of order on the 4 worker processes.
    assert peak > 0


def test_markers_come_out_at_their_place_between_tasks(app, names):
    async def main() -> list[Any]:
        stream = AsyncOrderedResultStream(app, names(), window=16)
        assert await stream.put({"chapter": 1}) == 0
        await stream.put(sleep_echo, "slow", 0.05)
        await stream.put(42)
        await stream.put(echo, "fast")
        await stream.put(None)
        await stream.close()
        return await consume(stream)

    assert run(main()) == [{"chapter": 1}, "slow", 42, "fast", None]


def test_a_failed_task_raises_at_its_position_and_the_stream_goes_on(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        await stream.put(echo, "a")
        failed = await stream.put(fail, "boom")
        await stream.put(echo, "b")
        await stream.put(echo, "c")
        await stream.close()

        assert await stream.get(timeout=30) == "a"
        with pytest.raises(CustomError, match="boom") as info:
            await stream.get(timeout=30)
        error = info.value
        assert type(error) is CustomError  # its own class, rebuilt here
        assert (error.seq, error.stream) == (failed, stream.name)
        assert "raise CustomError(message)" in error.stack_trace
        assert isinstance(error.__cause__, RemoteTraceback)
        assert await stream.get(timeout=30) == "b"
        assert await consume(stream) == ["c"]
        with pytest.raises(StreamExhausted):
            await stream.get(timeout=5)

    run(main())


def test_async_for_goes_on_after_a_failure_with_another_loop(app, names):
    async def main() -> list[Any]:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        for item in (0, "in the middle", 2):
            await stream.put(fail if item == "in the middle" else echo, item)
        await stream.close()
        seen: list[Any] = []
        with pytest.raises(CustomError, match="in the middle"):
            await collect(stream, seen)
        await collect(stream, seen)
        return seen

    assert run(main()) == [0, 2]


# -- timeouts and the window --------------------------------------------------------


def test_get_timeout_raises_stream_empty_and_loses_nothing(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        with pytest.raises(StreamEmpty) as info:
            await stream.get(timeout=0.2)
        assert isinstance(info.value, queue.Empty)
        assert info.value.seq == 0
        with pytest.raises(StreamEmpty):
            await stream.get(timeout=0)
        await stream.put("marker")
        assert await stream.get(timeout=5) == "marker"

    run(main())


def test_put_timeout_on_a_full_window_raises_stream_full_and_claims_nothing(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=2)
        await stream.put("a")
        await stream.put("b")
        with pytest.raises(StreamFull, match="window stayed full") as info:
            await stream.put("c", timeout=0.2)
        assert isinstance(info.value, queue.Full)
        with pytest.raises(StreamFull):
            await stream.put(echo, "task", timeout=0)
        assert (await stream.stats()).claimed == 2
        assert await stream.get(timeout=5) == "a"
        # The same task gets and puts: the put acknowledges the get first.
        assert await stream.put("c", timeout=5) == 2
        await stream.close()
        assert await consume(stream) == ["b", "c"]

    run(main())


def test_the_window_holds_a_put_until_the_consumer_takes_an_outcome(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=2)
        consumer = AsyncOrderedResultStream(app, stream.name, create=False)
        await stream.put(echo, 0)
        await stream.put(echo, 1)
        blocked = asyncio.ensure_future(stream.put(echo, 2))
        done, _ = await asyncio.wait({blocked}, timeout=0.3)
        assert not done  # the window is full: nobody consumed
        assert (await stream.stats()).claimed == 2
        assert await consumer.get(timeout=30) == 0
        await consumer.ack()  # frees a place: Redis wakes the blocked put
        assert await asyncio.wait_for(blocked, 30) == 2
        await stream.close()
        assert await consume(consumer) == [1, 2]

    run(main())


def test_put_after_close_is_refused(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        await stream.put(echo, 1)
        await stream.close()
        with pytest.raises(StreamClosedError, match="after close"):
            await stream.put(echo, 2)
        other = AsyncOrderedResultStream(app, stream.name)
        with pytest.raises(StreamClosedError, match="which is closed"):
            await other.put("marker")
        assert await consume(stream) == [1]

    run(main())


@pytest.mark.parametrize("held", ["aclosing", "aiter"])
def test_a_held_iterator_goes_on_after_a_failed_task(app, names, held):
    # As the threaded iter(stream), and as async for again: an iterator held
    # across a failed task's exception hands out the outcomes after it.
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        for x in [1, 0, 2, 4]:
            await stream.put(inverse_or_fail, x)
        await stream.close()
        async with contextlib.AsyncExitStack() as stack:
            outcomes = aiter(stream)
            if held == "aclosing":
                outcomes = await stack.enter_async_context(contextlib.aclosing(outcomes))
            assert await anext(outcomes) == 1.0
            with pytest.raises(CustomError, match="no inverse of 0"):
                await anext(outcomes)
            assert [value async for value in outcomes] == [0.5, 0.25]
            with pytest.raises(StopAsyncIteration):
                await anext(outcomes)

    run(main())


def test_async_for_again_after_a_failed_task_keeps_the_consumer_lease(app, names, redis_client):
    # The loop the exception left is garbage: collecting it must not give the
    # stream away (acknowledge, release the lease) under a consumer still at it.
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        for x in [1, 0, 2]:
            await stream.put(inverse_or_fail, x)
        await stream.close()
        seen: list[float] = []

        async def loop() -> None:
            async for value in stream:
                seen.append(value)

        with pytest.raises(CustomError):
            await loop()
        gc.collect()
        await asyncio.sleep(0)  # a callback the collection scheduled runs now
        await asyncio.gather(*list(stream._background))
        lease = redis_client.hgetall(StreamKeys(stream.name).consumer)
        seconds, micros = redis_client.time()
        assert int(lease[b"until"]) > seconds * 1000 + micros // 1000, lease
        await loop()
        assert seen == [1.0, 0.5]

    run(main())


def test_a_held_iterator_survives_a_timeout_around_it(app, names, redis_url, open_gate):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        key = open_gate.key()
        await stream.put(gate, redis_url, key, "held")
        outcomes = aiter(stream)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(outcomes), 0.2)
        open_gate(key)
        assert await anext(outcomes) == "held"

    run(main())


# -- closing with an error ------------------------------------------------------------


def test_async_with_closes_the_stream_with_the_exception_that_left_it(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)

        async def produce_and_break() -> None:
            async with stream:
                await stream.put(echo, 1)
                raise RuntimeError("producer broke")

        with pytest.raises(RuntimeError, match="producer broke"):
            await produce_and_break()
        assert (await stream.stats()).closed
        assert await stream.get(timeout=30) == 1
        with pytest.raises(ProducerFailed, match="RuntimeError: producer broke") as failed:
            await stream.get(timeout=5)
        assert failed.value.exc_type == "RuntimeError"
        assert 'raise RuntimeError("producer broke")' in failed.value.stack_trace
        with pytest.raises(ProducerFailed):  # and again: the stream stays failed
            await consume(stream)
        await stream.join(timeout=5)
        assert not await stream.is_alive()

    run(main())


def test_stats_does_not_wait_for_a_get_waiting_on_the_same_handle(app, names, redis_url, open_gate):
    # A page's progress task asks for stats() while its consumer task waits in
    # get() for a held outcome: as the threaded stats(), it must not wait for it.
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        key = open_gate.key()
        await stream.put(echo, "first")
        await stream.put(gate, redis_url, key, "held")
        assert await stream.get(timeout=30) == "first"
        waiting = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)  # it starts, and holds the consumer while it waits
        stats = await asyncio.wait_for(stream.stats(), 30)
        assert (stats.claimed, waiting.done()) == (2, False)
        open_gate(key)
        assert await waiting == "held"

    run(main())


def test_a_get_behind_another_tasks_get_keeps_its_timeout(app, names, redis_url, open_gate):
    # A second task's get(timeout=...) on the same handle raises within its
    # timeout, while the first task's get() waits on for the held outcome.
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        key = open_gate.key()
        await stream.put(gate, redis_url, key, "held")
        waiting = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)  # it starts, and holds the consumer while it waits
        with pytest.raises(StreamEmpty, match=r"another get\(\) on this handle"):
            await stream.get(timeout=0.2)
        assert not waiting.done()
        open_gate(key)
        assert await waiting == "held"
        await stream.put(echo, "behind")
        assert await stream.get(timeout=30) == "behind"  # nothing lost, nothing stalled

    run(main())


# -- resuming by name, cancellation ----------------------------------------------------


def test_attaching_by_name_to_a_stream_that_does_not_exist_raises_at_open(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), create=False)
        with pytest.raises(StreamNotFound):
            await stream.open()
        with pytest.raises(StreamNotFound):
            await stream.get(timeout=0)

    run(main())


def test_a_consumer_cancelled_while_waiting_hands_over_exactly_where_it_was(
    app, names, redis_url, open_gate
):
    # Given a stream whose outcome 20 waits on a gate, and a consumer that
    # acknowledges only every 32 outcomes: without the acknowledgement on
    # cancellation a successor would get its first 20 again.
    async def main() -> tuple[list[Any], list[Any]]:
        stream = AsyncOrderedResultStream(app, names(), window=64, ack_every=32)
        key = open_gate.key()
        values = list(range(40))
        for value in values:
            if value == 20:
                await stream.put(gate, redis_url, key, value)
            else:
                await stream.put(echo, value)
        await stream.close()
        first: list[Any] = []
        twenty = asyncio.Event()

        async def follow() -> None:
            async for outcome in stream:
                first.append(outcome)
                if len(first) == 20:
                    twenty.set()

        # When the consumer, waiting for outcome 20, is cancelled (a web client gone)
        following = asyncio.ensure_future(follow())
        await asyncio.wait_for(twenty.wait(), 30)
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following
        open_gate(key)
        # Then another consumer resumes by name at once after what was handed out
        resumed = AsyncOrderedResultStream(app, stream.name, create=False)
        second = [await resumed.get(timeout=5)]
        second += await consume(resumed)
        return first, second

    first, second = run(main())
    assert first == list(range(20))
    assert second == list(range(20, 40))


def test_a_consumer_cancelled_in_its_loop_body_hands_over_exactly_where_it_was(app, names):
    # The outcome in hand when the body is cancelled was handed out: it is
    # acknowledged, so the successor starts after it.
    async def main() -> tuple[list[Any], list[Any]]:
        stream = AsyncOrderedResultStream(app, names(), window=64, ack_every=32)
        for value in range(30):
            await stream.put(echo, value)
        await stream.close()
        first: list[Any] = []
        holding = asyncio.Event()

        async def follow() -> None:
            async for outcome in stream:
                first.append(outcome)
                if len(first) == 10:
                    holding.set()
                    await asyncio.Event().wait()  # busy with outcome 9 when cancelled

        following = asyncio.ensure_future(follow())
        await asyncio.wait_for(holding.wait(), 30)
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following
        resumed = AsyncOrderedResultStream(app, stream.name, create=False)
        # The first consumer's iteration is closed as it is collected, which
        # releases its lease; until then this one waits as its standby.
        second = [await resumed.get(timeout=30)]
        second += await consume(resumed)
        return first, second

    first, second = run(main())
    assert first == list(range(10))
    assert second == list(range(10, 30))


def test_a_consumer_cancelled_while_it_takes_the_lease_hands_it_back(app, names, redis_client):
    # Given a consumer whose writes wait for a replica that does not exist:
    # the round trip that takes the consumer lease is done in Redis, but its
    # reply stays out (WAIT) while the test cancels the consumer
    name = names()
    lease = StreamKeys(name).consumer
    settings = ("ordered_wait_replicas", "ordered_wait_timeout")
    saved = {key: app.conf.get(key) for key in settings}

    async def main() -> Any:
        producer = AsyncOrderedResultStream(app, name, window=4)
        await producer.put("first")
        app.conf.update(ordered_wait_replicas=1, ordered_wait_timeout=3)
        try:
            consumer = AsyncOrderedResultStream(app, name, create=False)
            await consumer.open()
        finally:
            app.conf.update(saved)
        taking = asyncio.ensure_future(consumer.get())
        await asyncio.to_thread(
            wait_until, lambda: redis_client.hget(lease, "owner"), "the lease taken in Redis"
        )
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        # Then it hands the lease back: a successor goes on at once, not once
        # the lease lapses (30 s)
        successor = AsyncOrderedResultStream(app, name, create=False)
        return await successor.get(timeout=10)

    assert run(main()) == "first"


def test_a_put_cancelled_while_the_window_is_full_claims_nothing(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=1)
        await stream.put("first")
        blocked = asyncio.ensure_future(stream.put("never"))
        done, _ = await asyncio.wait({blocked}, timeout=0.3)
        assert not done
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert await stream.get(timeout=5) == "first"
        assert await stream.put("second", timeout=5) == 1  # the cancelled put took no number
        await stream.close()
        assert await consume(stream) == ["second"]

    run(main())


def test_a_put_cancelled_while_another_put_claims_claims_nothing(app):
    # Given a private Redis whose writes the test pauses, so that one put's
    # claim is held in Redis while a second put on the same handle waits its turn
    with RedisServer() as server:
        control = redis.Redis.from_url(server.url)

        async def main() -> int:
            stream = AsyncOrderedResultStream(app, window=8, redis_url=server.url)
            await stream.open()
            control.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            try:
                first = asyncio.ensure_future(stream.put("first"))
                second = asyncio.ensure_future(stream.put("second"))
                for _ in range(10):  # both start: the first claims, the second waits for it
                    await asyncio.sleep(0)
                # When the waiting put is cancelled
                second.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await second
            finally:
                control.execute_command("CLIENT", "UNPAUSE")
            assert await first == 0
            # Then it took no number: the next put gets the one after the first
            number = await stream.put("third")
            await stream.delete()
            return number

        try:
            assert run(main()) == 1
        finally:
            control.close()


def test_raising_the_window_wakes_a_blocked_put(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=1)
        await stream.put("first")
        blocked = asyncio.ensure_future(stream.put("second"))
        done, _ = await asyncio.wait({blocked}, timeout=0.3)
        assert not done
        await AsyncOrderedResultStream(app, stream.name, create=False).set_window(2)
        assert await asyncio.wait_for(blocked, 30) == 1
        assert (await stream.stats()).window == 2
        await stream.close()
        assert await consume(stream) == ["first", "second"]

    run(main())


def test_join_waits_until_every_outcome_is_in(app, names, redis_url, open_gate):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        key = open_gate.key()
        await stream.put(gate, redis_url, key, "gated")
        await stream.put(echo, "quick")
        await stream.close()
        await stream.join(timeout=0.2)  # returns, though one outcome is missing
        assert await stream.is_alive()
        joining = asyncio.ensure_future(stream.join(timeout=30))
        open_gate(key)
        await joining
        assert not await stream.is_alive()
        assert (await stream.stats()).buffered == 2  # join() consumes nothing
        assert await consume(stream) == ["gated", "quick"]

    run(main())


def test_delete_ends_a_waiting_consumer_with_stream_deleted(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        await stream.put("only")
        assert await stream.get(timeout=5) == "only"
        waiting = asyncio.ensure_future(stream.get(timeout=30))
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done
        await AsyncOrderedResultStream(app, stream.name, create=False).delete()
        with pytest.raises(StreamDeleted):
            await waiting
        with pytest.raises(StreamDeleted):
            await stream.put("more")

    run(main())


def test_a_second_consumer_waits_as_standby_within_its_timeout(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        await stream.put("a")
        await stream.put("b")
        assert await stream.get(timeout=5) == "a"
        standby = AsyncOrderedResultStream(app, stream.name, create=False)
        with pytest.raises(StreamEmpty, match="holds its consumer lease"):
            await standby.get(timeout=0.3)
        await stream.release()  # hands the stream over at once
        assert await standby.get(timeout=5) == "b"

    run(main())


def test_bad_arguments_are_refused_at_the_call_that_passed_them(app, names):
    with pytest.raises(TypeError, match=r"takes no client=.*pass redis_url="):
        AsyncOrderedResultStream(app, client=redis.Redis())
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['windw'\]"):
        AsyncOrderedResultStream(app, windw=4)
    with pytest.raises(ValueError, match="name"):
        AsyncOrderedResultStream(app, "no spaces allowed")

    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=0)
        with pytest.raises(ValueError, match="window"):
            await stream.open()  # checked as OrderedResultStream checks it
        ok = AsyncOrderedResultStream(app, names(), window=4)
        with pytest.raises(ValueError, match="timeout"):
            await ok.get(timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            await ok.put("m", timeout="soon")

    run(main())


# -- amap --------------------------------------------------------------------------------


def test_amap_over_sync_iterables_and_a_mix_with_an_async_one(app, names):
    async def numbers() -> AsyncIterator[int]:
        for n in range(100, 130):
            yield n

    async def main() -> tuple[list[Any], list[Any]]:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        single = [value async for value in stream.amap(echo, range(20))]
        mixed_stream = AsyncOrderedResultStream(app, names(), window=4)
        # Several iterables: task(*items) over them zipped, the shortest ending it.
        outcomes = mixed_stream.amap(plain_add, range(1000), numbers())
        return single, [value async for value in outcomes]

    single, mixed = run(main())
    assert single == list(range(20))
    assert mixed == [i + 100 + i for i in range(30)]


def test_amap_over_an_async_iterable_is_lazy_and_closes_the_stream(app, names):
    async def main() -> tuple[list[Any], int, bool]:
        stream = AsyncOrderedResultStream(app, names(), window=4)
        read: list[int] = []

        async def items() -> AsyncIterator[int]:
            for i in range(40):
                read.append(i)
                yield i

        outcomes = stream.amap(echo, items())
        got = [await outcomes.__anext__() for _ in range(3)]
        # Read only as far as the window lets it run ahead of the consumer.
        ahead = len(read)
        got += [value async for value in outcomes]
        return got, ahead, (await stream.stats()).closed

    got, ahead, closed = run(main())
    assert got == list(range(40))
    assert ahead <= 3 + 4 + 1
    assert closed


def test_amap_raises_a_failed_item_at_its_place_and_goes_on(app, names):
    async def main() -> list[Any]:
        stream = AsyncOrderedResultStream(app, names(), window=8)
        outcomes = stream.amap(plain_add, [1, "x", 3], [10, 20, 30])
        seen: list[Any] = [await outcomes.__anext__()]
        with pytest.raises(TypeError):  # "x" + 20 fails on the worker
            await outcomes.__anext__()
        seen += [value async for value in outcomes]
        return seen

    assert run(main()) == [11, 33]


def test_amap_whose_input_fails_ends_with_that_error_and_fails_the_stream(app, names):
    async def main() -> None:
        stream = AsyncOrderedResultStream(app, names(), window=8)

        async def items() -> AsyncIterator[int]:
            yield 1
            yield 2
            raise LookupError("the input broke")

        seen: list[Any] = []
        with pytest.raises(LookupError, match="the input broke"):
            await collect(stream.amap(echo, items()), seen)
        assert seen == [1, 2]
        # Another consumer of the stream sees the producer's failure, not an end.
        other = AsyncOrderedResultStream(app, stream.name, create=False, takeover=True)
        with pytest.raises(ProducerFailed, match="LookupError: the input broke"):
            await other.get(timeout=5)

    run(main())


def test_amap_aclose_stops_reading_and_closes_the_stream(app, names):
    async def main() -> tuple[list[Any], int, bool]:
        stream = AsyncOrderedResultStream(app, names(), window=2)
        read: list[int] = []
        outcomes = stream.amap(echo, endless(read))
        got = [await outcomes.__anext__(), await outcomes.__anext__()]
        await outcomes.aclose()
        with pytest.raises(StopAsyncIteration):
            await outcomes.__anext__()
        stats = await stream.stats()
        return got, len(read), stats.closed

    got, read, closed = run(main())
    assert got == [0, 1]
    assert read <= 2 + 2 + 1  # the window bounds what was read ahead
    assert closed


def test_an_amap_left_before_its_end_stops_reading_and_closes_the_stream(app, names):
    # An async for over amap() left by break (or by the consuming task being
    # cancelled), without aclose(): the map must not go on feeding the stream.
    async def main() -> tuple[list[Any], int, int]:
        stream = AsyncOrderedResultStream(app, names(), window=2)
        read: list[int] = []
        got: list[Any] = []
        async for value in stream.amap(echo, endless(read)):
            got.append(value)
            if len(got) == 2:
                break
        # The map, collected, closed the stream: join() returns once every
        # outcome put is in, and nothing more is read or put.
        await stream.join(timeout=60)
        assert not await stream.is_alive()
        stats = await stream.stats()
        assert stats.closed
        return got, len(read), stats.claimed

    got, read, claimed = run(main())
    assert got == [0, 1]
    assert read <= 2 + 2 + 1  # the window bounds what was read ahead
    assert claimed <= read


def test_an_amap_whose_stream_another_handle_closes_raises_stream_closed_error(app, names):
    # As the threaded map's next() does: input left unput is not a normal end.
    async def main() -> list[Any]:
        stream = AsyncOrderedResultStream(app, names(), window=2)
        outcomes = stream.amap(echo, endless([]))
        got = [await outcomes.__anext__()]
        await AsyncOrderedResultStream(app, stream.name, create=False).close()
        with pytest.raises(StreamClosedError, match="which is closed"):
            await collect(outcomes, got)
        return got

    got = run(main())
    assert got == list(range(len(got)))


# -- one consumer at a time -------------------------------------------------------------


def test_takeover_fences_across_threaded_and_async_consumers(app, names):
    # prefetch=1: each get() is a round trip, where a fenced consumer learns it.
    name = names()
    threaded = OrderedResultStream(app, name, window=16, prefetch=1, ack_every=1)
    for value in range(6):
        threaded.put(echo, value)
    threaded.close()
    assert threaded.get(timeout=30) == 0
    threaded.ack()

    async def take_it_over() -> list[Any]:
        stream = AsyncOrderedResultStream(app, name, create=False, takeover=True, prefetch=1)
        taken = [await stream.get(timeout=30), await stream.get(timeout=30)]
        await stream.ack()
        return taken

    # An asyncio consumer takes over where the threaded one left off, and
    # the threaded one is fenced.
    assert run(take_it_over()) == [1, 2]
    with pytest.raises(ConsumerFenced):
        threaded.get(timeout=5)

    async def follow_then_get_fenced(ready: threading.Event, go: threading.Event) -> Any:
        stream = AsyncOrderedResultStream(app, name, create=False, takeover=True, prefetch=1)
        assert await stream.get(timeout=30) == 3
        await stream.ack()
        ready.set()
        await asyncio.to_thread(go.wait, 30)
        return await stream.get(timeout=5)

    # And the other way round: a threaded take_over() fences the asyncio one.
    ready, go = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        following = pool.submit(run, follow_then_get_fenced(ready, go))
        assert ready.wait(30)
        threaded.take_over()
        go.set()
        with pytest.raises(ConsumerFenced):
            following.result(timeout=60)
    assert list(threaded) == [4, 5]


# -- many streams, one thread -------------------------------------------------------------


def test_a_hundred_streams_on_one_loop_add_no_thread_per_stream(app, names):
    # The loop's worker threads (for Celery's sends) are capped at 4 here: if
    # a stream, or any of its waits, took a thread of its own, 100 of them
    # waiting at once would show.
    streams_count, executor_threads = 100, 4
    before = threading.active_count()

    async def main() -> tuple[list[list[Any]], int]:
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(executor_threads)
        )
        streams = [AsyncOrderedResultStream(app, names(), window=4) for _ in range(streams_count)]
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.005)

        async def one(index: int, stream: AsyncOrderedResultStream) -> list[Any]:
            following = asyncio.ensure_future(consume(stream))  # waits on Redis at once
            await stream.put(echo, index)
            await stream.put(sleep_echo, index, 0.05)
            await stream.put(f"end {index}")
            await stream.close()
            return await following

        sampler = asyncio.ensure_future(sample())
        results = await asyncio.gather(*(one(i, s) for i, s in enumerate(streams)))
        sampling = False
        await sampler
        return results, peak

    results, peak = run(main())
    assert results == [[i, i, f"end {i}"] for i in range(streams_count)]
    assert peak <= before + executor_threads


# -- every topology -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aio_sentinel() -> Iterator[LocalSentinel]:
    """A primary, one replica and one Sentinel."""
    require_tool("redis-server", "it runs the primary, the replica and the Sentinel")
    with LocalSentinel(replicas=1) as started:
        yield started


@pytest.mark.topology
@pytest.mark.parametrize("topology", ["cluster", "sentinel", "sentinel-wait"])
def test_the_asyncio_stream_on_a_cluster_and_under_sentinel(request, topology):
    # Given the streams' Redis of the topology, and a worker publishing to it
    settings: dict[str, Any] = {}
    if topology == "cluster":
        store = request.getfixturevalue("redis_cluster").url
    else:
        store = request.getfixturevalue("aio_sentinel").url
        if topology == "sentinel-wait":  # every write waits for the replica
            settings.update(ordered_wait_replicas=1, ordered_wait_timeout=30)
    queue = f"co-aio-{topology}-{uuid.uuid4().hex[:6]}"
    app = topology_app(store, queue, **settings)

    # When three asyncio streams (on different cluster nodes, likely) run on one loop
    async def one(index: int) -> list[Any]:
        stream = AsyncOrderedResultStream(app, f"aio-topo-{uuid.uuid4().hex}", window=3)
        try:

            async def produce() -> None:
                async with stream:
                    for value in range(8):
                        await stream.put(sleep_echo, (index, value), 0.002 * (value % 3))
                    await stream.put({"end": index})

            producing = asyncio.ensure_future(produce())
            outcomes = [await stream.get(timeout=60)]  # a get that waits on the topology
            outcomes += await consume(stream)
            await producing
            return outcomes
        finally:
            await stream.delete()

    with topology_worker(store, queue, concurrency=2, **settings) as worker:
        worker.wait_ready(app)
        results = run(gather(*(one(i) for i in range(3))))
    redis.Redis.from_url(socket_url(app.conf.broker_url)).delete(queue)
    app.close()

    # Then each comes out whole and in order
    for index, outcomes in enumerate(results):
        assert outcomes == [[index, value] for value in range(8)] + [{"end": index}]


def _closed_under_their_next_write(connections: list[Any]) -> list[int]:
    """Make each connection's next write meet what another task's disconnect leaves.

    redis-py's asyncio cluster client disconnects a node's free connections
    after a connection error, and another task may just have taken one of
    them: its command passed the connection check, and then finds no writer
    (redis/redis-py#3546). Here the disconnect comes at the same point, after
    the health check that every command's write awaits. Returns a list that
    counts the disconnects made.
    """
    made: list[int] = []
    for connection in connections:

        async def then_closed(connection: Any = connection) -> None:
            del connection.check_health  # once: the class's method again
            await connection.check_health()
            await connection.disconnect()
            made.append(1)

        connection.check_health = then_closed
    return made


def _a_write_after_another_task_closed_its_connection(
    url: str, connections: Callable[[Any, str], list[Any]]
) -> tuple[int, Any, Any]:
    """Store a key, close ``connections(client, key)`` under their next write
    (see :func:`_closed_under_their_next_write`), then store and read the key
    again: (disconnects made, the second store's reply, the value read)."""
    key = f"co-test-closed-{uuid.uuid4().hex}"

    async def main() -> tuple[int, Any, Any]:
        client = async_client_for(url)
        await client.set(key, "before", ex=60)
        made = _closed_under_their_next_write(connections(client, key))
        stored = await client.set(key, "after", ex=60)
        value = await client.get(key)
        await client.delete(key)
        return len(made), stored, value

    return run(main())


def test_a_write_on_a_connection_another_task_closed_is_retried(redis_url) -> None:
    # Given an asyncio client of the streams' Redis whose connection another
    # task closes just before this one writes through it
    def pooled(client: Any, key: str) -> list[Any]:
        return list(client.connection_pool._available_connections)

    # When a command goes out through it, then it is retried on a new
    # connection: no AttributeError about None
    assert _a_write_after_another_task_closed_its_connection(redis_url, pooled) == (
        1,
        True,
        b"after",
    )


@pytest.mark.topology
def test_a_write_on_a_cluster_connection_another_task_closed_is_retried(redis_cluster) -> None:
    # Given an asyncio client of a Redis Cluster whose connection to the node
    # of a key another task closes just before this one writes through it (the
    # race a three-stream run on one loop once met)
    def of_the_node(client: Any, key: str) -> list[Any]:
        return list(client.get_node_from_key(key)._free)

    # When a command goes out through it, then it is retried
    assert _a_write_after_another_task_closed_its_connection(redis_cluster.url, of_the_node) == (
        1,
        True,
        b"after",
    )


@pytest.mark.topology
def test_a_consumer_waiting_on_the_sentinel_primary_follows_a_failover() -> None:
    # Given a stream on a Sentinel-managed primary, and a consumer waiting
    # (BLPOP, in flight on the primary) for the next outcome
    require_tool("redis-server", "it runs the primary, the replica and the Sentinel")
    with LocalSentinel(replicas=1) as sentinel:
        app = topology_app(sentinel.url, "unused", ordered_redis_retry_for=30)
        primary = sentinel.primary().client(socket_timeout=1)

        def consumer_waiting() -> bool:
            return any(client.get("cmd") == "blpop" for client in primary.client_list())

        async def main() -> list[Any]:
            stream = AsyncOrderedResultStream(app, f"aio-failover-{uuid.uuid4().hex}", window=4)
            try:
                await stream.put({"before": 0})
                seen = [await stream.get(timeout=10)]
                waiting = asyncio.ensure_future(stream.get(timeout=60))
                await asyncio.to_thread(wait_until, consumer_waiting, "the consumer in BLPOP")
                assert primary.wait(1, 10_000) == 1  # the replica has every write so far
                # When the primary dies under it and a replica is promoted
                old = await asyncio.to_thread(sentinel.kill_primary)
                await asyncio.to_thread(sentinel.wait_failover, old)
                await stream.put({"after": 1})
                # Then the waiting get finds the new primary (not the dead one's
                # address again until ordered_redis_retry_for runs out)
                seen.append(await asyncio.wait_for(waiting, 20))
                return seen
            finally:
                with contextlib.suppress(Exception):
                    await stream.delete()

        assert run(main()) == [{"before": 0}, {"after": 1}]
