"""A stream's life and death: deletion, wipes, expiry of every key, one consumer
at a time (fencing), a producer that fails, and exceptions that must not pass
through ``except Exception``. Real Redis, real workers, real processes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_ordered import (
    OrderedResultStream,
    RedisServer,
    StreamEmpty,
    StreamNotFound,
    StreamStateLost,
    TaskFailed,
    codec,
)
from celery_ordered.errors import ConsumerFenced, ProducerFailed, StreamDeleted
from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import Protocol
from tests.apps.tasks import echo, gate
from tests.apps.topologyapp import topology_app
from tests.support import ROOT
from tests.support.waiting import wait_until

# How long a wait that must end "at once" may take: one blocking slice of 2 s
# plus a wide margin for a loaded CI machine, far below the get() timeouts.
AT_ONCE = 8.0


def in_thread(call: Callable[[], Any]) -> queue.Queue[tuple[str, Any, float]]:
    """Run ``call`` in a thread; its ("ok"|"error", value, seconds) lands in the queue."""
    out: queue.Queue[tuple[str, Any, float]] = queue.Queue()

    def run() -> None:
        began = time.monotonic()
        try:
            out.put(("ok", call(), time.monotonic() - began))
        except BaseException as exc:
            out.put(("error", exc, time.monotonic() - began))

    threading.Thread(target=run, daemon=True).start()
    return out


# -- deletion (issue 11 item 8) --------------------------------------------------


def test_a_consumer_waiting_on_a_deleted_stream_is_told_it_was_deleted(make_stream, app):
    stream = make_stream(window=4)
    stream.put("first")
    assert stream.get(timeout=5) == "first"
    waiting = in_thread(lambda: stream.get(timeout=60))
    with pytest.raises(queue.Empty):
        waiting.get(timeout=0.3)  # it waits for the next outcome
    OrderedResultStream(app, stream.name, create=False).delete()  # celery ordered purge
    kind, error, took = waiting.get(timeout=60)
    assert kind == "error"
    assert isinstance(error, StreamDeleted), error
    assert isinstance(error, StreamStateLost)  # existing handlers still catch it
    assert f"stream {stream.name!r} was deleted" in str(error)
    assert "failover" not in str(error)
    assert took < AT_ONCE


def test_get_and_join_after_delete_raise_at_once_and_write_nothing(make_stream, redis_client):
    stream = make_stream(window=4)
    stream.put("never read")
    stream.delete()
    began = time.monotonic()
    with pytest.raises(StreamDeleted, match="was deleted"):
        stream.get(timeout=30)  # waited the whole timeout (forever without one)
    with pytest.raises(StreamDeleted, match="was deleted"):
        stream.join(timeout=30)
    with pytest.raises(StreamDeleted):
        stream.put("more")
    with pytest.raises(StreamDeleted):
        stream.close()
    assert time.monotonic() - began < AT_ONCE
    assert not list(redis_client.scan_iter(f"co:{{{stream.name}}}:*"))


def test_a_stream_created_again_under_its_name_refuses_the_old_handles(make_stream, app):
    old = make_stream(window=4)
    old.put("old")
    old.delete()
    new = OrderedResultStream(app, old.name, window=4)
    new.put("new")
    with pytest.raises(StreamDeleted):
        old.put("into the new one")
    with pytest.raises(StreamDeleted):
        old.get(timeout=5)
    new.close()
    assert list(new) == ["new"]


def test_an_old_handle_neither_reclaims_nor_hedges_in_a_stream_created_again(redis_client):
    # Given a stream deleted and created again under its name, its number 0
    # overdue at once, and a handle still open on the first incarnation
    name = f"test-{uuid.uuid4().hex}"
    record = b'qcelery:T:application/json:utf-8:{"task": "t", "args": [], "kwargs": {}}'
    old = Protocol(redis_client, name, ttl=60)
    old.open(uuid.uuid4().hex, create=True, window=8)
    try:
        old.delete()
        new = Protocol(redis_client, name, ttl=60)
        new.open(uuid.uuid4().hex, create=True, window=8)
        new.claim([record], 8, producer="p", claim_id="c", lost_after=0.001)
        assert new.note_runtimes(new.incarnation, [0.01, 0.02]) == 2
        state = {key: redis_client.dump(key) for key in new.keys.all()}
        # When the old handle reclaims lost work, or checks for a straggler to back up
        # Then it is told the stream was deleted, and writes nothing into the new one
        # (it would have re-sent the number, its copy refused by the new incarnation,
        # and put the new consumer's own reclaim of it off by an hour)
        with pytest.raises(StreamDeleted):
            old.reclaim(0.001, 3)
        with pytest.raises(StreamDeleted):
            old.hedge(0, 1.0, 3600.0, 2)
        assert {key: redis_client.dump(key) for key in new.keys.all()} == state
        # And the new incarnation's own handle reclaims its overdue number
        overdue = wait_until(lambda: new.reclaim(0.001, 3), "number 0 overdue", AT_ONCE)
        assert [item.seq for item in overdue] == [0]
    finally:
        redis_client.delete(*StreamKeys(name).all())


def test_a_stream_fed_by_many_short_lived_producers_forgets_their_old_claims(redis_client):
    # Given a long-lived stream fed by a new handle per request: one producer
    # id each, 1,500 of them, whose last claims were made over ten minutes ago
    name = f"test-{uuid.uuid4().hex}"
    proto = Protocol(redis_client, name, ttl=60)
    proto.open(uuid.uuid4().hex, create=True, window=64)
    marker = b'0:M:application/json:utf-8:"m"'
    k = proto.keys
    try:
        old_ms = int(redis_client.time()[0]) * 1000 - 11 * 60_000
        redis_client.hset(
            k.producers, mapping={f"gone-{i}": f"c{i}:{i}:1:{old_ms}" for i in range(1500)}
        )
        # When new producers claim
        recent = [f"recent-{i}" for i in range(20)]
        for producer in recent:
            proto.claim([marker], 64, producer=producer, claim_id="c", lost_after=60)
        # Then the old claims are forgotten down to about a thousand, the
        # recent ones kept: a retry of any of them still gets its numbers back
        kept = {field.decode() for field in redis_client.hkeys(k.producers)}
        assert set(recent) <= kept
        assert len(kept) <= 1000 + len(recent), len(kept)
        again = proto.claim([marker], 64, producer="recent-0", claim_id="c", lost_after=60)
        assert (again.first, again.count) == (0, 1)
    finally:
        redis_client.delete(*StreamKeys(name).all())


# -- wipes (issue 11 items 9 and 10) -----------------------------------------------


@pytest.fixture
def wiped_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private Redis without persistence, and a way to restart it empty."""
    state: dict[str, Any] = {"server": RedisServer(directory=str(tmp_path)).start()}

    def wipe() -> None:
        state["server"].stop()
        state["server"] = RedisServer(directory=str(tmp_path)).start()

    state["wipe"] = wipe
    try:
        yield state
    finally:
        state["server"].stop()


