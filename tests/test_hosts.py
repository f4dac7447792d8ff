"""Workers on separate hosts serve one ordered stream; a host lost mid-stream loses nothing.

Each host is a Linux network namespace of its own (tests/support/netns.py), linked to
the root namespace by a veth pair; its Celery worker reaches the test's
private Redis (broker and stream state at once) only over that link. The
consumer runs in the root namespace. A host's cable is then pulled, or its
power cut, while it runs one of the stream's tasks.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from celery_ordered import OrderedResultStream, RedisServer, StreamEmpty, StreamExhausted
from tests.apps.host_tasks import visit
from tests.support import netns
from tests.support.tools import require_tool
from tests.support.workers import Worker, wait_answering

pytestmark = pytest.mark.topology

HOSTS = ("host-a", "host-b")

#: Items in each test's stream, and a marker after every BATCH of them.
COUNT, BATCH = 40, 10

#: The longest anything here may take (a worker's start, a result, a host coming back),
#: and the bound within which a lost host's tasks are dispatched again with the
#: default settings (its lease lapses ``ordered_worker_lease`` seconds after its
#: last heartbeat).
DEADLINE = 30.0


@pytest.fixture
def network() -> Iterator[netns.Network]:
    """Two hosts, host-a and host-b, each in a network namespace of its own."""
    require_tool("ip", "iproute2 makes the network namespaces the hosts run in")
    reason = netns.probe()
    require_tool(
        "network namespaces with veth links",
        f"the hosts run in them; this machine cannot make them, run as root: {reason}",
        find=lambda _: None if reason else "available",
    )
    with netns.Network(HOSTS) as net:
        yield net


@pytest.fixture
def server(network: netns.Network) -> Iterator[int]:
    """A private Redis listening on every host's link and on 127.0.0.1; its port."""
    with socket.socket() as probe:
        probe.bind(("", 0))  # a port free on every address
        port = int(probe.getsockname()[1])
    args = ("--bind", *network.server_addresses, "127.0.0.1", "--protected-mode", "no")
    with RedisServer(port=port, args=args):
        yield port


@dataclass
class Lab:
    """The hosts, their workers, and the consumer's side of the private Redis (on ``port``)."""

    network: netns.Network
    workers: dict[str, Worker]
    app: Celery
    client: redis.Redis
    queue: str
    port: int

    def logs(self) -> str:
        """Every worker's log, for failure messages."""
        return "\n".join(f"--- {name}:\n{w.output()[-3000:]}" for name, w in self.workers.items())


@pytest.fixture
def lab(network: netns.Network, server: int) -> Iterator[Lab]:
    """A worker of one process on each host, all serving one queue; answered pings."""
    local_url = f"redis://127.0.0.1:{server}/0"
    queue = f"hosts-{uuid.uuid4().hex[:6]}"
    app = Celery("hosts", set_as_current=False)
    app.conf.update(
        broker_url=local_url,
        ordered_redis_url=local_url,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
    )
    workers = {}
    for host in network:
        # The host's only way to the server: the far end of its own link.
        url = f"redis://{host.server_address}:{server}/0"
        worker = Worker(
            queue=queue,
            concurrency=1,
            hostname=f"{host.name}@%h",
            extra_env={"CO_TEST_REDIS_URL": url, "CO_TEST_BROKER_URL": url, "CO_TEST_QUEUE": queue},
            prefix=host.prefix,
        )
        host.adopt(worker.proc)  # killed with the host's power
        workers[host.name] = worker
    lab = Lab(
        network, workers, app, redis.Redis.from_url(local_url, decode_responses=True), queue, server
    )
    try:
        wait_answering(app, workers.values(), DEADLINE)
        yield lab
    finally:
        for host in network:
            host.power_off()
        for worker in workers.values():
            worker.stop()  # reaped already; its directory goes
        lab.client.close()
        app.close()


def _produce(stream: OrderedResultStream, put: Callable[[int], None]) -> Callable[[], None]:
    """Start putting COUNT items (``put(x)``) and a marker after every BATCH; returns join.

    The returned function waits for the producer and re-raises what it raised.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with stream:
                for x in range(COUNT):
                    put(x)
                    if x % BATCH == BATCH - 1:
                        stream.put(f"batch {x // BATCH} done")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the producer is still putting"
        if errors:
            raise errors[0]

    return join


def _take(stream: OrderedResultStream, lab: Lab, count: int | None = None) -> list[Any]:
    """The next ``count`` outcomes (None: all that are left), each within DEADLINE."""
    taken: list[Any] = []
    while count is None or len(taken) < count:
        try:
            taken.append(stream.get(timeout=DEADLINE))
        except StreamEmpty:
            pytest.fail(f"no outcome within {DEADLINE}s after {taken!r}:\n{lab.logs()}")
        except StreamExhausted:
            if count is not None:
                raise
            break
    return taken


def _pop(lab: Lab, key: str) -> str | None:
    """The first item pushed to list ``key`` within DEADLINE, else None.

    In blocking reads of a second each: one longer than the client's socket
    timeout (5 s) would fail.
    """
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        found = lab.client.blpop([key], timeout=1)
        if found is not None:
            return str(found[1])
    return None


def _expected() -> list[Any]:
    """The items in order, a marker after every BATCH of them."""
    out: list[Any] = []
    for x in range(COUNT):
        out.append(x)
        if x % BATCH == BATCH - 1:
            out.append(f"batch {x // BATCH} done")
    return out


def _shape(outcomes: list[Any]) -> list[Any]:
    """Outcomes with each item's result reduced to its number (markers kept)."""
    return [o[0] if isinstance(o, list) else o for o in outcomes]


