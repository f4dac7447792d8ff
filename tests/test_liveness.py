"""Liveness: dead, frozen, lost or stuck work never stalls a stream for long.

Every test runs real Celery worker processes and breaks them for real: a
whole worker SIGKILLed (main process and pool), frozen with SIGSTOP, a pool
process killed, messages deleted from the broker, a queue nobody serves, a
worker publishing to another Redis. The settings are the defaults unless a
test is about one; each measures how long healing took and prints it (run
with ``-s`` to see the figures), but asserts only the bound the guarantee
names, as the deadline of the consumer's wait.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from celery import Celery

from celery_ordered import OrderedResultStream, RedisServer, ResultLost, StreamEmpty
from celery_ordered.config import (
    DEFAULT_OVERTAKEN_AFTER,
    DEFAULT_STALL_WARNING,
    DEFAULT_WORKER_LEASE,
)
from celery_ordered.errors import ConfigurationError
from celery_ordered.redis.keys import StreamKeys
from tests.apps.liveness_tasks import first_run_held, held_on
from tests.apps.tasks import echo
from tests.support.cli import run_ordered
from tests.support.tools import require_tool
from tests.support.topologies import rabbitmq_answering
from tests.support.waiting import wait_until
from tests.support.workers import Worker, wait_answering

#: The issue's bound: a dead worker's tasks, running or reserved, are
#: dispatched again within this many seconds, with the default settings.
BOUND = 30.0

#: The longest anything else here may take (a worker starting, a result).
DEADLINE = 60.0


@dataclass
class Broker:
    """A broker the tests' workers and streams use, with an app and a queue of the test's own."""

    name: str
    url: str
    app: Celery
    queue: str
    #: Every worker started through :meth:`worker`: stopped after the test.
    started: list[Worker] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """What a worker of the tests' app needs to use this broker and queue."""
        return {"CO_TEST_BROKER_URL": self.url, "CO_TEST_QUEUE": self.queue}

    def worker(self, name: str, *, concurrency: int = 2, **kwargs: Any) -> Worker:
        """A worker of the tests' app on this broker and queue, in a process group of its own.

        With Celery's default prefetch (4 per process; the tests' app sets 1).
        """
        worker = Worker(
            queue=self.queue,
            concurrency=concurrency,
            hostname=f"{name}-{uuid.uuid4().hex[:6]}@%h",
            extra_env={**self.env(), **kwargs.pop("extra_env", {})},
            args=("--prefetch-multiplier=4",),
            new_session=True,
            **kwargs,
        )
        self.started.append(worker)
        return worker


def _broker(kind: str, redis_url: str) -> Iterator[Broker]:
    queue = f"co-live-{kind}-{uuid.uuid4().hex[:6]}"
    if kind == "rabbitmq":
        url = require_tool("RabbitMQ", "the broker of the RabbitMQ case", find=rabbitmq_answering)
    else:
        url = os.environ["CO_TEST_BROKER_URL"]
    app = Celery(f"liveness-{kind}", set_as_current=False)
    app.conf.update(
        broker_url=url,
        ordered_redis_url=redis_url,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
    )
    broker = Broker(kind, url, app, queue)
    yield broker
    for worker in broker.started:
        worker.stop()
    if kind == "rabbitmq":
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
    else:  # the tests' Redis is the broker
        redis.Redis.from_url(redis_url).delete(queue)
    app.close()


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Broker]:
    """The Redis broker, then RabbitMQ."""
    yield from _broker(request.param, redis_url)


@pytest.fixture
def redis_broker(redis_url: str) -> Iterator[Broker]:
    """The tests' Redis as the broker."""
    yield from _broker("redis", redis_url)


