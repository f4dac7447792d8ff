"""The invariants of docs/how-it-works.md, checked with real workers and real Redis.

1. Every claimed number is eventually filled.
2. ``seq - next <= window`` at every moment (here seen from the workers' side).
3. A result for a number already filled, or delivered, is dropped.
4. Consumer memory is O(window).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
from celery import Signature
from celery.exceptions import NotRegistered, TaskRevokedError, TimeLimitExceeded

from celery_ordered import DispatchError, ResultLost, StreamEmpty, StreamExhausted
from celery_ordered.redis.keys import StreamKeys
from celery_ordered.redis.protocol import Protocol
from celery_ordered.task import HEADER_SEQ, HEADER_SERIALIZER, HEADER_STREAM
from tests.apps import held
from tests.apps.tasks import CustomError, die_once, echo, fail, gate, record_start
from tests.support import ROOT
from tests.support.processes import descendants

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture
def temp_keys(redis_client: redis.Redis) -> Any:
    """Make scratch key names; they are removed after the test."""
    made: list[str] = []

    def make(kind: str) -> str:
        key = f"co-test-{kind}:{uuid.uuid4().hex}"
        made.append(key)
        return key

    yield make
    for key in made:
        if key.startswith("co-test-gate:") and not redis_client.exists(key):
            # A gate the test may have left shut: open it so no worker stays
            # blocked (the token expires if nothing takes it).
            redis_client.rpush(key, 1)
            redis_client.expire(key, 10)
        else:
            redis_client.delete(key)


def next_outcome(stream: Any, timeout: float) -> Any:
    """The next outcome: its value, or the exception raised at its position.

    Fails the test if nothing arrives in time: the stream stalled.
    """
    try:
        return stream.get(timeout=timeout)
    except StreamEmpty:
        pytest.fail(f"stream {stream.name}: nothing arrived within {timeout}s, it stalled")
    except Exception as exc:
        return exc


def stream_keys(client: redis.Redis, name: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"co:{{{name}}}:*"))


# -- invariant 2: the window, from the workers' side ---------------------------------


def test_window_holds_from_the_workers_side(make_stream, redis_client, redis_url, temp_keys):
    window, count = 6, 120
    consumer = make_stream(window=window)
    # The producer is another handle on the stream, as another process would
    # be: it knows nothing of what the consumer has taken but what Redis says.
    producer = make_stream(name=consumer.name)
    progress_key, log_key = temp_keys("progress"), temp_keys("log")
    redis_client.set(progress_key, 0)

    def produce() -> None:
        for i in range(count):
            # Every tenth task is slow and holds the head of the stream, so
            # the producer runs up to the edge of the window behind it.
            seconds = 0.1 if i % 10 == 0 else 0.002
            producer.put(record_start, redis_url, progress_key, log_key, i, seconds)
        producer.close()

    with ThreadPoolExecutor(1) as pool:
        producing = pool.submit(produce)
        taken = 0
        for value in consumer:
            assert value == taken
            taken += 1
            redis_client.set(progress_key, taken)
        producing.result(timeout=60)

    assert taken == count
    starts = [tuple(map(int, e.split(b":"))) for e in redis_client.lrange(log_key, 0, -1)]
    assert sorted(i for i, _ in starts) == list(range(count))
    # Task i may start only once the consumer has taken i - window + 1 outcomes.
    slack = {i: progress - (i - window + 1) for i, progress in starts}
    assert min(slack.values()) >= 0, {i: s for i, s in slack.items() if s < 0}
    # And the bound is tight: some task started exactly at the edge, so a
    # window one larger than promised would have been caught.
    assert min(slack.values()) == 0


# -- invariant 4: memory O(window) ----------------------------------------------------


def test_consumer_memory_and_redis_hold_at_most_a_window(make_stream, redis_client):
    window, count = 32, 2000
    consumer = make_stream(window=window)
    producer = make_stream(name=consumer.name)
    proto = Protocol(redis_client, consumer.name)
    results_key = StreamKeys(consumer.name).results

    def produce() -> None:
        for i in range(count):
            producer.put(echo, i)
        producer.close()

    buffered, stored, ahead = [], [], []
    with ThreadPoolExecutor(1) as pool:
        producing = pool.submit(produce)
        for expected, value in enumerate(consumer):
            assert value == expected
            buffered.append(consumer.consumer.buffered)
            stored.append(redis_client.hlen(results_key))
            raw = proto.stats()
            ahead.append(raw.claimed - raw.next)
        producing.result(timeout=60)

    assert len(buffered) == count
    assert max(buffered) <= window + consumer.prefetch
    # Tighter than that: what the consumer holds is within the window.
    assert max(buffered) <= window
    assert max(stored) <= window
    assert max(ahead) <= window
    assert consumer.peak_out_of_order <= window
    # The run really filled the window, so the bounds were tested.
    assert max(ahead) == window
    assert redis_client.hlen(results_key) == 0


# -- invariant 3: duplicates and late outcomes are dropped ------------------------------


def _redeliver(app: Any, queue: str, stream: Any, seq: int, value: Any) -> None:
    """Send echo(value) for ``seq`` again, as a broker redelivery would."""
    app.tasks[echo.name].apply_async(
        (value,),
        queue=queue,
        ignore_result=True,
        headers={HEADER_STREAM: stream.name, HEADER_SEQ: seq, HEADER_SERIALIZER: "json"},
    )


def test_redelivered_task_never_duplicates_an_outcome(start_worker, make_stream, redis_client, app):
    # One worker process runs its queue in order, so a task put after the
    # redelivery finishes after it: no sleeping to know the duplicate is done.
    solo = start_worker(concurrency=1)
    stream = make_stream(window=8, task_options={"queue": solo.queue})
    first = stream.put(echo, "first")
    _redeliver(app, solo.queue, stream, first, "duplicate of first")
    second = stream.put(echo, "second")
    assert stream.get(timeout=30) == "first"
    assert stream.get(timeout=30) == "second"

    stream.ack()  # both delivered and acknowledged: now any outcome for them is late
    _redeliver(app, solo.queue, stream, first, "late first")
    _redeliver(app, solo.queue, stream, second, "late second")
    stream.put(echo, "third")
    assert stream.get(timeout=30) == "third"
    stream.close()
    assert list(stream) == []

    stats = stream.stats()
    assert (stats.claimed, stats.delivered, stats.buffered) == (3, 3, 0)
    assert redis_client.hlen(StreamKeys(stream.name).results) == 0


def test_outcome_after_delete_leaves_nothing(
    start_worker, make_stream, redis_client, redis_url, temp_keys
):
    solo = start_worker(concurrency=1)
    stream = make_stream(window=4, task_options={"queue": solo.queue})
    gate_key = temp_keys("gate")
    stream.put(gate, redis_url, gate_key, "finishes after the delete")
    stream.delete()
    assert stream_keys(redis_client, stream.name) == []

    redis_client.rpush(gate_key, 1)
    # The same single worker process runs this after the gated task is done.
    barrier = make_stream(window=4, task_options={"queue": solo.queue})
    barrier.put(echo, "barrier")
    assert barrier.get(timeout=30) == "barrier"
    assert stream_keys(redis_client, stream.name) == []


# -- invariant 1: every claimed number is filled ---------------------------------------


def test_signature_of_an_unknown_task_does_not_stall_the_stream(make_stream, app):
    stream = make_stream(window=4)
    stream.put(echo, "before")
    unknown = Signature("tests.apps.tasks.no_such_task", args=(1,), app=app)
    stream.put(unknown)
    stream.put(echo, "after")
    stream.close()

    assert stream.get(timeout=30) == "before"
    # Its number is filled with the worker's refusal, not left empty forever.
    outcome = next_outcome(stream, timeout=30)
    assert isinstance(outcome, NotRegistered)
    assert outcome.seq == 1
    assert stream.get(timeout=30) == "after"
    assert list(stream) == []


def assert_revoked_between(stream: Any, before: str, why: str) -> None:
    """The stream gives ``before``, Celery's TaskRevokedError saying ``why`` at 1, "after"."""
    assert stream.get(timeout=30) == before
    outcome = next_outcome(stream, timeout=30)
    assert isinstance(outcome, TaskRevokedError)
    assert outcome.seq == 1
    assert why in str(outcome)
    assert stream.get(timeout=30) == "after"
    assert list(stream) == []