def _ran_on(outcomes: list[Any]) -> dict[int, str]:
    """Which host's result each item has."""
    return {o[0]: o[1] for o in outcomes if isinstance(o, list)}


def _started(lab: Lab, key: str) -> list[tuple[str, int]]:
    """(host, item) of every task start, in the order they started."""
    starts = lab.client.lrange(f"{key}:started", 0, -1)
    return [(str(host), int(x)) for host, x in (s.split() for s in starts)]


def _assert_ran_in_their_namespaces(lab: Lab, outcomes: list[Any]) -> None:
    root = os.stat("/proc/self/ns/net").st_ino
    inodes = {host.name: host.netns_inode for host in lab.network}
    assert root not in inodes.values()
    for outcome in outcomes:
        if isinstance(outcome, list):
            x, host, inode = outcome
            assert inode == inodes[host], f"{x} ran on {host} outside its namespace"


def test_workers_on_two_hosts_serve_one_stream_in_order(lab: Lab) -> None:
    # Given a worker on each of two hosts, and a stream whose first two tasks
    # can only finish if they run at the same time (so on both hosts)
    key = f"hosts-{uuid.uuid4().hex}"
    stream = OrderedResultStream(lab.app, window=8, task_options={"queue": lab.queue})

    def put(x: int) -> None:
        stream.put(visit, x, key, meet="start" if x < 2 else None)

    # When the consumer, in the root namespace, reads it while it is produced
    join = _produce(stream, put)
    outcomes = _take(stream, lab)
    join()
    # Then it gets every result and marker once, in submission order
    assert _shape(outcomes) == _expected()
    # And both hosts ran tasks, each inside its own network namespace
    ran_on = _ran_on(outcomes)
    assert {ran_on[0], ran_on[1]} == set(HOSTS)
    _assert_ran_in_their_namespaces(lab, outcomes)
    # (where the server is reached over the host's link, not on the loopback)
    host = lab.network["host-a"]
    assert host.can_connect(host.server_address, lab.port)
    assert not host.can_connect("127.0.0.1", lab.port)


@pytest.mark.parametrize("loss", ["cable pulled", "power cut"])
def test_a_host_lost_mid_task_leaves_the_stream_whole_and_in_order(lab: Lab, loss: str) -> None:
    # Given both hosts working on a stream, and host-a's first task from
    # number 10 on held in progress
    key = f"hosts-{uuid.uuid4().hex}"
    # (the default settings: no lost_after to tune for the loss to heal)
    stream = OrderedResultStream(lab.app, window=8, task_options={"queue": lab.queue})
    comeback = loss == "cable pulled"

    def put(x: int) -> None:
        meet = "start" if x < 2 else "end" if comeback and x >= COUNT - 2 else None
        stream.put(visit, x, key, meet=meet, hold="host-a" if x >= 10 else None)

    join = _produce(stream, put)
    outcomes = _take(stream, lab, 10)
    held = _pop(lab, f"{key}:holding")
    assert held is not None, f"host-a started no task from 10 on:\n{lab.logs()}"
    held_x = int(held)
    # When host-a is lost while it runs that task
    host_a = lab.network["host-a"]
    if comeback:
        assert host_a.can_connect(host_a.server_address, lab.port)
        host_a.cut()
        assert not host_a.can_connect(host_a.server_address, lab.port)
    else:
        host_a.power_off()
    lost = time.monotonic()
    # Then host-a's lease on it lapses, and the consumer has it run again on
    # host-b (within DEADLINE), and goes on past it
    upto = _expected().index(held_x) + 3
    outcomes += _take(stream, lab, upto - len(outcomes))
    print(f"\nhost lost ({loss}): its task's outcome {time.monotonic() - lost:.1f} s later")
    assert _ran_on(outcomes)[held_x] == "host-b"
    if comeback:
        # And when host-a's cable is back, it finishes its task (whose late
        # result, for a place already filled, must not show up anywhere)
        host_a.heal()
        lab.client.rpush(f"{key}:gate", "go")
        released = _pop(lab, f"{key}:released")
        assert released is not None, (
            f"host-a did not finish after its cable was back:\n{lab.logs()}"
        )
        assert released == f"host-a {held_x}"
    outcomes += _take(stream, lab)
    join()
    # Then every result and marker came exactly once, in submission order
    assert _shape(outcomes) == _expected()
    ran_on = _ran_on(outcomes)
    assert {ran_on[0], ran_on[1]} == set(HOSTS)
    _assert_ran_in_their_namespaces(lab, outcomes)
    # And the held task really ran on host-a first, then on host-b
    started = _started(lab, key)
    assert [host for host, x in started if x == held_x][:2] == ["host-a", "host-b"]
    if comeback:
        # And host-a served the stream again after its cable was back
        assert {ran_on[COUNT - 2], ran_on[COUNT - 1]} == set(HOSTS)
    else:
        # And nothing after it came from the dead host
        assert all(ran_on[x] == "host-b" for x in range(held_x, COUNT))
