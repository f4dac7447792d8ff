"""One suite of what a stream does, run on every store and broker it supports.

Each topology is started once for this module (the servers, then a real
Celery worker whose streams live on it) and every test runs on each:

- ``redis``: one Redis, the tests' own, as broker and store;
- ``cluster``: a Redis Cluster of three primaries as the store;
- ``sentinel``: a primary and a replica under Sentinel, writes to the
  primary alone (Redis's default);
- ``sentinel-wait``: the same, every write waiting for the replica
  (``ordered_wait_replicas=1``);
- ``rabbitmq``: RabbitMQ as the broker, the tests' Redis as the store.

What is a topology's own (a failover, a dead cluster node, its URLs) stays
in ``test_cluster.py`` and ``test_sentinel.py``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from redis.crc import key_slot

from celery_ordered import OrderedResultStream, StreamExhausted, StreamFull
from celery_ordered.redis.keys import StreamKeys
from tests.apps.tasks import CustomError, echo, fail, gate, sleep_echo
from tests.apps.topologyapp import topology_app
from tests.support.tools import require_tool
from tests.support.topologies import (
    LocalRedisCluster,
    LocalSentinel,
    rabbitmq_answering,
    topology_worker,
)
from tests.support.workers import Worker

pytestmark = pytest.mark.topology

#: Every topology of the suite, in the order they run.
TOPOLOGIES = ("redis", "cluster", "sentinel", "sentinel-wait", "rabbitmq")

#: Seconds any one outcome may take (a bound, not a pace).
RESULT_TIMEOUT = 60.0


@dataclass
class Topology:
    """A store (and broker) under test, with a worker serving ``app``'s queue."""

    name: str
    app: Celery
    worker: Worker
    #: ``count`` fresh stream names starting with ``prefix`` (on a cluster,
    #: on as many different nodes as there are).
    stream_names: Callable[[str, int], list[str]]
    #: The keys the store holds for the stream of that name, as it lists them.
    keys_of: Callable[[str], set[bytes]]


def _fresh_names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:10]}" for _ in range(count)]


def _scanner(*clients: Callable[[], redis.Redis]) -> Callable[[str], set[bytes]]:
    """``keys_of`` for a store made of the servers ``clients`` connect to."""

    def keys_of(name: str) -> set[bytes]:
        found: set[bytes] = set()
        for connect in clients:
            client = connect()
            try:
                found.update(client.scan_iter(match=f"co:{{{name}}}:*"))
            finally:
                client.close()
        return found

    return keys_of


@pytest.fixture(scope="module")
def local_sentinel() -> Iterator[LocalSentinel]:
    """A primary, one replica and one Sentinel (no test here kills anything)."""
    require_tool("redis-server", "it runs the primary, the replica and the Sentinel")
    with LocalSentinel(replicas=1) as started:
        yield started


def _cluster_names(cluster: LocalRedisCluster) -> Callable[[str, int], list[str]]:
    """``stream_names`` on a cluster: the n-th name on the (n mod nodes)-th node."""

    def names(prefix: str, count: int) -> list[str]:
        owners = cluster.slot_owners()
        ports = [node.port for node in cluster.nodes]
        found: list[str] = []
        while len(found) < count:
            (name,) = _fresh_names(prefix, 1)
            if owners[key_slot(StreamKeys(name).seq.encode())] == ports[len(found) % len(ports)]:
                found.append(name)
        return found

    return names


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Topology]:
    """Each topology in turn, started once, with a worker (3 processes) serving it."""
    name: str = request.param
    queue = f"co-conformance-{name}-{uuid.uuid4().hex[:6]}"
    settings: dict[str, Any] = {}
    names = _fresh_names
    if name in ("redis", "rabbitmq"):
        store = redis_url
        keys_of = _scanner(lambda: redis.Redis.from_url(redis_url))
        if name == "rabbitmq":
            settings["broker_url"] = require_tool(
                "RabbitMQ",
                "the broker of this topology (CO_TEST_AMQP_URL)",
                find=rabbitmq_answering,
            )
    elif name == "cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        store = cluster.url
        keys_of = _scanner(*(node.client for node in cluster.nodes))
        names = _cluster_names(cluster)
    else:
        sentinel: LocalSentinel = request.getfixturevalue("local_sentinel")
        store = sentinel.url
        keys_of = _scanner(lambda: sentinel.primary().client())
        if name == "sentinel-wait":
            settings.update(ordered_wait_replicas=1, ordered_wait_timeout=30)
    app = topology_app(store, queue, **settings)
    with topology_worker(store, queue, concurrency=3, **settings) as worker:
        worker.wait_ready(app)
        yield Topology(name, app, worker, names, keys_of)
    if name == "rabbitmq":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    else:
        redis.Redis.from_url(app.conf.broker_url).delete(queue)
    app.close()