def test_a_task_that_expired_before_a_worker_ran_it_fills_its_place_at_once(make_stream):
    stream = make_stream(window=4)
    stream.put(echo, "before")
    stream.put(echo.s("too late").set(expires=datetime.now(timezone.utc) - timedelta(seconds=5)))
    stream.put(echo, "after")
    stream.close()

    # Its number is filled with Celery's own error as soon as a worker drops
    # the message, not once it counts as lost (dispatched again, to expire again)
    assert_revoked_between(stream, "before", "expired before a worker ran it")


def test_a_revoked_task_fills_its_place_with_the_error(
    start_worker, make_stream, app, redis_client, redis_url, gate_key
):
    # Given a worker with one process, busy with a gated task, and a task
    # waiting behind it that the user revokes
    solo = start_worker(concurrency=1)
    stream = make_stream(window=4, task_options={"queue": solo.queue})
    stream.put(gate, redis_url, gate_key, "held")
    revoked = f"revoked-{uuid.uuid4().hex}"
    stream.put(echo.s("revoked").set(task_id=revoked))
    stream.put(echo, "after")
    stream.close()
    answers = app.control.revoke(revoked, destination=[solo.node], reply=True, timeout=30)
    assert answers, "the worker did not answer the revoke"
    redis_client.rpush(gate_key, 1)

    # Then the revoked task's place holds Celery's error, and the stream goes on
    assert_revoked_between(stream, "held", "was revoked")


