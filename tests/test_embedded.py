"""The zero-setup default: a private Redis and local Celery workers.

These tests never use the machine's Redis: a private cluster must work where
none is reachable, and must not outlive its owner however the owner ends.
"""

from __future__ import annotations

import gc
import glob
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from celery_ordered import (
    ConfigurationError,
    LocalCluster,
    OrderedResultStream,
    ParallelQueue,
    ParallelSingleTaskQueue,
    RedisServer,
    local_cluster,
)
from tests.apps.lifetime_tasks import PermutationTask, collect_garbage, task_1
from tests.support import ROOT
from tests.support.processes import Owner, alive, footprint, wait_gone
from tests.support.tools import require_tool

pytestmark = pytest.mark.usefixtures("no_leftovers")

RESULT_TIMEOUT = 30.0
MACHINE_REDIS_PORT = 6379


def double(x: int) -> int:
    return 2 * x


def redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


# -- RedisServer ---------------------------------------------------------------


def test_redis_server_is_private_and_gone_once_stopped():
    with RedisServer() as server:
        assert server.url == f"unix://{server.socket_path}"
        assert server.broker_url == f"redis+socket://{server.socket_path}"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            info = client.info("server")
        finally:
            client.close()
        directory, keeper, server_pid = server.directory, server.keeper_pid, info["process_id"]
        assert "running" in repr(server)
        assert server.is_running()
        assert info["tcp_port"] == 0  # a unix socket only: nothing listens on TCP
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o700
        assert alive(keeper)
        assert alive(server_pid)

    assert not server.is_running()
    assert "stopped" in repr(server)
    assert not os.path.exists(directory)
    wait_gone({keeper, server_pid})
    server.stop()  # idempotent


def _python_for(user: str) -> str | None:
    """A Python interpreter ``user`` may run, if any."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            ran = subprocess.run(
                [candidate, "-c", "pass"], user=user, cwd="/", capture_output=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if ran.returncode == 0:
            return candidate
    return None


def _root(name: str) -> str | None:
    return name if os.geteuid() == 0 else None


def test_another_local_user_cannot_reach_the_private_redis():
    require_tool(
        "root",
        "acting as another user needs root",
        find=lambda _: "root" if os.geteuid() == 0 else None,
    )
    python = require_tool(
        "nobody", "a Python interpreter that user nobody may run", find=_python_for
    )
    probe = (
        "import socket, sys\n"
        "client = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    client.connect(sys.argv[1])\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
        "else:\n"
        "    print('connected')\n"
    )
    with RedisServer() as server:
        done = subprocess.run(
            [python, "-c", probe, server.socket_path],
            user="nobody",
            cwd="/",
            capture_output=True,
            text=True,
            timeout=RESULT_TIMEOUT,
        )

    assert done.stdout.strip() == "PermissionError", done.stdout + done.stderr


def test_redis_server_reports_a_binary_that_cannot_run(tmp_path):
    from celery_ordered import ConfigurationError

    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'this is not redis' >&2\nexit 3\n")
    fake.chmod(0o755)

    with pytest.raises(ConfigurationError, match="did not start"):
        RedisServer(binary=str(fake)).start()


# -- LocalCluster --------------------------------------------------------------


def test_local_cluster_runs_a_stream_in_order_and_leaves_nothing():
    with local_cluster(2) as cluster:
        assert cluster.is_running()
        assert cluster.startup_seconds is not None
        assert cluster.startup_seconds > 0
        assert cluster.app.conf.broker_url.startswith("redis+socket://")
        assert cluster.app.conf.ordered_redis_url.startswith("unix://")
        fp = footprint(cluster)
        assert len(fp.pool_pids) == 2  # the worker leads a group of its pool processes
        fp.assert_running()

        stream = OrderedResultStream(cluster.app, window=8)
        for i in range(30):
            stream.put(double, i, timeout=RESULT_TIMEOUT)
            if i >= 7:
                assert stream.get(timeout=RESULT_TIMEOUT) == 2 * (i - 7)
        stream.close()
        assert list(stream) == [2 * i for i in range(23, 30)]

    assert not cluster.is_running()
    fp.wait_gone()


def test_one_app_serves_one_local_cluster_after_another():
    app = Celery(f"reused-{os.getpid()}", set_as_current=False)
    for round_ in range(2):
        with local_cluster(1, app=app):
            stream = OrderedResultStream(app)
            for i in range(3):
                stream.put(double, i + round_)
            stream.close()
            assert list(stream) == [2 * (i + round_) for i in range(3)]


SCRIPT_TASK_FROM_A_THREAD = """
import threading
from celery import Celery
from celery_ordered import OrderedResultStream, local_cluster, ordered_task