def test_a_put_after_a_redis_wipe_writes_nothing_so_no_wrong_value_comes_out(
    wiped_redis: dict[str, Any], redis_client: redis.Redis
) -> None:
    # Given three outcomes in a Redis without persistence
    queue_name = f"nobody-{uuid.uuid4().hex[:8]}"
    app = topology_app(wiped_redis["server"].url, queue_name)
    name = f"test-wipe-{uuid.uuid4().hex}"
    producer = OrderedResultStream(app, name, window=8, lost_after=0.2)
    for i in range(3):
        producer.put(i)  # outcomes published at once, as finished tasks'
    producer.join(timeout=10)
    try:
        # When that Redis restarts empty and the producer goes on
        wiped_redis["wipe"]()
        with pytest.raises(StreamStateLost), producer:
            producer.put(echo, 7)
        # Then nothing was claimed, recorded or closed in the empty Redis (the
        # number claimed there kept its dispatch record, a consumer's reclaim
        # sent it again and close() sealed the stream at 1 claim: a fresh
        # consumer was handed 49 at position 0 and a normal end)
        fresh = redis.Redis.from_url(app.conf.ordered_redis_url)
        assert list(fresh.scan_iter(f"co:{{{name}}}:*")) == []
        with pytest.raises(StreamNotFound):
            OrderedResultStream(app, name, create=False)
        assert redis_client.llen(queue_name) == 0  # and nothing was sent
    finally:
        redis_client.delete(queue_name)