def test_a_task_killed_at_its_hard_time_limit_fills_its_place_with_the_error(
    make_stream, redis_client, redis_url, gate_key
):
    # Given a task that outlives its hard time limit: the pool kills it, and
    # Celery acknowledges its message, so no broker sends it again
    stream = make_stream(window=4)
    stream.put(echo, "before")
    stream.put(gate.s(redis_url, gate_key, "never", 60).set(time_limit=1))
    stream.put(echo, "after")
    stream.close()

    # Then its place holds Celery's TimeLimitExceeded at once (before, it waited
    # until the number counted as lost, an hour by default), and the stream goes on
    assert stream.get(timeout=30) == "before"
    outcome = next_outcome(stream, timeout=30)
    assert isinstance(outcome, TimeLimitExceeded), repr(outcome)
    assert outcome.seq == 1
    assert "killed at its hard time limit (1 s)" in str(outcome)
    assert stream.get(timeout=30) == "after"
    assert list(stream) == []
    assert stream.stats().redispatched == 0


def test_task_whose_worker_process_dies_still_fills_its_number(
    start_worker, make_stream, redis_url, temp_keys
):
    solo = start_worker(concurrency=1)
    stream = make_stream(window=4, task_options={"queue": solo.queue})
    stream.put(echo, "before")
    stream.put(die_once, redis_url, temp_keys("died"), "second attempt")
    stream.put(echo, "after")
    stream.close()

    assert stream.get(timeout=30) == "before"
    # Celery notices the lost process and gives the message back (this can
    # take it a few seconds); the second run fills the number.
    outcome = next_outcome(stream, timeout=30)
    assert outcome == "second attempt"
    assert stream.get(timeout=30) == "after"


def _pool_processes(worker_pid: int) -> set[int]:
    """pids of a Celery worker's pool processes (its children)."""
    return descendants(worker_pid)