app = Celery("script")

@ordered_task
def square(x):
    return x * x

with local_cluster(1, app=app):
    stream = OrderedResultStream(app)
    def produce():
        with stream:
            for i in range(4):
                stream.put(square, i)
    producer = threading.Thread(target=produce)
    producer.start()
    print([stream.get(timeout=60) for _ in range(4)])
    producer.join()
"""


def test_a_script_task_put_from_another_thread_reaches_the_streams_app():
    # The task proxy resolves through the current app, which is per thread:
    # in the producer thread it is not ``app``, and would name the task
    # ``__main__.square`` instead of ``script.square``, which no worker knows.
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT_TASK_FROM_A_THREAD],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 4, 9]"


def test_stop_workers_keeps_what_is_left_readable():
    cluster = LocalCluster(1).start()
    try:
        stream = OrderedResultStream(cluster.app, window=8)
        for i in range(5):
            stream.put(double, i)
        stream.close()
        stream.join(timeout=RESULT_TIMEOUT)
        assert not stream.is_alive()
        fp = footprint(cluster)

        cluster.stop_workers()

        wait_gone({fp.worker_pid}, groups={fp.worker_pid})
        assert not cluster.is_running()
        assert alive(fp.keeper_pid)
        assert alive(fp.redis_pid)
        assert list(stream) == [0, 2, 4, 6, 8]
    finally:
        cluster.stop()
    fp.wait_gone()


def test_an_error_in_the_with_block_still_stops_the_cluster():
    seen = []

    def run() -> None:
        with local_cluster(1) as cluster:
            seen.append(footprint(cluster))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run()

    seen[0].wait_gone()


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_local_cluster_refuses_a_bad_worker_count(workers):
    with pytest.raises(ValueError, match="workers"):
        LocalCluster(workers)


# -- no Redis on the machine ---------------------------------------------------


def _remote_ports(pid: int) -> set[int]:
    """Remote TCP ports of the sockets ``pid`` holds open."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except FileNotFoundError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


OWNER_OF_A_CLUSTER = """
from celery_ordered import OrderedResultStream, local_cluster

def triple(x):
    return 3 * x

with local_cluster(2) as cluster:
    stream = OrderedResultStream(cluster.app, window=4)
    results = list(stream.map(triple, range(10)))
    report(cluster, results=results, owner=os.getpid())
    block()
"""


def test_a_local_cluster_never_connects_to_a_tcp_redis():
    owner = Owner(OWNER_OF_A_CLUSTER)
    try:
        fp = owner.footprint()
        assert fp.extra["results"] == [3 * i for i in range(10)]
        ports = {pid: _remote_ports(pid) for pid in {fp.extra["owner"], *fp.pids}}
    finally:
        owner.kill()
    fp.wait_gone()

    assert not {pid: p for pid, p in ports.items() if MACHINE_REDIS_PORT in p}
    assert not any(ports.values())  # no TCP connection at all: the socket is a unix one