def test_a_consumer_that_saw_the_end_raises_when_redis_is_wiped(
    wiped_redis: dict[str, Any], redis_client: redis.Redis
) -> None:
    # Given a consumer that has seen the stream closed at 3 claims, waiting
    # for outcome 0 (its task queued where no worker takes it)
    queue_name = f"nobody-{uuid.uuid4().hex[:8]}"
    app = topology_app(wiped_redis["server"].url, queue_name)
    name = f"test-wipe-{uuid.uuid4().hex}"
    try:
        producer = OrderedResultStream(app, name, window=8)
        for i in range(3):
            producer.put(echo, i)
        producer.close()
        consumer = OrderedResultStream(app, name, create=False)
        with pytest.raises(StreamEmpty):
            consumer.get(timeout=0.2)
        waiting = in_thread(lambda: consumer.get(timeout=60))
        # When Redis is wiped under it (it now says 0 claims, open)
        wiped_redis["wipe"]()
        # Then it raises StreamStateLost at once instead of waiting forever
        kind, error, took = waiting.get(timeout=90)
        assert kind == "error"
        assert isinstance(error, StreamStateLost), error
        assert took < 30  # the client's own reconnection retries included
    finally:
        redis_client.delete(queue_name)


# -- every key expires (issue 11 item 11) --------------------------------------------


