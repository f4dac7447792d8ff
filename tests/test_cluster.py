"""Streams on a real Redis Cluster: three local primaries, real Celery workers.

Every key of a stream carries the stream's name as its hash tag, so all of a
stream lives in one slot and its scripts run whole on one node; different
streams spread over the nodes. The workers' broker is the tests' usual one:
only the streams' Redis is the cluster. What every store must do (order,
markers, errors, the window, deletion) is in test_topology_conformance.py;
this file keeps what is the cluster's own.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from redis.cluster import RedisCluster

from celery_ordered import (
    ConfigurationError,
    OrderedResultStream,
    RedisUnavailable,
)
from celery_ordered.cli import main as standalone
from celery_ordered.redis.keys import StreamKeys
from tests.apps.tasks import echo
from tests.apps.topologyapp import topology_app
from tests.support.tools import require_tool
from tests.support.topologies import LocalRedisCluster, RedisNode, free_ports, topology_worker
from tests.support.workers import Worker

pytestmark = pytest.mark.topology


@pytest.fixture(scope="module")
def cluster(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    """The module's Redis Cluster (conftest's ``redis_cluster``)."""
    return redis_cluster


@pytest.fixture(scope="module")
def queue() -> str:
    return f"co-cluster-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def cluster_worker(cluster: LocalRedisCluster, queue: str) -> Iterator[Worker]:
    """A worker (3 processes) that publishes outcomes to the cluster."""
    worker = topology_worker(cluster.url, queue, concurrency=3)
    try:
        worker.wait_ready(topology_app(cluster.url, queue))
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def app(redis_url: str, queue: str) -> Any:
    """The producers' app: its own Redis setting is the tests' usual Redis, so
    only ``redis_url=`` sends a stream to the cluster."""
    return topology_app(redis_url, queue)


def names_on_each_node(cluster: LocalRedisCluster, prefix: str) -> dict[int, str]:
    """One fresh stream name per node: port -> name."""
    found: dict[int, str] = {}
    while len(found) < len(cluster.nodes):
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        found.setdefault(cluster.port_of(StreamKeys(name).seq), name)
    return found


def test_each_stream_lives_on_one_node_alone(
    cluster: LocalRedisCluster, cluster_worker: Worker, app: Any
) -> None:
    # (Order, markers and errors on a cluster: tests/test_topology_conformance.py.)
    # Given one stream on each node, each of which ran tasks
    names = names_on_each_node(cluster, "placed")
    streams = {
        port: OrderedResultStream(app, name, redis_url=cluster.url, window=8)
        for port, name in names.items()
    }
    try:
        for stream in streams.values():
            assert list(stream.map(echo, range(10))) == list(range(10))
        # Then each stream's keys are on its own node and on no other
        for port, stream in streams.items():
            for node in cluster.nodes:
                held = node.client().scan_iter(match=f"co:{{{stream.name}}}:*")
                assert bool(list(held)) == (node.port == port)
    finally:
        for stream in streams.values():
            stream.delete()
    # and, once deleted, on none
    for node in cluster.nodes:
        for name in names.values():
            assert not list(node.client().scan_iter(match=f"co:{{{name}}}:*"))


def test_the_app_setting_sends_streams_to_the_cluster(
    cluster: LocalRedisCluster, cluster_worker: Worker, app: Any
) -> None:
    # As docs/deploying.md shows it: the app names the cluster, streams follow.
    app.conf.ordered_redis_url = cluster.url

    stream = OrderedResultStream(app, window=64)
    try:
        outcomes = list(stream.map(echo, range(100)))
        assert outcomes == list(range(100))
        owner = cluster.node(cluster.port_of(StreamKeys(stream.name).seq))
        assert owner.client().get(StreamKeys(stream.name).seq) == b"100"
    finally:
        stream.delete()


def test_a_redis_cluster_client_of_your_own(
    cluster: LocalRedisCluster, cluster_worker: Worker, app: Any
) -> None:
    own = RedisCluster(host="127.0.0.1", port=cluster.nodes[1].port)
    stream = OrderedResultStream(app, client=own, window=32)
    try:
        with stream:
            for i in range(20):
                stream.put(echo, i)
            stream.put("done")
        assert list(stream) == [*range(20), "done"]
    finally:
        stream.delete()
        own.close()


def test_many_streams_spread_over_every_node_and_stay_apart(
    cluster: LocalRedisCluster, app: Any
) -> None:
    # Markers only: the stream's whole round trip (claim, publish, pop) without workers.
    streams = [
        OrderedResultStream(
            app, f"many-{i}-{uuid.uuid4().hex[:6]}", redis_url=cluster.url, window=50
        )
        for i in range(24)
    ]
    assert {cluster.port_of(StreamKeys(s.name).seq) for s in streams} == {
        node.port for node in cluster.nodes
    }
    failures: list[BaseException] = []

    def run(stream: OrderedResultStream) -> None:
        try:
            with stream:
                for i in range(40):
                    stream.put([stream.name, i])
            assert list(stream) == [[stream.name, i] for i in range(40)]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in streams]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not failures, failures[0]
    finally:
        for stream in streams:
            stream.delete()


def test_ls_inspect_and_purge_see_streams_on_every_node(
    cluster: LocalRedisCluster, app: Any
) -> None:
    names = names_on_each_node(cluster, "cli")
    streams = [
        OrderedResultStream(app, name, redis_url=cluster.url, window=5) for name in names.values()
    ]
    try:
        for n, stream in enumerate(streams):
            for i in range(n + 1):
                stream.put(f"marker {i}")
        runner = CliRunner()
        listed = runner.invoke(standalone, ["ordered", "--redis-url", cluster.url, "ls"])
        assert listed.exit_code == 0, listed.output
        for n, stream in enumerate(streams):
            line = next(row for row in listed.output.splitlines() if stream.name in row)
            assert f"0/{n + 1} delivered" in line
            assert "window 5" in line

        inspected = runner.invoke(
            standalone, ["ordered", "--redis-url", cluster.url, "inspect", streams[2].name]
        )
        assert inspected.exit_code == 0, inspected.output
        assert "claimed       3" in inspected.output

        purged = runner.invoke(
            standalone, ["ordered", "--redis-url", cluster.url, "purge", "--yes", streams[1].name]
        )
        assert purged.exit_code == 0, purged.output
        owner = cluster.node(cluster.port_of(StreamKeys(streams[1].name).seq))
        assert owner.client().exists(*StreamKeys(streams[1].name).all()) == 0
        again = runner.invoke(standalone, ["ordered", "--redis-url", cluster.url, "ls"])
        assert streams[1].name not in again.output
        assert streams[0].name in again.output
        assert streams[2].name in again.output
    finally:
        for stream in streams:
            stream.delete()


def test_waiting_for_replicas_a_cluster_lacks_is_a_clear_error(
    cluster: LocalRedisCluster, redis_url: str, queue: str
) -> None:
    app = topology_app(redis_url, queue, ordered_wait_replicas=1, ordered_wait_timeout=0.2)
    began = time.monotonic()
    with pytest.raises(RedisUnavailable, match="ordered_wait_replicas"):
        OrderedResultStream(app, redis_url=cluster.url)
    assert time.monotonic() - began < 5


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+cluster://", "names no node"),
        ("redis+cluster://127.0.0.1:7000/3", "only database 0"),
        ("redis+cluster://127.0.0.1:7000?db=2", "only database 0"),
        ("redis+cluster://127.0.0.1:port", "is not host:port"),
        ("redis+cluster://127.0.0.1:7000,,127.0.0.1:7001", "is not host:port"),
        ("cluster://127.0.0.1:7000", "redis+cluster://host:7000,host:7001"),
    ],
)
def test_a_bad_cluster_url_is_refused_at_the_call(redis_url: str, url: str, says: str) -> None:
    app = topology_app(redis_url, "unused")
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        OrderedResultStream(app, redis_url=url)


def test_a_cluster_url_on_a_plain_redis_says_so(redis_url: str) -> None:
    require_tool("redis-server", "the test starts a Redis that is not a cluster")
    with tempfile.TemporaryDirectory() as directory:
        plain = RedisNode(Path(directory), free_ports(1)[0]).start()
        try:
            app = topology_app(redis_url, "unused")
            with pytest.raises(ConfigurationError, match="is not a Redis Cluster"):
                OrderedResultStream(app, redis_url=f"redis+cluster://127.0.0.1:{plain.port}")
        finally:
            plain.stop()


def test_a_plain_url_on_a_cluster_node_says_to_use_the_cluster_url(
    cluster: LocalRedisCluster, app: Any
) -> None:
    names = names_on_each_node(cluster, "moved")
    first = cluster.nodes[0].port
    elsewhere = next(name for port, name in names.items() if port != first)
    with pytest.raises(ConfigurationError, match="redis\\+cluster://"):
        OrderedResultStream(app, elsewhere, redis_url=f"redis://127.0.0.1:{first}/0")


def test_a_dead_node_is_a_clear_error_and_a_restarted_one_is_ridden_out(
    redis_url: str,
) -> None:
    require_tool("redis-server", "it runs the nodes of the local Redis Cluster")
    require_tool("redis-cli", "its --cluster create joins the nodes into one cluster")
    with LocalRedisCluster(3) as own:
        impatient = topology_app(redis_url, "unused", ordered_redis_retry_for=1)
        patient = topology_app(redis_url, "unused", ordered_redis_retry_for=60)
        name = f"dead-node-{uuid.uuid4().hex[:8]}"
        node = own.node(own.port_of(StreamKeys(name).seq))
        stream = OrderedResultStream(impatient, name, redis_url=own.url)
        stream.put("before")
        assert stream.get(timeout=10) == "before"

        # When the node holding the stream dies (no replica to take over)
        node.kill()

        # Then the stream says so within about ordered_redis_retry_for, naming the setting
        began = time.monotonic()
        with pytest.raises(RedisUnavailable, match="ordered_redis_retry_for"):
            stream.put("while dead")
        assert time.monotonic() - began < 15

        # and a patient producer rides it out once the node is back
        done = threading.Event()
        outcome: list[Any] = []

        def put_meanwhile() -> None:
            try:
                waiting = OrderedResultStream(patient, name, redis_url=own.url)
                outcome.append(waiting.put("after restart"))
            except BaseException as exc:
                outcome.append(exc)
            done.set()

        threading.Thread(target=put_meanwhile, daemon=True).start()
        assert not done.wait(0.5)  # still retrying: the node is down
        node.start()
        own.wait_state("ok")
        assert done.wait(60), "the put did not return after the node came back"
        assert not isinstance(outcome[0], BaseException), outcome[0]
        # The node restarted empty (no persistence): the stream began anew there.
        reader = OrderedResultStream(patient, name, redis_url=own.url)
        assert reader.get(timeout=10) == "after restart"
        reader.delete()