def test_every_claimed_number_comes_out_exactly_once_whatever_fills_it(
    start_worker, make_stream, app, redis_client, redis_url, temp_keys
):
    # Given one stream whose numbers are filled every way there is: results,
    # failures, markers, a task no worker knows, a task sent to a queue no
    # worker serves (given up as lost), sends that fail after their claim,
    # and tasks whose worker process is SIGKILLed while it runs them
    crew = start_worker(concurrency=2)
    nobody = f"{crew.queue}-nobody-serves-this"
    key = temp_keys("held")
    stream = make_stream(
        window=16, lost_after=4.0, max_redispatches=1, task_options={"queue": crew.queue}
    )
    # The same stream, attached by name, whose sends fail after the claim
    # (kombu refuses an unknown compression).
    broken = make_stream(
        name=stream.name, task_options={"queue": crew.queue, "compression": "no-such-codec"}
    )
    cycle = ["task", "fail", "marker", "unknown", "kill", "dispatch", "task", "lost", "marker"]
    plan = [
        kind if kind != "lost" or round_ % 2 == 0 else "task"
        for round_ in range(4)
        for kind in cycle
    ]
    expected: list[Any] = []
    for n, kind in enumerate(plan):
        expected.append(
            {
                "task": n,
                "fail": CustomError,
                "marker": f"marker {n}",
                "unknown": NotRegistered,
                "kill": n * n,
                "dispatch": DispatchError,
                "lost": ResultLost,
            }[kind]
        )

    def produce() -> list[int]:
        numbers = []
        with stream:
            for n, kind in enumerate(plan):
                if kind == "task":
                    numbers.append(stream.put(echo, n))
                elif kind == "fail":
                    numbers.append(stream.put(fail, f"failure {n}"))
                elif kind == "marker":
                    numbers.append(stream.put(f"marker {n}"))
                elif kind == "unknown":
                    unknown = Signature("tests.apps.tasks.no_such_task", args=(n,), app=app)
                    numbers.append(stream.put(unknown))
                elif kind == "kill":
                    numbers.append(stream.put(held.square_after_a_kill, n, redis_url, key))
                elif kind == "lost":
                    numbers.append(stream.put(echo.s(n).set(queue=nobody)))
                else:
                    try:
                        broken.put(echo, n)
                    except DispatchError as exc:
                        numbers.append(exc.seq)
        return numbers

    # A killer: each task that announces it is held gets its process SIGKILLed.
    killed: list[int] = []
    stop = threading.Event()

    def kill_held() -> None:
        while not stop.is_set():
            got = redis_client.blpop([f"{key}:held"], timeout=1)
            if got is None:
                continue
            pid, number = (int(part) for part in got[1].split(b":"))
            assert pid in _pool_processes(crew.pid), (pid, _pool_processes(crew.pid))
            os.kill(pid, signal.SIGKILL)
            killed.append(number)

    with ThreadPoolExecutor(2) as pool:
        producing = pool.submit(produce)
        killing = pool.submit(kill_held)
        try:
            # When a consumer reads the stream to its end
            seen = []
            while True:
                try:
                    seen.append(stream.get(timeout=60))
                except StreamExhausted:
                    break
                except StreamEmpty:
                    pytest.fail(f"nothing arrived within 60 s after {len(seen)} outcomes")
                except Exception as exc:
                    seen.append(exc)
            numbers = producing.result(timeout=60)
        finally:
            stop.set()
            killing.result(timeout=30)
        redis_client.delete(nobody, f"{key}:runs")

    # Then every number was claimed in plan order, and exactly the claimed
    # numbers came out, each once, in order, each with what filled it
    assert numbers == list(range(len(plan)))
    stats = stream.stats()
    assert stats.claimed == len(plan) == len(seen)
    assert (stats.delivered, stats.buffered) == (stats.claimed, 0)
    for n, (want, got) in enumerate(zip(expected, seen, strict=True)):
        if isinstance(want, type):
            assert isinstance(got, want), (n, plan[n], got)
            if hasattr(got, "seq"):
                assert got.seq == n, (n, plan[n], got)
        else:
            assert got == want, (n, plan[n], got)
    # And the faults really happened: every held task was killed mid-run
    assert sorted(killed) == [n for n, kind in enumerate(plan) if kind == "kill"]
    assert redis_client.hlen(StreamKeys(stream.name).results) == 0


#: A producer and a consumer of one stream in a process of their own, which
#: prints its resident memory (and peak) as it goes: what the process holds.
FLAT_MEMORY = textwrap.dedent(
    """
    import json, os, sys, threading
    from celery import Celery
    from celery_ordered import OrderedResultStream

    def memory():
        status = dict(
            line.split(":", 1) for line in open("/proc/self/status").read().splitlines()
        )
        return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}  # KiB

    name, redis_url, window, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    app = Celery("flat", set_as_current=False)
    app.conf.ordered_redis_url = redis_url
    consumer = OrderedResultStream(app, name, window=window)
    producer = OrderedResultStream(app, name)

    def produce():
        for i in range(count):
            producer.put(i)
        producer.close()

    threading.Thread(target=produce).start()
    for n, value in enumerate(consumer, start=1):
        assert value == n - 1, (n, value)
        if n in (count // 10, count // 2, count):
            print(json.dumps({"items": n, **memory()}), flush=True)
    """
)


def test_process_memory_stays_flat_over_far_more_items_than_the_window(make_stream, redis_url):
    # Given a window of 64 and 20,000 markers (over 300 windows' worth) put
    # by one handle as fast as another, in the same process, consumes them
    window, count = 64, 20_000
    stream = make_stream(window=window)  # deleted after the test
    # When a fresh process runs them through, noting its memory after a tenth
    # (warmed up), half, and all of them
    done = subprocess.run(
        [sys.executable, "-c", FLAT_MEMORY, stream.name, redis_url, str(window), str(count)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    warm, half, end = (json.loads(line) for line in done.stdout.splitlines())
    assert [warm["items"], half["items"], end["items"]] == [count // 10, count // 2, count]
    # Then the second half took no memory the first half had not: neither what
    # the process holds nor its peak grew with the items that went through it.
    # (Flat to the page here; a leak of one 60-byte string per item adds
    # over 600 KiB in the second half.)
    margin = 256  # KiB
    assert end["VmRSS"] - half["VmRSS"] < margin, (warm, half, end)
    assert end["VmHWM"] - half["VmHWM"] < margin, (warm, half, end)