NO_NETWORK_SCRIPT = """
import os, socket, sys
sys.path.insert(0, {root!r})
try:
    socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
except OSError:
    print("machine redis: unreachable", flush=True)
else:
    print("machine redis: answers", flush=True)

from celery_ordered import OrderedResultStream, ParallelQueue, local_cluster

def triple(x):
    return 3 * x

with local_cluster(1) as cluster:
    stream = OrderedResultStream(cluster.app, window=4)
    print("stream:", list(stream.map(triple, range(6))), flush=True)
    directory = cluster.redis.directory
print("directory removed:", not os.path.exists(directory), flush=True)

queue = ParallelQueue(num_workers=1)
queue.put(triple, 14)
print("queue:", queue.get(timeout=60), flush=True)
queue.stop()
queue.join(timeout=60)
print("queue alive:", queue.is_alive(), flush=True)
"""


def _private_network(program: str) -> str | None:
    """``program`` (unshare) if it can give a process a network of its own."""
    if shutil.which(program) is None:
        return None
    try:
        probe = subprocess.run([program, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return program if probe.returncode == 0 else None


def test_works_on_a_machine_where_no_redis_is_reachable(tmp_path):
    require_tool("unshare", "unshare -rn gives the test a private network", find=_private_network)
    # A private network namespace: no interface is up, 127.0.0.1 included.
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", NO_NETWORK_SCRIPT.format(root=str(ROOT))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "machine redis: unreachable",
        "stream: [0, 3, 6, 9, 12, 15]",
        "directory removed: True",
        "queue: 42",
        "queue alive: False",
    ]


# -- the owner's death ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "sig"),
    [
        ("block()", signal.SIGKILL),
        ("block()", signal.SIGTERM),
        ("pass  # falls off the end without stopping anything", None),
    ],
    ids=["sigkill", "sigterm", "exit-without-stop"],
)
def test_the_owners_end_takes_the_cluster_down(ending, sig):
    body = f"""
from celery_ordered import LocalCluster
cluster = LocalCluster(2).start()
report(cluster)
{ending}
"""
    owner = Owner(body)
    try:
        fp = owner.footprint()
        if sig is not None:
            fp.assert_running()
            owner.kill(sig)
        else:
            assert owner.wait() == 0
            assert "Traceback" not in owner.stderr()
    finally:
        owner.kill()
    fp.wait_gone()


BARE_REDIS_OWNER = """
from celery_ordered import RedisServer
server = RedisServer().start()
print("SERVER", json.dumps([server.keeper_pid, server.url, server.directory]), flush=True)
block()
"""


def test_killing_the_owner_of_a_bare_redis_server_ends_it():
    owner = Owner(BARE_REDIS_OWNER)
    try:
        keeper, url, directory = json.loads(owner.read_line("SERVER "))
        server_pid = redis_pid(url)
        assert alive(keeper)
        assert alive(server_pid)
    finally:
        owner.kill()

    wait_gone({keeper, server_pid}, paths={directory})


# -- Start-up failures, the caller's app, temporary files --------------------


def test_a_worker_that_dies_at_start_up_says_why_at_once():
    # Given an app whose worker cannot start: a module it must import is missing
    app = Celery(f"broken-{os.getpid()}", set_as_current=False)
    app.conf.imports = ["tests.no_such_module_for_the_worker"]
    cluster = LocalCluster(1, app=app)
    began = time.monotonic()
    # When the cluster starts
    with pytest.raises(ConfigurationError) as raised:
        cluster.start()
    # Then the error quotes the worker's own traceback, at once
    assert time.monotonic() - began < cluster.start_timeout / 2
    message = str(raised.value)
    assert message.startswith("the local Celery worker exited with code 1 while starting: ")
    assert (
        "ModuleNotFoundError: No module named 'tests.no_such_module_for_the_worker'"
        in (message.splitlines()[0])
    )
    assert "Traceback (most recent call last)" in message
    assert not cluster.is_running()
    assert not os.path.exists(cluster.redis.directory or "")