@pytest.fixture
def streams(topology: Topology) -> Iterator[Callable[..., list[OrderedResultStream]]]:
    """Make ``count`` streams on the topology; each is deleted after the test."""
    made: list[OrderedResultStream] = []

    def make(prefix: str, count: int = 1, **kwargs: Any) -> list[OrderedResultStream]:
        for name in topology.stream_names(prefix, count):
            made.append(OrderedResultStream(topology.app, name, **kwargs))
        return made[-count:]

    yield make
    for stream in made:
        with contextlib.suppress(Exception):
            stream.delete()


def expected_outcomes(offset: int, count: int) -> list[Any]:
    """What :func:`produce` puts, as the consumer must see it."""
    expected: list[Any] = []
    for i in range(count):
        expected.append(offset + i)
        if i % 20 == 19:
            expected.append({"batch": i // 20})
        if i == count // 2:
            expected.append(("error", f"failed on stream {offset}"))
    return expected


def produce(stream: OrderedResultStream, offset: int, count: int, seed: int) -> None:
    """Tasks of uneven length, a marker after every 20, one failing task midway; then close."""
    rng = random.Random(seed)
    with stream:
        for i in range(count):
            stream.put(sleep_echo, offset + i, rng.uniform(0, 0.01))
            if i % 20 == 19:
                stream.put({"batch": i // 20})
            if i == count // 2:
                stream.put(fail, f"failed on stream {offset}")


def consume(stream: OrderedResultStream) -> list[Any]:
    """Every outcome until the stream ends; a task's error as ``("error", message)``."""
    seen: list[Any] = []
    while True:
        try:
            seen.append(stream.get(timeout=RESULT_TIMEOUT))
        except CustomError as exc:
            seen.append(("error", str(exc)))
        except StreamExhausted:
            return seen


def test_tasks_markers_and_one_failure_come_out_in_order(
    topology: Topology, streams: Callable[..., list[OrderedResultStream]]
) -> None:
    # Given three streams at once (on a cluster, each on a node of its own),
    # each fed tasks of uneven length, markers and one failing task
    count = 60
    made = streams("conformance", 3, window=8)
    errors: list[BaseException] = []

    def run(stream: OrderedResultStream, offset: int) -> None:
        try:
            produce(stream, offset, count, seed=offset)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(stream, 1000 * n), daemon=True)
        for n, stream in enumerate(made)
    ]
    for thread in threads:
        thread.start()

    # Then each comes out whole, in its own order, the error at its place,
    # and ends once its producer closed it
    for n, stream in enumerate(made):
        assert consume(stream) == expected_outcomes(1000 * n, count)
    for thread in threads:
        thread.join(RESULT_TIMEOUT)
        assert not thread.is_alive()
    assert errors == []


def test_the_window_holds(
    topology: Topology,
    streams: Callable[..., list[OrderedResultStream]],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    gates = [f"co-gate-{uuid.uuid4().hex}" for _ in range(3)]
    (stream,) = streams("window", window=3)
    try:
        # Given three tasks held by their gates: the window is full
        for i, key in enumerate(gates):
            stream.put(gate, redis_url, key, i)
        began = time.monotonic()
        with pytest.raises(StreamFull):
            stream.put(echo, "fourth", timeout=0.3)
        assert time.monotonic() - began >= 0.3
        stats = stream.stats()
        assert (stats.claimed, stats.in_flight) == (3, 3)
        # When the first finishes and is consumed, one more fits
        redis_client.rpush(gates[0], 1)
        assert stream.get(timeout=RESULT_TIMEOUT) == 0
        stream.put(echo, "fourth", timeout=RESULT_TIMEOUT)
        for key in gates[1:]:
            redis_client.rpush(key, 1)
        assert [stream.get(timeout=RESULT_TIMEOUT) for _ in range(3)] == [1, 2, "fourth"]
    finally:
        for key in gates:  # no gate task is left waiting
            redis_client.rpush(key, 1)
            redis_client.expire(key, 60)


def test_a_deleted_stream_leaves_no_key(
    topology: Topology, streams: Callable[..., list[OrderedResultStream]]
) -> None:
    # Given a stream that ran tasks and markers, and whose keys are in the store
    (stream,) = streams("delete", window=16)
    with stream:
        for i in range(10):
            stream.put(echo, i)
        stream.put("a marker")
    assert list(stream) == [*range(10), "a marker"]
    held = topology.keys_of(stream.name)
    assert held
    # When it is deleted, then the store holds none of its keys
    stream.delete()
    assert topology.keys_of(stream.name) == set()
