"""The adaptive default window: it grows while it holds work back, shrinks while
outcomes wait for the consumer, and a window the user sets stays fixed.

Real Redis and real workers; each step is driven by what the stream holds
(a gated head task, markers), never by timing.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import pytest
import redis

from celery_ordered import StreamEmpty, StreamFull
from celery_ordered.config import ADAPTIVE_WINDOW_CEILING, default_window
from tests.apps.tasks import gate
from tests.support.cli import run_ordered
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def gate_of(redis_url: str, redis_client: redis.Redis) -> Any:
    """Put a task that finishes when the test opens its gate; the gate opens at the end."""
    keys: list[str] = []

    def put(stream: Any, value: Any) -> str:
        key = f"co-test-gate:{uuid.uuid4().hex}"
        keys.append(key)
        stream.put(gate, redis_url, key, value)
        return key

    yield put
    for key in keys:
        redis_client.rpush(key, 1)
        redis_client.expire(key, 10)


def _fill_behind_a_gated_head(stream: Any, gate_of: Any, window: int) -> str:
    """Number 0 a gated task, then markers up to ``window``: the window is full."""
    key = gate_of(stream, "head")
    for i in range(1, window):
        stream.put(i, timeout=5)
    with pytest.raises(StreamFull):
        stream.put("no room", timeout=0)
    return key


def _assert_doubled_by_the_consumer(stream: Any, floor: int, *, waiting_for: int) -> None:
    """The window is twice ``floor``, grown by a consumer that waited for ``waiting_for``."""
    stats = stream.stats()
    assert stats.window == 2 * floor
    assert stats.window_why == (
        f"grew to {2 * floor}: the consumer waited for number {waiting_for} with the window full"
    )


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default window's floor is 10 x the CPU count: make it 20 on any machine."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


@pytest.mark.usefixtures("two_cpus")
def test_the_default_window_grows_when_the_consumer_waits_with_it_full(
    app: Any, make_stream: Any, gate_of: Any, redis_client: redis.Redis
) -> None:
    # Given a stream with the default window, full of tasks still running
    floor = default_window(app)
    assert floor == 20
    stream = make_stream()
    assert stream.stats().window == floor
    assert stream.stats().window_why == f"starts at {floor} and adapts up to 1024"
    gates = [gate_of(stream, i) for i in range(floor)]
    with pytest.raises(StreamFull):
        stream.put("no room", timeout=0)

    # When the consumer asks for the head and finds it missing
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0.1)

    # Then the window doubled once, and says why, in stats() and in `ordered inspect`
    _assert_doubled_by_the_consumer(stream, floor, waiting_for=0)
    inspected = run_ordered("inspect", stream.name)
    assert f"window        {2 * floor} (grew to {2 * floor}: " in inspected.output
    # And producers may put that much more, and no more, while those tasks run
    gates += [gate_of(stream, i) for i in range(floor, 2 * floor)]
    with pytest.raises(StreamFull):
        stream.put("no room", timeout=0)

    # When every place holds an outcome waiting for the consumer (all the tasks finish)
    for key in gates:
        redis_client.rpush(key, 1)
    wait_until(lambda: stream.stats().buffered == 2 * floor, "every outcome")
    assert stream.get(timeout=30) == 0

    # Then the window shrank by a quarter: the consumer, not the window, is the limit
    stats_after = stream.stats()
    shrunk = 2 * floor - (2 * floor) // 4
    assert stats_after.window == shrunk
    assert stats_after.window_why == (
        f"shrank to {shrunk}: {2 * floor} outcomes waited for the consumer"
    )
    # And nothing was lost or reordered on the way
    stream.close()
    assert list(stream) == list(range(1, 2 * floor))


@pytest.mark.usefixtures("two_cpus")
def test_the_window_grows_when_the_consumer_waits_right_after_handing_out_outcomes(
    make_stream: Any, gate_of: Any, redis_client: redis.Redis
) -> None:
    # Given a default window full: half of it outcomes ready (markers), half
    # tasks still running
    stream = make_stream()
    floor = stream.window
    half = floor // 2
    for i in range(half):
        stream.put(i, timeout=0)
    gates = [gate_of(stream, f"task {i}") for i in range(half, floor)]
    with pytest.raises(StreamFull):
        stream.put("no room", timeout=0)

    # When the consumer hands out the ready half, then asks for the next one
    # (the read that acknowledges the half it handed out finds the head missing)
    assert [stream.get(timeout=5) for _ in range(half)] == list(range(half))
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0.1)

    # Then the window doubled: it was full until that very read, so it held work
    # back, even though the read itself freed half of it
    _assert_doubled_by_the_consumer(stream, floor, waiting_for=half)
    # And everything still comes out in order
    for key in gates:
        redis_client.rpush(key, 1)
    stream.close()
    assert list(stream) == [f"task {i}" for i in range(half, floor)]


@pytest.mark.usefixtures("two_cpus")
def test_map_fills_the_room_its_first_wait_makes_before_waiting(
    make_stream: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given map() over more tasks than the default window, every task held
    # running until the test opens its gate
    stream = make_stream()
    floor = stream.window
    keys = [f"co-test-gate:{uuid.uuid4().hex}" for _ in range(3 * floor)]
    results: list[Any] = []
    try:
        items = stream.starmap(gate, [(redis_url, key, i) for i, key in enumerate(keys)])
        reader = threading.Thread(target=lambda: results.extend(items), daemon=True)

        # When it sends the first window and waits for the first outcome
        reader.start()

        # Then its read before that wait, finding the head missing with the
        # window full, doubled the window, and it sent that much more first:
        # a wide fleet gets twice the floor's tasks from the start (the wait
        # itself may grow the window again, for the next fill)
        wait_until(lambda: stream.stats().claimed == 2 * floor, "twice the floor claimed")
        assert stream.stats().window >= 2 * floor
    finally:
        for key in keys:
            redis_client.rpush(key, 1)
            redis_client.expire(key, 10)
    # And once the tasks finish, every result comes out, in order
    reader.join(timeout=60)
    assert results == list(range(3 * floor))


@pytest.mark.usefixtures("two_cpus")
def test_the_default_window_grows_when_a_producer_finds_it_full_behind_a_missing_head(
    make_stream: Any, gate_of: Any, redis_client: redis.Redis
) -> None:
    # Given a stream with the default window: its head still running, and every
    # other place holding an outcome that finished behind it
    stream = make_stream()
    floor = stream.window
    key = gate_of(stream, "head")
    for i in range(1, floor):
        stream.put(i, timeout=0)

    # When its producer puts one more (the workers that finished could run it)
    stream.put("one more", timeout=0)

    # Then that put went through at once: the window doubled, and says why
    stats = stream.stats()
    assert stats.window == 2 * floor
    assert stats.window_why == (
        f"grew to {2 * floor}: number 0 held the window full with {floor - 1} outcomes "
        "waiting behind it"
    )
    # And once the head finishes, everything comes out in order
    redis_client.rpush(key, 1)
    stream.close()
    assert list(stream) == ["head", *range(1, floor), "one more"]


def test_a_window_the_user_sets_stays_fixed(make_stream: Any, gate_of: Any) -> None:
    # Given streams whose window the user chose: at creation, and by set_window()
    chosen = make_stream(window=4)
    changed = make_stream()
    changed.set_window(4)
    for stream in (chosen, changed):
        assert stream.stats().window_why is None
        _fill_behind_a_gated_head(stream, gate_of, 4)
        # When the consumer waits with the window full
        with pytest.raises(StreamEmpty):
            stream.get(timeout=0.1)
        # Then the window is a hard bound: it stays as set
        stats = stream.stats()
        assert (stats.window, stats.window_why) == (4, None)
        with pytest.raises(StreamFull):
            stream.put("no room", timeout=0)
    assert "window        4 (fixed)" in run_ordered("inspect", chosen.name).output


def test_an_app_window_setting_is_fixed_too(app: Any, make_stream: Any, gate_of: Any) -> None:
    # Given an app that sets ordered_window
    app.conf.ordered_window = 3
    try:
        stream = make_stream()
    finally:
        app.conf.ordered_window = None
    _fill_behind_a_gated_head(stream, gate_of, 3)
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0.1)
    # Then it never adapts
    assert (stream.stats().window, stream.stats().window_why) == (3, None)


@pytest.mark.usefixtures("two_cpus")
def test_the_window_never_grows_past_its_ceiling(
    make_stream: Any, gate_of: Any, redis_client: redis.Redis
) -> None:
    # Given a default window already at its ceiling, full behind a running head
    stream = make_stream()
    key = gate_of(stream, "head")
    floor = stream.window
    while stream.window < ADAPTIVE_WINDOW_CEILING:
        # (each time the consumer finds the head missing with the window full)
        room = stream.window - stream.stats().claimed
        for i in range(room):
            stream.put(i, timeout=0)
        with pytest.raises(StreamEmpty):
            stream.get(timeout=0)
    assert stream.window == ADAPTIVE_WINDOW_CEILING > floor
    # When the consumer waits once more with the window full
    for i in range(stream.window - stream.stats().claimed):
        stream.put(i, timeout=0)
    with pytest.raises(StreamEmpty):
        stream.get(timeout=0)
    # Then it stays at the ceiling
    assert stream.window == ADAPTIVE_WINDOW_CEILING
    redis_client.rpush(key, 1)