def test_the_callers_app_gets_its_settings_back():
    # Given the caller's app, with settings of its own
    app = Celery(f"callers-{os.getpid()}", broker="memory://", set_as_current=False)
    app.conf.task_serializer = "json"
    app.conf.accept_content = ["json"]
    before = dict(app.conf)
    own = dict(app.conf.changes)
    # When a pickle cluster runs on it, then stops
    with local_cluster(1, app=app, serializer="pickle") as cluster:
        assert app.conf.task_serializer == "pickle"
        stream = OrderedResultStream(app)
        stream.put(double, 4)
        stream.close()
        assert list(stream) == [8]
        assert cluster.app is app
    # Then every setting is what it was, and nothing was added to its own
    assert app.conf.task_serializer == "json"
    assert app.conf.accept_content == ["json"]
    assert app.conf.broker_url == "memory://"
    assert dict(app.conf.changes) == own
    assert dict(app.conf) == before


def pymp_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pymp-*")))


def test_a_local_cluster_leaves_no_temporary_directory_of_its_workers():
    before = pymp_dirs()
    with local_cluster(2) as cluster:
        stream = OrderedResultStream(cluster.app)
        for i in range(4):
            stream.put(double, i)
        stream.close()
        assert list(stream) == [0, 2, 4, 6]
        fp = footprint(cluster)
        # billiard's temporary directory, if the workers made one, is the cluster's
        private = os.path.join(cluster.redis.directory, "pymp")
        assert os.path.isdir(private)
    fp.wait_gone()
    assert not os.path.exists(private)
    assert pymp_dirs() - before == set()


# -- Many clusters in one process ---------------------------------------------


def test_collecting_one_private_cluster_leaves_another_working():
    # Issue 15, item 2: a queue a failed test never stopped (A) is garbage,
    # collected only by the cyclic collector, while another queue (B) starts:
    # B's workers are forked with a copy of A in them.
    gc.collect()
    gc.disable()  # A must still be uncollected garbage when B's workers fork
    try:
        events = [multiprocessing.Event() for _ in range(4)]
        a = ParallelSingleTaskQueue(
            PermutationTask(events, (0, 1, 2, 3)),
            num_workers=3,
            consumer_buffer_max=3,
            daemon=True,
        )
        for i in range(3):
            a.put(i, timeout=RESULT_TIMEOUT)
        a_fp = footprint(a._cluster)
        a.itself = a  # type: ignore[attr-defined]  # a cycle: only gc frees A
        del a

        b = ParallelQueue(num_workers=3, in_q_max=2, out_q_max=2, worker_q_max=2, daemon=True)
        # When B's worker processes collect their garbage (their copy of A)
        for _ in range(3):
            b.put(collect_garbage)
        b.put(task_1)
        for _ in range(3):
            assert b.get(timeout=RESULT_TIMEOUT) >= 0
        # Then A is untouched by them: its workers still run
        a_fp.assert_running()
        # And when this process collects A, B goes on
        b.put(task_1)
        gc.collect()
        assert b.get(timeout=RESULT_TIMEOUT) == 1
        assert b.get(timeout=RESULT_TIMEOUT) == 1
        a_fp.wait_gone()  # A ended with its owner's collection, as it should
        b.stop()
        b.join(timeout=RESULT_TIMEOUT)
        assert not b.is_alive()
    finally:
        gc.enable()


def test_clusters_end_in_any_order_from_any_thread():
    clusters = [LocalCluster(1).start() for _ in range(3)]
    fps = [footprint(cluster) for cluster in clusters]
    # The middle one ends from another thread, the first by garbage collection
    ender = threading.Thread(target=clusters[1].stop)
    ender.start()
    ender.join()
    del clusters[1]
    first = clusters.pop(0)
    first.itself = first  # type: ignore[attr-defined]
    del first
    gc.collect()
    fps[0].wait_gone()
    fps[1].wait_gone()
    # The last one still works
    last = clusters.pop()
    stream = OrderedResultStream(last.app)
    stream.put(double, 21)
    stream.close()
    assert list(stream) == [42]
    last.stop()
    fps[2].wait_gone()
