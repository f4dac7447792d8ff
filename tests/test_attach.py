"""Streams shared by name: producers and consumers in other processes and threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_ordered import (
    OrderedResultStream,
    StreamClosedError,
    StreamExhausted,
    StreamNotFound,
    StreamStateLost,
)
from celery_ordered.errors import StreamDeleted
from tests.apps.tasks import echo, fail, sleep_echo

#: A wait slice far beyond any deadline of the tests: a wait that ends in time
#: was ended by a wake-up from Redis, not by a poll.
NO_POLL = 3600.0

pytestmark = pytest.mark.usefixtures("worker")

ROOT = Path(__file__).resolve().parent.parent

# A producer process: attaches by name, optionally waits at a start line, puts
# `count` echo tasks tagged with its name, optionally closes the stream.
PRODUCER = """
import sys
from celery_ordered import OrderedResultStream
from tests.apps.celeryapp import app
from tests.apps.tasks import echo

name, tag, count, ready_key, go_key, close = sys.argv[1:7]
stream = OrderedResultStream(app, name)
if ready_key:
    stream.redis.rpush(ready_key, tag)
    if stream.redis.blpop([go_key], timeout=60) is None:
        sys.exit("no start signal")
for i in range(int(count)):
    stream.put(echo, [tag, i])
if close == "close":
    stream.close()
"""

# A consumer process: attaches by name and prints every outcome (errors as
# their class name and number) as JSON once the stream is exhausted.
CONSUMER = """
import json, sys
from celery_ordered import OrderedResultStream, StreamExhausted
from tests.apps.celeryapp import app
import tests.apps.tasks  # so the tests' exception classes can be rebuilt here

stream = OrderedResultStream(app, sys.argv[1])
out = []
while True:
    try:
        out.append(stream.get(timeout=60))
    except StreamExhausted:
        break
    except Exception as exc:
        out.append({"error": type(exc).__name__, "seq": exc.seq, "message": str(exc)})