@pytest.fixture
def notes(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix for the tasks' notes (runs, events, gate); removed afterwards."""
    key = f"co-live-{uuid.uuid4().hex}"
    yield key
    redis_client.rpush(f"{key}:gate", *["go"] * 20)  # no held task outlives the test
    redis_client.expire(f"{key}:gate", 30)
    redis_client.delete(f"{key}:runs", f"{key}:events")


def leases(client: redis.Redis, name: str) -> dict[int, tuple[str, str]]:
    """``{number: (state, holder)}`` of the numbers a worker holds, as Redis has them."""
    held = {}
    for name_of_field, value in client.hgetall(StreamKeys(name).pending).items():
        if name_of_field.startswith(b"h:"):
            _, state, _, _, _, holder = value.decode().split("|", 5)
            held[int(name_of_field[2:])] = (state, holder)
    return held


def runs(client: redis.Redis, key: str) -> dict[str, int]:
    """How often each value's task ran."""
    return {k.decode(): int(v) for k, v in client.hgetall(f"{key}:runs").items()}


def events(client: redis.Redis, key: str) -> list[tuple[str, str, str]]:
    """``(event, value, node)`` of every start and end of a task, in order."""
    return [tuple(e.decode().split(" ", 2)) for e in client.lrange(f"{key}:events", 0, -1)]  # type: ignore[misc]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings logged so far, in any thread."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def assert_stall_warning(warning: str, blocker: str) -> None:
    """``warning`` is a consumer's stall warning for number 0, logged once it had
    waited the threshold: at the first wait slice (2 s) past it, later on a busy
    machine, so the time it states is at least the threshold, not exactly it."""
    found = re.search(r"has waited (\d+) s for number 0: (.*)", warning)
    assert found, warning
    assert DEFAULT_STALL_WARNING <= int(found[1]) <= DEFAULT_STALL_WARNING + 5, warning
    assert found[2].startswith(blocker), warning


def ends_here(stream: OrderedResultStream) -> None:
    """Close ``stream``, check nothing more comes out of it (no duplicate), delete it."""
    stream.close()
    assert list(stream) == []
    stream.delete()


def take(stream: OrderedResultStream, count: int, until: float) -> list[Any]:
    """The next ``count`` outcomes, all before the monotonic time ``until``."""
    return [stream.get(timeout=max(0.0, until - time.monotonic())) for _ in range(count)]


# -- a worker that dies, freezes or loses a process ---------------------------------


@pytest.mark.slow
def test_a_killed_workers_running_and_reserved_tasks_run_again_within_the_bound(
    broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a worker of 2 processes with Celery's default prefetch (4 each),
    # holding 8 tasks of a stream: 2 running, 6 reserved
    victim = broker.worker("victim")
    victim.wait_ready(broker.app)
    stream = OrderedResultStream(broker.app, window=12, task_options={"queue": broker.queue})
    for i in range(12):
        stream.put(held_on, "victim-", redis_url, notes, i)
    held = wait_until(
        lambda: (found := leases(redis_client, stream.name)) and len(found) == 8 and found,
        "the victim holding 8 numbers",
        DEADLINE,
    )
    assert sorted(state for state, _ in held.values()) == ["received"] * 6 + ["started"] * 2
    # And a second worker, which takes the 4 tasks left in the queue
    broker.worker("survivor").wait_ready(broker.app)
    # When the victim dies whole (main process and pool, SIGKILL)
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    # Then every one of its tasks runs again on the survivor, within the bound
    outcomes = take(stream, 12, killed + BOUND)
    healed = time.monotonic() - killed
    print(f"\n[{broker.name} broker] worker killed: its tasks' outcomes {healed:.1f} s later")
    assert [value for value, _ in outcomes] == list(range(12))
    assert all(node.startswith("survivor-") for _, node in outcomes)
    ends_here(stream)


def running_one(
    broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str, value: str
) -> tuple[Worker, OrderedResultStream]:
    """A worker of one process ("victim-...") holding a stream's one task, held in its run.

    Returns once the stream has the worker's lease on it, as started.
    """
    victim = broker.worker("victim", concurrency=1)
    victim.wait_ready(broker.app)
    stream = OrderedResultStream(broker.app, task_options={"queue": broker.queue})
    stream.put(held_on, "victim-", redis_url, notes, value)
    wait_until(
        lambda: leases(redis_client, stream.name).get(0, ("", ""))[0] == "started",
        "the victim running the task",
        DEADLINE,
    )
    return victim, stream


@pytest.mark.slow
def test_a_frozen_worker_is_detected_its_task_runs_again_and_the_first_outcome_stays(
    redis_broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a worker running a stream's task
    victim, stream = running_one(redis_broker, redis_url, redis_client, notes, "x")
    # And a second worker (ready as it answers a ping: the victim would
    # reserve a task sent to check it, and never run it)
    wait_answering(redis_broker.app, [redis_broker.worker("survivor", concurrency=1)], DEADLINE)
    # When the victim is frozen (SIGSTOP: alive, silent)
    os.killpg(victim.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        # Then the task runs again elsewhere, within the bound
        value, node = stream.get(timeout=BOUND)
        print(f"\nworker frozen: its task's outcome {time.monotonic() - frozen:.1f} s later")
        assert (value, node.split("-")[0]) == ("x", "survivor")
    finally:
        # And when the victim wakes up and finishes its run
        os.killpg(victim.pid, signal.SIGCONT)
    redis_client.rpush(f"{notes}:gate", "go")
    wait_until(
        lambda: ("end", "x", victim.node) in events(redis_client, notes),
        "the woken victim finishing its run",
        DEADLINE,
    )
    # Then its late outcome is dropped: the stream holds the first one only
    assert runs(redis_client, notes) == {"x": 2}
    assert stream.stats().redispatched == 1
    ends_here(stream)


@pytest.mark.slow
def test_a_killed_pool_process_task_runs_again_from_the_broker_and_nowhere_else(
    redis_broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a worker whose pool process runs a stream's task
    worker, stream = running_one(redis_broker, redis_url, redis_client, notes, "y")
    (pid,) = wait_until(lambda: _pool(worker.pid), "the pool process", DEADLINE)
    # When that process is killed (the worker lives on): Celery gives the
    # message back to the broker, and the worker runs it again
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: runs(redis_client, notes) == {"y": 2}, "the second run", DEADLINE)
    # And the consumer waits on it for longer than a lease and than a queued
    # task may stay overtaken (the fault's length, not a pause for
    # synchronisation): the stream must see the second run held, and send no
    # copy of its own
    with pytest.raises(StreamEmpty):
        stream.get(timeout=DEFAULT_WORKER_LEASE + 12)
    redis_client.rpush(f"{notes}:gate", "go")
    # Then its outcome comes once, from two runs in all: nothing re-dispatched
    assert stream.get(timeout=DEADLINE) == ["y", worker.node]
    assert runs(redis_client, notes) == {"y": 2}
    assert stream.stats().redispatched == 0
    ends_here(stream)


def _pool(worker_pid: int) -> list[int]:
    children: list[int] = []
    for task in os.listdir(f"/proc/{worker_pid}/task"):
        with open(f"/proc/{worker_pid}/task/{task}/children") as listing:
            children.extend(int(pid) for pid in listing.read().split())
    return children


@pytest.mark.slow
def test_a_long_task_on_a_live_worker_runs_once_and_its_stall_is_explained(
    redis_broker: Broker,
    redis_url: str,
    redis_client: redis.Redis,
    notes: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a stream whose lost_after (5 s) is far shorter than its task, which
    # runs on a live worker for over twice the worker lease
    worker = redis_broker.worker("long", concurrency=1)
    worker.wait_ready(redis_broker.app)
    stream = OrderedResultStream(
        redis_broker.app, lost_after=5.0, task_options={"queue": redis_broker.queue}
    )
    stream.put(held_on, "long-", redis_url, notes, "slow")
    got: list[Any] = []
    with caplog.at_level(logging.WARNING, logger="celery_ordered"):
        consumer = threading.Thread(target=lambda: got.append(stream.get(timeout=DEADLINE)))
        consumer.start()  # it waits, and reclaims as it waits, all along
        try:
            held = wait_until(
                lambda: (
                    (stats := stream.stats()).blocker_started is not None
                    and stats.blocker_started > 2 * DEFAULT_WORKER_LEASE
                    and _warnings(caplog)
                    and stats
                ),
                "the task running for twice the worker lease, and a stall warning",
                DEADLINE,
            )
        finally:
            redis_client.rpush(f"{notes}:gate", "go")
            consumer.join(DEADLINE)
    # Then it ran once, its outcome came once, and nothing was re-dispatched
    assert got == [["slow", worker.node]]
    assert runs(redis_client, notes) == {"slow": 1}
    assert stream.stats().redispatched == 0
    # And the stats said where it ran; the consumer's one warning said so too
    assert (held.blocker_state, held.blocker_next_dispatch) == ("started", None)
    assert str(held.blocker_worker).startswith(worker.node)
    assert f"held by worker {worker.node}" in str(held.diagnosis)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert_stall_warning(warnings[0], f"number 0 is held by worker {worker.node}")
    assert "started" in warnings[0]
    ends_here(stream)


@pytest.mark.slow
def test_a_task_waiting_for_its_countdown_on_a_live_worker_runs_once(
    redis_broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a worker, and a stream whose first task has a countdown far longer
    # than a queued task may stay overtaken, and three tasks after it that the
    # worker receives and runs at once (its queue moves)
    redis_broker.worker("timer").wait_ready(redis_broker.app)
    stream = OrderedResultStream(redis_broker.app, task_options={"queue": redis_broker.queue})
    countdown = DEFAULT_OVERTAKEN_AFTER + 2 * DEFAULT_WORKER_LEASE
    stream.put(held_on.s("nobody-", redis_url, notes, 0).set(countdown=countdown))
    for i in range(1, 4):
        stream.put(held_on, "nobody-", redis_url, notes, i)
    # When the consumer reads them
    outcomes = take(stream, 4, time.monotonic() + countdown + DEADLINE)
    # Then the first came from its one run, when its countdown ran out: the
    # worker leased it while it waited in the worker's timer, so nothing was
    # sent again
    assert [value for value, _ in outcomes] == [0, 1, 2, 3]
    assert stream.stats().redispatched == 0
    assert runs(redis_client, notes) == {"0": 1, "1": 1, "2": 1, "3": 1}
    ends_here(stream)


@pytest.mark.slow
def test_a_task_waiting_for_its_rate_limit_on_a_live_worker_runs_once(
    redis_broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a worker that runs the task at most once every 12 s (its rate
    # limit), and four tasks of a stream it receives at once: the last three
    # wait in the worker's token bucket, the third (24 s) for longer than a
    # task may stay behind a later one of its queue that a worker received
    worker = redis_broker.worker("limited")
    worker.wait_ready(redis_broker.app)
    replies = redis_broker.app.control.rate_limit(
        held_on.name, "5/m", destination=[worker.node], reply=True, timeout=DEADLINE
    )
    assert replies, "the worker did not take the rate limit"
    stream = OrderedResultStream(redis_broker.app, task_options={"queue": redis_broker.queue})
    for i in range(4):
        stream.put(held_on, "nobody-", redis_url, notes, i)
    # When the consumer reads them
    outcomes = take(stream, 4, time.monotonic() + 2 * DEADLINE)
    # Then each came from its one run: the worker leased them while they
    # waited for their turn, so nothing was sent again
    assert [value for value, _ in outcomes] == [0, 1, 2, 3]
    assert stream.stats().redispatched == 0
    assert runs(redis_client, notes) == {"0": 1, "1": 1, "2": 1, "3": 1}
    ends_here(stream)


@pytest.mark.slow
def test_a_worker_started_without_worker_ready_leases_its_tasks(
    redis_broker: Broker, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    from celery.contrib.testing.worker import start_worker

    # Given a worker started in this process as celery.contrib.testing and
    # pytest-celery start theirs (a WorkController: no worker_ready signal),
    # running a stream's first task, held in its run
    app = redis_broker.app
    app.loader.import_module("tests.apps.liveness_tasks")
    stream = OrderedResultStream(app, task_options={"queue": redis_broker.queue})
    with start_worker(app, pool="solo", perform_ping_check=False, queues=[redis_broker.queue]):
        stream.put(first_run_held, redis_url, notes, 0)
        # Then its heartbeat starts with its first task, and leases it
        state, holder = wait_until(
            lambda: leases(redis_client, stream.name).get(0),
            "the in-process worker's lease on its task",
            DEADLINE,
        )
        assert (state, holder.rsplit(" ", 1)[1]) == ("started", str(os.getpid()))
        # And when a worker of the same queue that beats runs the tasks after
        # it (its queue moves) while the consumer waits longer than a number
        # may stay overtaken and a lease lasts (the fault's length, not a
        # pause for synchronisation)
        redis_broker.worker("other").wait_ready(app)
        for i in range(1, 4):
            stream.put(held_on, "nobody-", redis_url, notes, i)
        wait_until(lambda: len(runs(redis_client, notes)) == 4, "the other tasks", DEADLINE)
        with pytest.raises(StreamEmpty):
            stream.get(timeout=DEFAULT_OVERTAKEN_AFTER + DEFAULT_WORKER_LEASE)
        # Then nothing was sent again: the held task ran once
        redis_client.rpush(f"{notes}:gate", "go")
        outcomes = take(stream, 4, time.monotonic() + DEADLINE)
    assert [value for value, _ in outcomes] == [0, 1, 2, 3]
    assert runs(redis_client, notes) == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert stream.stats().redispatched == 0
    ends_here(stream)


# -- queued work that no worker takes ----------------------------------------------------


def _drop_messages(client: redis.Redis, queue: str, numbers: set[int]) -> int:
    """Delete from a Redis broker's queue the messages of the given stream numbers."""
    dropped = 0
    for raw in client.lrange(queue, 0, -1):
        if json.loads(raw)["headers"].get("co_seq") in numbers:
            dropped += client.lrem(queue, 1, raw)
    return dropped


@pytest.mark.slow
def test_messages_lost_from_a_moving_queue_are_sent_again_soon(
    redis_broker: Broker, redis_client: redis.Redis
) -> None:
    # Given ten tasks queued (no worker yet), two of whose messages are then
    # deleted from the broker
    stream = OrderedResultStream(redis_broker.app, task_options={"queue": redis_broker.queue})
    for i in range(10):
        stream.put(echo, i)
    assert _drop_messages(redis_client, redis_broker.queue, {3, 4}) == 2
    # When a worker comes and takes the others (default settings: lost_after
    # is an hour, and must not be what heals this)
    redis_broker.worker("moving").wait_ready(redis_broker.app)
    started = time.monotonic()
    # Then the two lost ones are overtaken by the later numbers of their
    # queue, and sent again: all ten arrive, in order, within the bound
    assert take(stream, 10, started + BOUND) == list(range(10))
    healed = time.monotonic() - started
    print(f"\nmessages lost from a moving queue: all outcomes {healed:.1f} s later")
    assert stream.stats().redispatched == 2
    ends_here(stream)


def test_a_consumer_polling_with_get_timeout_zero_still_gives_up_on_lost_work(
    worker: Worker, make_stream: Any, redis_client: redis.Redis
) -> None:
    # Given a task routed to a queue no worker consumes, on a stream that
    # gives up on a number at once once it is overdue
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    stream = make_stream(lost_after=0.5, max_redispatches=0)
    try:
        stream.put(echo.s("lost").set(queue=queue))
        stream.put(echo, "after")

        # When its consumer only ever polls, never waiting out a slice
        def polled() -> tuple[str, Any] | None:
            try:
                return ("value", stream.get(timeout=0))
            except StreamEmpty:
                return None
            except ResultLost as exc:
                return ("lost", exc)

        # Then the polls reclaim as a waiting consumer does (before, they never
        # did: the stream waited for ever), and the stream goes on
        kind, outcome = wait_until(polled, "ResultLost at number 0, by polling")
        assert (kind, outcome.seq) == ("lost", 0), outcome
        assert wait_until(polled, "the outcome after it, by polling") == ("value", "after")
    finally:
        redis_client.delete(queue)


@pytest.mark.slow
def test_the_stall_warning_names_a_queue_nobody_serves(
    worker: Worker, make_stream: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a task routed to a queue no worker consumes (a worker runs, on
    # another queue)
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    stream = make_stream()
    try:
        stream.put(echo.s("lost").set(queue=queue))
        # When the consumer waits for it past the stall warning's threshold
        with caplog.at_level(logging.WARNING, logger="celery_ordered"), pytest.raises(StreamEmpty):
            stream.get(timeout=DEFAULT_STALL_WARNING + 5)
        # Then it logged one warning: the number, its queue, that nobody
        # consumes that queue, and when it is dispatched again
        warnings = _warnings(caplog)
        assert len(warnings) == 1, warnings
        assert_stall_warning(warnings[0], f"number 0 is queued on queue '{queue}'")
        assert "it is dispatched again in 59 min" in warnings[0]
        assert f"Likely cause: no worker consumes queue '{queue}'" in warnings[0]
        assert worker.node in warnings[0]  # the workers that answered, and their queues
        # And stats() and `celery ordered inspect` tell the same
        stats = stream.stats()
        assert (stats.blocker_state, stats.blocker_queue) == ("queued", queue)
        assert 3500 < (stats.blocker_next_dispatch or 0) < 3600
        shown = run_ordered("inspect", stream.name)
        assert shown.exit_code == 0, shown.output
        assert f"waits on      number 0 is queued on queue '{queue}'" in shown.output
    finally:
        redis_client.delete(queue)


@pytest.mark.slow
def test_the_stall_warning_names_workers_that_publish_to_another_redis(
    redis_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker whose ordered_redis_url names another Redis than the stream's
    with RedisServer() as elsewhere:
        worker = redis_broker.worker("astray", extra_env={"CO_TEST_REDIS_URL": elsewhere.url})
        try:
            wait_answering(redis_broker.app, [worker], DEADLINE)
            stream = OrderedResultStream(
                redis_broker.app, task_options={"queue": redis_broker.queue}
            )
            stream.put(echo, "astray")
            # When the consumer waits for its outcome past the threshold
            with (
                caplog.at_level(logging.WARNING, logger="celery_ordered"),
                pytest.raises(StreamEmpty),
            ):
                stream.get(timeout=DEFAULT_STALL_WARNING + 5)
            # Then its one warning says the workers publish to another Redis
            (warning,) = _warnings(caplog)
            assert (
                f"the workers that consume queue '{redis_broker.queue}' publish to another Redis"
                in warning
            )
            assert f"{worker.node} publishes to {elsewhere.url}" in warning
            # And the worker's own log names the Redis it published to
            assert f"in the Redis at {elsewhere.url}" in worker.output()
            assert "outcome dropped" in worker.output()
            stream.delete()
        finally:
            worker.stop()  # before its Redis


# -- hedging (opt-in) ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_hedging_stream_sends_one_backup_of_a_straggler_and_keeps_the_first_outcome(
    worker: Worker, make_stream: Any, redis_url: str, redis_client: redis.Redis, notes: str
) -> None:
    # Given a hedging stream: sixteen quick tasks, a straggler whose first run
    # hangs, and three more
    stream = make_stream(hedge=True, window=40)
    for i in range(16):
        stream.put(held_on, "nobody-", redis_url, notes, i)
    stream.put(first_run_held, redis_url, notes, "straggler")
    for i in range(16, 19):
        stream.put(held_on, "nobody-", redis_url, notes, i)
    stream.close()
    # When the consumer reads it, the straggler's first run still hanging
    outcomes = take(stream, 20, time.monotonic() + DEADLINE)
    # Then a backup copy ran and its outcome came out in place
    assert [value for value, _ in outcomes] == [*range(16), "straggler", 16, 17, 18]
    assert runs(redis_client, notes)["straggler"] == 2
    assert stream.stats().hedged == 1
    # And when the first run ends, its outcome is dropped
    redis_client.rpush(f"{notes}:gate", "go")
    wait_until(
        lambda: [e for e in events(redis_client, notes) if e[:2] == ("end", "straggler")][1:],
        "the first run ending",
        DEADLINE,
    )
    assert list(stream) == []
    assert stream.stats().hedged == 1


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("ordered_overtaken_after", 0, "ordered_overtaken_after must be a finite number"),
        ("ordered_stall_warning", "30", "ordered_stall_warning must be a finite number"),
        ("ordered_consumer_linger", -0.01, "ordered_consumer_linger must be a finite number"),
        ("ordered_hedge", "yes", "app.conf.ordered_hedge must be False, True"),
        ("ordered_hedge", 1, "app.conf.ordered_hedge must be False, True"),
    ],
)
def test_liveness_settings_are_checked_when_a_stream_reads_them(
    app: Celery, setting: str, value: Any, message: str
) -> None:
    saved = app.conf.get(setting)
    app.conf[setting] = value
    try:
        with pytest.raises(ConfigurationError, match=message):
            OrderedResultStream(app)
    finally:
        app.conf[setting] = saved


def test_a_bad_hedge_argument_is_refused_at_the_call(make_stream: Any) -> None:
    with pytest.raises(ValueError, match=r"hedge must be False, True .* or a number above 1"):
        make_stream(hedge=0.5)


def test_a_bad_worker_lease_stops_the_heartbeat_with_a_clear_error(app: Celery) -> None:
    from celery_ordered.liveness import Heartbeat

    saved = app.conf.get("ordered_worker_lease")
    app.conf.ordered_worker_lease = -1
    try:
        with pytest.raises(ConfigurationError, match="ordered_worker_lease must be"):
            Heartbeat(app, "w@h")
    finally:
        app.conf.ordered_worker_lease = saved


def test_a_tasks_lane_follows_celerys_router_even_when_it_reads_the_arguments() -> None:
    # Given an app whose routes map one task by name, and route another by its argument
    from celery import Celery

    from celery_ordered.liveness import lane_of

    def by_argument(name: str, args: Any, kwargs: Any, options: Any, **_: Any) -> Any:
        if name == "jobs.split":
            return {"queue": "big" if args[0] > 10 else "small"}
        return None

    app = Celery("lanes", set_as_current=False)
    app.conf.task_routes = ({"jobs.mapped": {"queue": "mapped"}}, by_argument)
    # Then each dispatch gets the queue Celery would send it to, item by item
    assert [lane_of(app, "jobs.split", (n,), {}, {}) for n in (1, 99, 2)] == [
        "small",
        "big",
        "small",
    ]
    assert lane_of(app, "jobs.mapped", (1,), {}, {}) == "mapped"
    assert lane_of(app, "jobs.mapped", (1,), {}, {"queue": "chosen", "priority": 3}) == "chosen@3"
    # And with mapping routes only, the remembered lane still follows the options
    mapped_only = Celery("lanes-mapped", set_as_current=False)
    mapped_only.conf.task_routes = {"jobs.mapped": {"queue": "mapped"}}
    assert lane_of(mapped_only, "jobs.mapped", (1,), {}, {}) == "mapped"
    assert lane_of(mapped_only, "jobs.mapped", (2,), {}, {"queue": "other"}) == "other"
    assert lane_of(mapped_only, "jobs.other", (2,), {}, {}) == "celery"
