"""Streams on a Sentinel-managed Redis, through a failover; and what a rollback does.

The topology tests run a real primary, two replicas and a Sentinel (quorum 1,
``down-after-milliseconds`` 1000) on local ports, real Celery workers
publishing through the Sentinel URL, and kill -9 the primary mid-stream.
What every store must do, Sentinel with and without WAIT included, is in
test_topology_conformance.py.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from celery_ordered import (
    ConfigurationError,
    OrderedResultStream,
    RedisUnavailable,
    StreamDeleted,
    StreamExhausted,
    StreamStateLost,
    codec,
)
from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import Protocol
from celery_ordered.task import publish_outcome
from tests.apps.tasks import CustomError, fail, sleep_echo
from tests.apps.topologyapp import topology_app
from tests.support.tools import require_tool
from tests.support.topologies import LocalSentinel, topology_worker, wait_until

#: Tasks in the failover runs, and a marker after every this many.
TASKS, MARKER_EVERY = 240, 40
#: Outcomes consumed when the replicas are made to fall behind; and, without
#: WAIT, how many more are consumed (from the primary alone) before it dies.
STALL_AT, AHEAD = 60, 40


@pytest.fixture
def sentinel() -> Iterator[LocalSentinel]:
    """A fresh primary, two replicas and one Sentinel (each test kills the primary)."""
    require_tool("redis-server", "it runs the primary, the replicas and the Sentinel")
    with LocalSentinel(replicas=2) as started:
        yield started


def expected_outcomes() -> list[Any]:
    expected: list[Any] = []
    for i in range(TASKS):
        expected.append(i)
        if i % MARKER_EVERY == MARKER_EVERY - 1:
            expected.append({"marker": i})
        if i == 150:
            expected.append(("error", "task 150 fails"))
    return expected


@dataclass
class Run:
    """What a run through a failover showed."""

    seen: list[Any] = field(default_factory=list)
    #: The error that stopped the consumer, if any.
    stopped: BaseException | None = None
    #: Errors of the producer.
    produced: list[BaseException] = field(default_factory=list)


def run_through_a_failover(sentinel: LocalSentinel, *, waits: bool, **settings: Any) -> Run:
    """Put TASKS tasks into a stream on the Sentinel URL; fail over mid-stream.

    At STALL_AT outcomes the replicas fall behind (stopped, their link
    cut); the primary is killed once writes are blocked waiting for them
    (``waits``) or once the consumer has taken AHEAD more outcomes from the
    primary alone; then the replicas run again and one is promoted.
    """
    queue = f"co-sentinel-{uuid.uuid4().hex[:8]}"
    settings = {"ordered_redis_retry_for": 60, **settings}
    # The Celery way: the URL lists the Sentinels, the transport options name the primary.
    url = sentinel.url.split("?")[0]
    options = {"master_name": sentinel.master_name}
    app = topology_app(url, queue, ordered_redis_transport_options=options, **settings)
    worker = topology_worker(
        url, queue, concurrency=3, ordered_redis_transport_options=options, **settings
    )
    run = Run()
    failed_over = threading.Event()

    def fail_over() -> None:
        sentinel.stall_replication()
        if waits:
            wait_until(sentinel.clients_waiting_for_replicas, "writes blocked in WAIT")
        else:
            wait_until(lambda: len(run.seen) >= STALL_AT + AHEAD, "outcomes from the primary")
        old = sentinel.kill_primary()
        sentinel.resume_replicas()
        sentinel.wait_failover(old)
        failed_over.set()

    try:
        worker.wait_ready(app)
        stream = OrderedResultStream(app, window=16)

        def produce() -> None:
            try:
                with stream:
                    for i in range(TASKS):
                        stream.put(sleep_echo, i, 0.002)
                        if i % MARKER_EVERY == MARKER_EVERY - 1:
                            stream.put({"marker": i})
                        if i == 150:
                            stream.put(fail, "task 150 fails")
            except BaseException as exc:
                run.produced.append(exc)

        threading.Thread(target=produce, daemon=True).start()
        while True:
            if len(run.seen) == STALL_AT and not failed_over.is_set():
                threading.Thread(target=fail_over, daemon=True).start()
            try:
                run.seen.append(stream.get(timeout=90))
            except CustomError as exc:
                run.seen.append(("error", str(exc)))
            except StreamExhausted:
                break
            except Exception as exc:
                run.stopped = exc
                break
        assert failed_over.wait(60), "the failover did not happen"
        return run
    finally:
        worker.stop()


@pytest.mark.topology
def test_a_failover_loses_nothing_when_writes_wait_for_a_replica(
    sentinel: LocalSentinel,
) -> None:
    # Given every write waits for one replica, and the replicas fall behind
    # mid-stream, then the primary dies with writes only it had
    run = run_through_a_failover(
        sentinel, waits=True, ordered_wait_replicas=1, ordered_wait_timeout=30
    )
    # Then those writes were never acknowledged: tried again on the new
    # primary, every outcome comes out, in order, once
    assert run.stopped is None, repr(run.stopped)
    assert run.produced == []
    assert run.seen == expected_outcomes()


@pytest.mark.topology
def test_without_waiting_a_failover_that_loses_writes_is_reported(
    sentinel: LocalSentinel,
) -> None:
    # Given writes go to the primary alone (Redis's default), and the
    # primary dies AHEAD outcomes after its replicas fell behind
    run = run_through_a_failover(sentinel, waits=False)
    # Then whatever came out is right and in order, and the loss is reported:
    # the consumer is told the state went back, instead of waiting forever
    assert run.seen == expected_outcomes()[: len(run.seen)]
    assert len(run.seen) >= STALL_AT + AHEAD
    assert isinstance(run.stopped, StreamStateLost), repr(run.stopped)
    assert "went back in time" in str(run.stopped)
    assert all("went back in time" in str(error) for error in run.produced), run.produced


@pytest.mark.topology
def test_the_primary_is_named_in_the_url_or_in_celerys_own_settings(
    sentinel: LocalSentinel,
) -> None:
    sentinels = sentinel.url.split("?")[0]
    # ?master_name= in the URL alone (for --redis-url and environment variables);
    # Celery's result backend on Sentinel, its transport options naming the primary
    by_url = topology_app(sentinel.url, "unused")
    by_backend = topology_app("", "unused")
    by_backend.conf.update(
        ordered_redis_url=None,
        result_backend=sentinels,
        result_backend_transport_options={
            "master_name": sentinel.master_name,
            "visibility_timeout": 3600,  # Celery's own options are left alone
        },
    )
    for app in (by_url, by_backend):
        stream = OrderedResultStream(app, window=4)
        try:
            stream.put("a marker")
            assert stream.get(timeout=10) == "a marker"
            primary = sentinel.primary().client()
            assert primary.exists(StreamKeys(stream.name).window) == 1
        finally:
            stream.delete()


def test_a_rollback_of_the_streams_state_is_reported_not_reused(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a stream whose Redis, after two puts, is put back to how it was
    # after the first (what a failover to a replica one write behind does)
    app = topology_app(redis_url, "unused")
    stream = OrderedResultStream(app, f"rollback-{uuid.uuid4().hex}", window=10)
    keys = StreamKeys(stream.name).all()
    try:
        assert stream.put("first") == 0
        snapshot = {key: redis_client.dump(key) for key in keys if redis_client.exists(key)}
        assert stream.put("second") == 1
        redis_client.delete(*keys)
        for key, value in snapshot.items():
            redis_client.restore(key, 0, value)

        # When the producer puts again, it is told, instead of number 1 twice
        with pytest.raises(StreamStateLost, match="went back in time") as raised:
            stream.put("third")
        assert raised.value.seq == 1
        assert "ordered_wait_replicas" in str(raised.value)
    finally:
        stream.delete()


def test_an_outcome_for_a_number_a_rollback_took_back_is_reported_as_one(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a number claimed, then the stream's Redis put back to before the
    # claim (a failover to a replica that had not received it)
    proto = Protocol(redis_client, f"rollback-{uuid.uuid4().hex}", ttl=60)
    incarnation = uuid.uuid4().hex
    proto.open(incarnation, create=True, window=10)
    keys = proto.keys.all()
    try:
        snapshot = {key: redis_client.dump(key) for key in keys if redis_client.exists(key)}
        claim = proto.claim([b"m:marker"], 10, producer="p", claim_id="c", lost_after=60)
        redis_client.delete(*keys)
        for key, value in snapshot.items():
            redis_client.restore(key, 0, value)

        # When its outcome (a marker's, say) is published, it is refused, and
        # what the producer raises says the state went back: not "deleted"
        stored = proto.publish(claim.first, b"%d:M:application/json:utf-8:1" % claim.first)
        error = proto.refused(stored, claim.first, "put()")
        assert isinstance(error, StreamStateLost)
        assert not isinstance(error, StreamDeleted)
        assert "went back in time" in str(error)
        assert error.seq == claim.first
        # and a worker's outcome for it is dropped, its log saying why
        app = topology_app(redis_url, "unused")
        with caplog.at_level(logging.WARNING, logger="celery_ordered"):
            publish_outcome(
                app, proto.keys.name, claim.first, "json", codec.RESULT, 1, "t",
                incarnation=incarnation,
            )  # fmt: skip
        assert f"stream {proto.keys.name} went back in time" in caplog.text
        assert redis_client.hlen(proto.keys.results) == 0
    finally:
        proto.delete()
    # A stream deleted under a handle is still told apart from a rollback
    stored = proto.publish(claim.first, b"%d:M:application/json:utf-8:1" % claim.first)
    assert isinstance(proto.refused(stored, claim.first, "put()"), StreamDeleted)


def test_waiting_for_replicas_that_are_not_there_is_a_clear_error(redis_url: str) -> None:
    app = topology_app(redis_url, "unused", ordered_wait_replicas=1, ordered_wait_timeout=0.2)
    with pytest.raises(RedisUnavailable, match=r"only 0 of the 1 replica\(s\)"):
        OrderedResultStream(app)


def test_wait_settings_are_checked(redis_url: str) -> None:
    for bad in (-1, "1", True, 1.5):
        app = topology_app(redis_url, "unused", ordered_wait_replicas=bad)
        with pytest.raises(ConfigurationError, match="ordered_wait_replicas"):
            OrderedResultStream(app)
    app = topology_app(redis_url, "unused", ordered_wait_replicas=1, ordered_wait_timeout=0)
    with pytest.raises(ConfigurationError, match="ordered_wait_timeout"):
        OrderedResultStream(app)


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        ("sentinel://127.0.0.1:26379/0", {}, "needs the name of the primary"),
        (
            "sentinel://127.0.0.1:26379/0?master_name=a",
            {"master_name": "b"},
            "keep one of them",
        ),
        ("sentinel://127.0.0.1:26379/0?service=a", {}, "unknown or empty option 'service'"),
        ("sentinel://127.0.0.1:26379;redis://127.0.0.1:6379", {}, "does not start with"),
        ("sentinel://127.0.0.1:26379,127.0.0.1:26380", {}, "one Sentinel per sentinel://"),
        ("sentinel://127.0.0.1:26379/zero", {}, "is not a number"),
        ("sentinel://127.0.0.1:26379/1;sentinel://127.0.0.1:26380/2", {}, "two databases"),
        ("sentinel://127.0.0.1:26379", {"master": "a"}, "unknown option(s) ['master']"),
        ("sentinel://127.0.0.1:26379", {"master_name": "a", "sentinel_kwargs": 3}, "a dict"),
    ],
)
def test_a_bad_sentinel_setup_is_refused_at_the_call(
    redis_url: str, url: str, options: dict[str, Any], says: str
) -> None:
    app = topology_app(redis_url, "unused", ordered_redis_transport_options=options)
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        OrderedResultStream(app, redis_url=url)