print(json.dumps({"results": out, "window": stream.window}))
"""


@pytest.fixture
def spawn() -> Iterator[Any]:
    """Start Python child processes running code; any left are killed after."""
    children: list[subprocess.Popen[str]] = []

    def start(code: str, *args: Any) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate()


def finish(child: subprocess.Popen[str], timeout: float = 60) -> str:
    """Wait for a child; return its stdout, failing with its stderr if it failed."""
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err
    return out


def drain(stream: OrderedResultStream, timeout: float = 30) -> list[Any]:
    """Every remaining outcome until the stream is exhausted (never hangs)."""
    out = []
    while True:
        try:
            out.append(stream.get(timeout=timeout))
        except StreamExhausted:
            return out


@pytest.fixture
def temp_keys(redis_client: redis.Redis) -> Iterator[Any]:
    made: list[str] = []

    def make(kind: str) -> str:
        made.append(f"co-test-{kind}:{uuid.uuid4().hex}")
        return made[-1]

    yield make
    if made:
        redis_client.delete(*made)


def test_producer_in_another_process(make_stream, spawn):
    # Window 8 for 50 tasks: the child producer waits on this consumer.
    stream = make_stream(window=8)
    child = spawn(PRODUCER, stream.name, "child", 50, "", "", "close")
    results = drain(stream)
    finish(child)
    assert results == [["child", i] for i in range(50)]
    stats = stream.stats()
    assert (stats.claimed, stats.delivered, stats.closed) == (50, 50, True)


def test_consumer_in_another_process(make_stream, spawn):
    stream = make_stream(window=5)
    child = spawn(CONSUMER, stream.name)
    expected: list[Any] = []
    for i in range(30):
        if i % 10 == 5:
            seq = stream.put(fail, f"boom {i}")
            expected.append({"error": "CustomError", "seq": seq, "message": f"boom {i}"})
        elif i % 10 == 7:
            stream.put({"marker": i})
            expected.append({"marker": i})
        else:
            stream.put(sleep_echo, i, 0.001 * (i % 4))
            expected.append(i)
    stream.close()
    report = json.loads(finish(child))
    assert report["results"] == expected
    assert report["window"] == 5  # attaching with window=None kept the stream's
    assert stream.stats().delivered == 30


def test_a_consumer_hands_over_to_another_process_where_it_stopped(make_stream, spawn):
    stream = make_stream(window=40)
    for i in range(30):
        stream.put(echo, i)
    stream.close()
    assert [stream.get(timeout=30) for _ in range(10)] == list(range(10))
    stream.release()  # tell Redis how far this consumer got, and hand the stream on
    report = json.loads(finish(spawn(CONSUMER, stream.name)))
    assert report["results"] == list(range(10, 30))


def test_two_producer_processes_into_one_stream(make_stream, spawn, redis_client, temp_keys):
    per_producer = 60
    stream = make_stream(window=8)
    ready, go = temp_keys("ready"), temp_keys("go")
    children = [
        spawn(PRODUCER, stream.name, tag, per_producer, ready, go, "") for tag in ("A", "B")
    ]
    # Both at the start line before either puts, so they really overlap.
    for _ in children:
        assert redis_client.blpop([ready], timeout=60) is not None
    redis_client.rpush(go, 1, 1)

    results = [tuple(stream.get(timeout=30)) for _ in range(2 * per_producer)]
    for child in children:
        finish(child)
    stream.close()
    assert drain(stream) == []

    # The producers really overlapped: both had items in the first half.
    assert {t for t, _ in results[:per_producer]} == {"A", "B"}
    # Every item exactly once, each producer's in its own order.
    assert sorted(results) == sorted((t, i) for t in "AB" for i in range(per_producer))
    for tag in "AB":
        assert [i for t, i in results if t == tag] == list(range(per_producer))
    assert stream.stats().claimed == 2 * per_producer


def test_two_producer_threads_into_one_stream(make_stream):
    per_producer = 100
    stream = make_stream(window=8)
    start = threading.Barrier(2)

    def produce(tag: str) -> None:
        handle = OrderedResultStream(stream.app, stream.name)
        start.wait(timeout=30)
        for i in range(per_producer):
            handle.put(echo, [tag, i])

    with ThreadPoolExecutor(2) as pool:
        producing = [pool.submit(produce, tag) for tag in "AB"]
        results = [tuple(stream.get(timeout=30)) for _ in range(2 * per_producer)]
        for future in producing:
            future.result(timeout=30)
    stream.close()
    assert drain(stream) == []
    # The producers really overlapped: both had items in the first half.
    assert {t for t, _ in results[:per_producer]} == {"A", "B"}
    assert sorted(results) == sorted((t, i) for t in "AB" for i in range(per_producer))
    for tag in "AB":
        assert [i for t, i in results if t == tag] == list(range(per_producer))


def test_attached_handles_share_the_window(make_stream):
    first = make_stream(window=5)
    second = make_stream(name=first.name)  # window=None: keeps the stream's
    assert second.window == 5
    second.set_window(7)
    assert first.window == 7
    third = make_stream(name=first.name, window=3)  # an explicit window changes it
    assert first.window == third.window == second.window == 3


def test_close_from_another_handle_ends_a_waiting_consumer(make_stream):
    consumer = make_stream(window=4)
    producer = make_stream(name=consumer.name)
    producer.put(echo, "only")
    got_first = threading.Event()

    # The consumer polls once an hour, so only a wake-up from Redis (the
    # close's) can end its wait within the test's deadline.
    consumer.consumer.protocol.wait_slice = NO_POLL

    def consume() -> list[Any]:
        out = []
        while True:
            try:
                out.append(consumer.get(timeout=NO_POLL))
            except StreamExhausted:
                return out
            got_first.set()

    with ThreadPoolExecutor(1) as pool:
        consuming = pool.submit(consume)
        assert got_first.wait(30)
        with pytest.raises(TimeoutError):
            consuming.result(timeout=0.3)  # waiting for more: the stream is open
        producer.close()
        # Woken by the close, not by its next look after a wait slice.
        results = consuming.result(timeout=30)
    assert results == ["only"]
    with pytest.raises(StreamClosedError):
        consumer.put(echo, "late")


def test_create_false_refuses_a_stream_that_does_not_exist_and_creates_nothing(app, redis_client):
    name = f"never-made-{uuid.uuid4().hex}"
    with pytest.raises(StreamNotFound, match=r"no stream named .*create=True") as caught:
        OrderedResultStream(app, name, create=False)
    assert isinstance(caught.value, LookupError)
    assert caught.value.stream == name
    assert list(redis_client.scan_iter(match=f"co:{{{name}}}:*", count=1000)) == []


def test_create_false_attaches_where_the_last_consumer_left_off(make_stream, app):
    stream = make_stream(window=6)
    for i in range(5):
        stream.put(echo, i)
    stream.close()
    assert [stream.get(timeout=30) for _ in range(2)] == [0, 1]
    assert stream.position == 2
    stream.release()  # acknowledges, and lets the next consumer in at once

    attached = OrderedResultStream(app, stream.name, create=False)
    assert attached.window == 6
    assert attached.position == 0  # nothing handed out by this consumer yet
    assert list(attached) == [2, 3, 4]
    assert attached.position == 5


def test_a_producer_whose_stream_was_deleted_under_it_is_told(make_stream, app):
    stream = make_stream(window=4)
    for i in range(3):
        stream.put(echo, i)
    OrderedResultStream(app, stream.name).delete()  # from another handle
    with pytest.raises(StreamDeleted, match=r"stream '.*' was deleted") as caught:
        stream.put(echo, 3)
    assert isinstance(caught.value, StreamStateLost)  # existing handlers still catch it