@pytest.mark.usefixtures("worker")
def test_every_key_of_a_finished_stream_carries_the_ttl(make_stream, redis_client):
    stream = make_stream(window=4)
    stream.put(echo, 1)
    stream.put("marker")
    stream.close()
    stream.join(timeout=60)
    stream.join(timeout=60)  # a second join puts the done token back
    assert list(stream) == [1, "marker"]
    keys = sorted(redis_client.scan_iter(f"co:{{{stream.name}}}:*"))
    assert StreamKeys(stream.name).done.encode() in keys
    ttls = {key.decode(): redis_client.pttl(key) for key in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls


@pytest.mark.usefixtures("worker")
def test_frequent_puts_renew_the_expiry_once_in_a_while_and_new_keys_get_it_at_once(
    make_stream, redis_client, redis_url
):
    # Given a stream whose producer has just claimed (which renewed every key),
    # and whose claimed numbers left nothing in `pending` (every number filled,
    # delivered and acknowledged: the acknowledging pop removes what is left)
    stream = make_stream(window=100)
    stream.put("first")
    assert stream.get(timeout=30) == "first"
    stream.ack()
    k = StreamKeys(stream.name)
    redis_client.pexpire(k.window, 60_000)
    assert redis_client.exists(k.pending) == 0
    gate_key = f"co-test-gate:{uuid.uuid4().hex}"
    try:
        # When it puts a task again within the renewal interval
        stream.put(gate, redis_url, gate_key, "second")
        # Then that claim renewed nothing: the window keeps its shorter life
        assert 0 < redis_client.pttl(k.window) <= 60_000
        # And the key it created, the task's record, lives the stream's TTL too
        assert redis_client.exists(k.pending) == 1
        keys = redis_client.scan_iter(f"co:{{{stream.name}}}:*")
        ttls = {key.decode(): redis_client.pttl(key) for key in keys}
        assert all(ttl > 0 for ttl in ttls.values()), ttls
    finally:
        redis_client.rpush(gate_key, 1)
        redis_client.expire(gate_key, 10)
    assert stream.get(timeout=30) == "second"


def test_attaching_only_to_look_does_not_keep_an_abandoned_stream_alive(
    make_stream, redis_client, app
):
    # Given a stream left alone, its keys a minute from expiring
    stream = make_stream(window=4)
    stream.put("marker")
    keys = sorted(redis_client.scan_iter(f"co:{{{stream.name}}}:*"))
    for key in keys:
        redis_client.pexpire(key, 60_000)
    # When something attaches only to look at it (create=False, as `ordered
    # inspect`, `ordered ls` and a web view following a job do)
    looker = OrderedResultStream(app, stream.name, create=False)
    assert looker.stats().claimed == 1
    # Then no key got a longer life
    ttls = {key.decode(): redis_client.pttl(key) for key in keys}
    assert all(0 < ttl <= 60_000 for ttl in ttls.values()), ttls


def _age(redis_client: redis.Redis, name: str, ms: int) -> list[bytes]:
    """Give every key of stream ``name`` ``ms`` to live (as if unused that long); its keys."""
    keys = sorted(redis_client.scan_iter(f"co:{{{name}}}:*"))
    for key in keys:
        redis_client.pexpire(key, ms)
    return keys


@pytest.mark.parametrize("waiter", ["get", "join"])
def test_waiting_on_a_queued_task_keeps_every_key_of_the_stream_alive(
    waiter, make_stream, redis_client, app
):
    # Given a closed stream whose task waits in a queue no worker serves, its
    # keys a minute from expiring (it waited that long)
    stream = make_stream(window=4)
    stream.put(echo.s("late").set(queue=f"nobody-{uuid.uuid4().hex[:6]}"))
    stream.close()
    keys = _age(redis_client, stream.name, 60_000)
    k = StreamKeys(stream.name)
    assert {k.pending.encode(), k.deadlines.encode()} <= set(keys)
    # When another handle waits for it: a consumer's get(), or join()
    handle = OrderedResultStream(app, stream.name, create=False)
    if waiter == "get":
        with pytest.raises(StreamEmpty):
            handle.get(timeout=0.5)
    else:
        handle.join(timeout=0.5)
    # Then every key lives the stream's TTL again (but a wake token the wait
    # took), the task's record and its deadline included: a task that runs
    # later still finds its number waiting (a record that expired made its
    # outcome look like a duplicate, dropped, and left nothing to dispatch
    # again: a stall no timeout ended)
    ttls = {key.decode(): redis_client.pttl(key) for key in keys if key != k.ready.encode()}
    assert {k.pending, k.deadlines} <= set(ttls)
    assert all(ttl > 60_000 for ttl in ttls.values()), ttls


@pytest.mark.usefixtures("worker")
def test_a_running_tasks_heartbeat_keeps_every_key_of_the_stream_alive(
    make_stream, redis_client, redis_url, gate_key
):
    # Given a closed stream whose task runs on a worker, held there (a gate)
    stream = make_stream(window=4)
    stream.put(gate, redis_url, gate_key, "ran")
    stream.close()
    wait_until(lambda: stream.stats().blocker_state == "started", "the worker holds the task")
    # When its keys come a minute from expiring, while nothing but the
    # worker's heartbeat uses the stream (the producer only joins)
    keys = _age(redis_client, stream.name, 60_000)
    k = StreamKeys(stream.name)
    # Then the worker's next heartbeat gives every key the stream's TTL again,
    # its number and incarnation included: the outcome finds the stream
    wait_until(lambda: redis_client.pttl(k.created) > 60_000, "a heartbeat renewing the stream", 30)
    ttls = {key.decode(): redis_client.pttl(key) for key in keys}
    assert all(ttl > 60_000 for ttl in ttls.values()), ttls
    redis_client.rpush(gate_key, 1)
    stream.join(timeout=60)
    assert list(stream) == ["ran"]


# -- one consumer at a time (issue 11 item 13) -----------------------------------------


def test_a_second_consumer_waits_as_a_standby_instead_of_skipping(make_stream, app):
    stream = make_stream(window=50, ack_every=1)
    for i in range(10):
        stream.put(i)
    stream.close()
    assert [stream.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    second = OrderedResultStream(app, stream.name, create=False)
    with pytest.raises(StreamEmpty, match=r"another consumer .* holds its consumer lease"):
        second.get(timeout=0.5)
    # The first goes on undisturbed; the second took nothing from it
    assert list(stream) == list(range(3, 10))


def test_takeover_fences_the_first_consumer_and_skips_nothing(make_stream, app):
    stream = make_stream(window=50, ack_every=2)
    for i in range(20):
        stream.put(i)
    stream.close()
    first_got = [stream.get(timeout=5) for _ in range(5)]  # acknowledged below 4
    successor = OrderedResultStream(app, stream.name, create=False, takeover=True)
    rest = list(successor)
    # The first one learns it was fenced at its next round trip: before it, it
    # may hand out fewer than ack_every outcomes it had read ahead (as a
    # fenced Kafka consumer processes what it fetched), never skip any
    extra = []
    message = ""
    while len(extra) < 20:
        try:
            extra.append(stream.get(timeout=5))
        except ConsumerFenced as fenced:
            message = str(fenced)
            break
    assert message.startswith(f"stream {stream.name!r}: another consumer")
    assert extra == list(range(5, 5 + len(extra)))
    assert len(extra) < 2
    with pytest.raises(ConsumerFenced):  # and it stays fenced
        next(stream)
    # Nothing skipped: the successor starts where the first one acknowledged,
    # so at most the unacknowledged outcomes are handed out twice
    assert first_got == [0, 1, 2, 3, 4]
    assert rest == list(range(4, 20))


def test_a_successor_takes_over_once_the_first_consumers_lease_lapses(make_stream, app):
    stream = make_stream(window=50, ack_every=1, consumer_lease=0.5)
    for i in range(6):
        stream.put(i)
    stream.close()
    assert [stream.get(timeout=5) for _ in range(2)] == [0, 1]
    # The first consumer stops calling get; a standby waits in get() for the
    # lease to lapse, then goes on where the first one acknowledged
    successor = OrderedResultStream(app, stream.name, create=False)
    began = time.monotonic()
    assert successor.get(timeout=30) == 1  # the one in the first one's hand, again
    assert time.monotonic() - began < AT_ONCE
    assert list(successor) == [2, 3, 4, 5]
    with pytest.raises(ConsumerFenced):
        stream.get(timeout=5)  # ack_every=1: at its very next get


def test_release_hands_the_stream_to_a_standby_at_once(make_stream, app):
    stream = make_stream(window=50, ack_every=10)
    for i in range(6):
        stream.put(i)
    stream.close()
    assert [stream.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    standby = OrderedResultStream(app, stream.name, create=False)
    waiting = in_thread(lambda: [standby.get(timeout=60) for _ in range(3)])
    with pytest.raises(queue.Empty):
        waiting.get(timeout=0.3)
    stream.release()  # acknowledges 0-2 and gives the lease up
    kind, got, took = waiting.get(timeout=60)
    assert (kind, got) == ("ok", [3, 4, 5])
    assert took < AT_ONCE


def test_two_live_consumers_never_skip_silently(make_stream, app):
    # The reported case: two handles consuming one name, one got 600, the
    # other 18 then a normal end (582 skipped without an error).
    stream = make_stream(window=700, ack_every=5)
    for i in range(600):
        stream.put(i)
    stream.close()
    handles = [stream, OrderedResultStream(app, stream.name, create=False)]
    got: list[list[Any]] = [[], []]
    ends: list[str] = ["", ""]

    def consume(index: int) -> None:
        handle = handles[index]
        while True:
            try:
                got[index].append(handle.get(timeout=2))
            except StopIteration:
                ends[index] = "end"
                return
            except Exception as exc:
                ends[index] = type(exc).__name__
                if type(exc).__name__ == "StreamExhausted":
                    ends[index] = "end"
                return

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # Whoever ended normally was handed every outcome from 0 on, in order;
    # the other one waited (StreamEmpty) or was fenced, never cut short
    assert "end" in ends
    for index in (0, 1):
        if ends[index] == "end":
            assert got[index] == list(range(600))
        else:
            assert ends[index] in ("StreamEmpty", "ConsumerFenced")
            assert got[index] == list(range(len(got[index])))


CONSUMER_THAT_DIES = textwrap.dedent(
    """
    import sys
    import redis
    from celery_ordered import OrderedResultStream
    from tests.apps.celeryapp import app, REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    stream = OrderedResultStream(app, sys.argv[1], ack_every=1, consumer_lease=1.0)
    for item in stream:
        client.rpush(sys.argv[2], item)
        if item == 4:
            client.rpush(sys.argv[2] + ":paused", 1)
            client.blpop([sys.argv[2] + ":never"])  # hangs here, item 4 in hand
    """
)


def test_a_sigkilled_consumers_successor_takes_over_after_its_lease(make_stream, redis_client, app):
    name = f"test-{uuid.uuid4().hex}"
    stream = make_stream(name=name, window=50)
    for i in range(10):
        stream.put(i)
    stream.close()
    seen_key = f"seen-{uuid.uuid4().hex}"
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_THAT_DIES, name, seen_key], cwd=ROOT
    )
    try:
        assert redis_client.blpop([f"{seen_key}:paused"], timeout=60) is not None
        consumer.kill()
        consumer.wait(timeout=30)
        successor = OrderedResultStream(app, name, create=False)
        assert list(successor) == list(range(4, 10))  # the item in hand again, then on
    finally:
        if consumer.poll() is None:
            consumer.kill()
        redis_client.delete(seen_key, f"{seen_key}:paused")


# -- a failed producer (issue 13 item 3) -------------------------------------------------

FAILING_PRODUCER = textwrap.dedent(
    """
    import sys
    from celery_ordered import OrderedResultStream
    from tests.apps.celeryapp import app
    from tests.apps.tasks import echo, gate

    def rows():
        yield 1
        yield 2
        raise ValueError("row 3 is corrupt")

    stream = OrderedResultStream(app, sys.argv[1])
    with stream:
        for row in rows():
            stream.put(echo, row)
    """
)


@pytest.mark.usefixtures("worker")
def test_a_producer_that_fails_in_another_process_ends_the_stream_with_its_error(make_stream):
    stream = make_stream(window=8)
    died = subprocess.run(
        [sys.executable, "-c", FAILING_PRODUCER, stream.name],
        cwd=ROOT, capture_output=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert died.returncode == 1
    assert b"row 3 is corrupt" in died.stderr
    assert stream.get(timeout=30) == 1
    assert stream.get(timeout=30) == 2
    with pytest.raises(ProducerFailed, match="ValueError: row 3 is corrupt") as failed:
        stream.get(timeout=30)
    assert failed.value.exc_type == "ValueError"
    assert "line 10, in rows" in failed.value.stack_trace  # the producer's traceback
    assert "row 3 is corrupt" in str(failed.value.__cause__)


def test_close_with_an_error_is_checked_and_recorded_only_by_the_first_close(make_stream):
    stream = make_stream(window=8)
    with pytest.raises(TypeError, match=r"close\(error=...\) takes the exception"):
        stream.close(error="it broke")  # type: ignore[arg-type]
    stream.put("a")
    stream.close(error=KeyboardInterrupt())
    stream.close()  # idempotent: the stream stays failed
    assert stream.get(timeout=5) == "a"
    with pytest.raises(ProducerFailed, match="KeyboardInterrupt"):
        stream.get(timeout=5)


# -- exceptions that must not pass through ``except Exception`` (issue 11 item 16) ------


@pytest.mark.parametrize(
    ("module", "name"),
    [("builtins", "SystemExit"), ("builtins", "KeyboardInterrupt"), ("builtins", "GeneratorExit")],
)
def test_a_planted_base_exception_outcome_is_rebuilt_as_task_failed(
    make_stream, redis_client, module, name
):
    stream = make_stream(window=4)
    proto = Protocol(redis_client, stream.name)
    proto.incarnation = stream._proto.incarnation
    seq = stream.producer.claim(b"0:M:application/json:utf-8:{}", timeout=5)
    payload = {"exc_type": name, "exc_module": module, "exc_message": [3],
               "stack_trace": "worker traceback", "task_name": "tests.apps.tasks.echo"}  # fmt: skip
    body = json.dumps(payload).encode()
    assert proto.publish(seq, b"%d:e:application/json:utf-8:%s" % (seq, body)) == 1
    with pytest.raises(Exception) as caught:  # noqa: PT011 - caught here, not past it
        stream.get(timeout=5)
    assert isinstance(caught.value, TaskFailed)
    assert caught.value.exc_type == name
    assert caught.value.stack_trace == "worker traceback"


def test_a_pickled_base_exception_is_not_rebuilt_either() -> None:
    payload = {"exc_type": "SystemExit", "exc_module": "builtins", "exc_message": [0],
               "stack_trace": "", "task_name": "t", "exc": SystemExit(0)}  # fmt: skip
    rebuilt = codec.rebuild_exception(payload, stream="s", seq=0)
    assert isinstance(rebuilt, TaskFailed)
