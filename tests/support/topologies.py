"""Local servers beyond the tests' Redis: a Redis Cluster, Sentinel, RabbitMQ.

Real ``redis-server`` processes on free ports of 127.0.0.1, each in a
temporary directory and without persistence, started and stopped by their
owner (a test fixture, or ``benchmarks/cluster.py``); each process also gets
SIGKILL when its owner dies (Linux). Every wait polls a condition under a
deadline: nothing sleeps "to let things settle". RabbitMQ is not started
here: :func:`rabbitmq_url` finds the machine's.

Also here: :func:`topology_worker`, a worker of
:mod:`tests.apps.topologyapp` whose streams live on the topology under test.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.crc import key_slot

from tests.apps.topologyapp import SETTINGS_ENV, STORE_ENV
from tests.support.processes import die_with_parent, stopped
from tests.support.waiting import DEFAULT_TIMEOUT as TOPOLOGY_TIMEOUT
from tests.support.waiting import wait_until as _wait_until
from tests.support.workers import Worker

_T = TypeVar("_T")


class TopologyError(RuntimeError):
    """A local topology did not start, or did not reach the state it was told to."""


def wait_until(check: Callable[[], _T], what: str, timeout: float = TOPOLOGY_TIMEOUT) -> _T:
    """:func:`tests.support.waiting.wait_until`, raising :class:`TopologyError`."""
    return _wait_until(check, what, timeout, error=TopologyError)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, cluster_bus: bool = False) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1 (and port + 10000 too, for a cluster's bus)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port in ports or (cluster_bus and (port > 55535 or not _port_free(port + 10000))):
            continue
        ports.append(port)
    return ports


class RedisNode:
    """One ``redis-server`` on 127.0.0.1:``port``, working in ``directory``."""

    def __init__(self, directory: Path, port: int, args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.port = port
        self.args = args
        self.log = directory / f"redis-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", port)``."""
        return ("127.0.0.1", self.port)

    def start(self) -> RedisNode:
        """Start the server (again, after :meth:`kill`) and wait until it answers."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server", *self.args, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                    "--daemonize", "no",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        wait_until(self._answers, f"redis-server on port {self.port} answering", 20)
        return self

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise TopologyError(
                f"redis-server on port {self.port} exited: {self.log.read_text()[-2000:]}"
            )
        return bool(self.client(socket_timeout=1).ping())

    def client(self, **options: Any) -> redis.Redis:
        """A new plain client of this one server."""
        return redis.Redis("127.0.0.1", self.port, socket_connect_timeout=1, **options)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: no goodbye) and reap the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalRedisCluster:
    """A Redis Cluster of ``masters`` primaries (no replicas) on free local ports.

    Started as Redis's own docs say: ``redis-server --cluster-enabled yes`` per
    node, joined with ``redis-cli --cluster create``; ready once every node
    reports ``cluster_state:ok``.
    """

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 2000) -> None:
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.directory = Path(tempfile.mkdtemp(prefix="co-cluster-"))
        self.nodes: list[RedisNode] = []

    @property
    def url(self) -> str:
        """The celery-ordered URL of the cluster, naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> LocalRedisCluster:
        """Start the nodes, join them into one cluster, wait until it serves every slot."""
        try:
            for port in free_ports(self.masters, cluster_bus=True):
                args = (
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                )  # fmt: skip
                self.nodes.append(RedisNode(self.directory, port, args).start())
            created = subprocess.run(
                [
                    "redis-cli", "--cluster", "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas", "0", "--cluster-yes",
                ],
                capture_output=True, text=True, timeout=TOPOLOGY_TIMEOUT,
            )  # fmt: skip
            if created.returncode != 0:
                raise TopologyError(f"redis-cli --cluster create failed:\n{created.stdout}")
            self.wait_state("ok")
        except BaseException:
            self.stop()
            raise
        return self

    def _state(self, node: RedisNode) -> str:
        return str(node.client(socket_timeout=1).cluster("INFO")["cluster_state"])

    def wait_state(self, state: str, nodes: list[RedisNode] | None = None) -> None:
        """Wait until every running node (or each of ``nodes``) says ``cluster_state:<state>``."""
        for node in nodes or [n for n in self.nodes if n.proc and n.proc.poll() is None]:
            wait_until(
                lambda node=node: self._state(node) == state,  # type: ignore[misc]
                f"node {node.port} reporting cluster_state:{state}",
            )

    def slot_owners(self) -> dict[int, int]:
        """Slot -> port of the primary that serves it, as the cluster itself says."""
        owners: dict[int, int] = {}
        running = next(n for n in self.nodes if n.proc and n.proc.poll() is None)
        for first, last, primary, *_ in running.client().execute_command("CLUSTER SLOTS"):
            for slot in range(int(first), int(last) + 1):
                owners[slot] = int(primary[1])
        return owners

    def port_of(self, key: str) -> int:
        """Port of the primary holding ``key`` (by its hash slot)."""
        return self.slot_owners()[key_slot(key.encode())]

    def node(self, port: int) -> RedisNode:
        """The node listening on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        """Stop every node and remove the directory."""
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LocalSentinel:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels watching them.

    Quorum 1, ``down-after-milliseconds`` ``down_after_ms``: killing the
    primary promotes a replica a second or two later.
    """

    def __init__(
        self,
        *,
        replicas: int = 2,
        sentinels: int = 1,
        master_name: str = "co-primary",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.replicas = replicas
        self.sentinel_count = sentinels
        self.master_name = master_name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.directory = Path(tempfile.mkdtemp(prefix="co-sentinel-"))
        self.servers: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []

    @property
    def url(self) -> str:
        """The celery-ordered URL: every Sentinel, Celery's spelling, the primary named."""
        parts = [f"sentinel://127.0.0.1:{node.port}" for node in self.sentinels]
        return ";".join(parts) + f"/0?master_name={self.master_name}"

    def start(self) -> LocalSentinel:
        """Start the servers and the Sentinels; wait until the Sentinels know every replica."""
        try:
            ports = free_ports(1 + self.replicas + self.sentinel_count)
            primary = RedisNode(self.directory, ports[0]).start()
            self.servers.append(primary)
            for port in ports[1 : 1 + self.replicas]:
                args = ("--replicaof", "127.0.0.1", str(primary.port))
                self.servers.append(RedisNode(self.directory, port, args).start())
            for port in ports[1 + self.replicas :]:
                config = self.directory / f"sentinel-{port}.conf"
                config.write_text(
                    f"sentinel monitor {self.master_name} 127.0.0.1 {primary.port} 1\n"
                    f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {self.master_name} {self.replicas}\n"
                )
                self.sentinels.append(
                    RedisNode(self.directory, port, (str(config), "--sentinel")).start()
                )
            self.wait_replicas_known()
        except BaseException:
            self.stop()
            raise
        return self

    def primary_address(self) -> tuple[str, int]:
        """Where the (first) Sentinel says the primary is."""
        host, port = (
            self.sentinels[0]
            .client(socket_timeout=1)
            .execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        )
        return host.decode(), int(port)

    def primary(self) -> RedisNode:
        """The server the Sentinels call the primary."""
        port = self.primary_address()[1]
        return next(node for node in self.servers if node.port == port)

    def wait_replicas_known(self) -> None:
        """Wait until every Sentinel sees every live replica in sync with the primary."""
        live = {n.port for n in self.servers if n.proc and n.proc.poll() is None}
        expected = len(live) - 1

        def in_sync(sentinel: RedisNode) -> bool:
            found = sentinel.client(socket_timeout=1).sentinel_slaves(self.master_name)
            good = [
                r for r in found
                if r["port"] in live and r.get("master-link-status") == "ok"
                and not r["is_sdown"]
            ]  # fmt: skip
            return len(good) >= expected

        for sentinel in self.sentinels:
            wait_until(lambda s=sentinel: in_sync(s), "Sentinel seeing every replica in sync")  # type: ignore[misc]

    def replica_nodes(self) -> list[RedisNode]:
        """The servers that are not the primary."""
        primary = self.primary_address()[1]
        return [node for node in self.servers if node.port != primary]

    def stall_replication(self) -> None:
        """Make the replicas fall behind the primary, as a partition would.

        The replicas stop (SIGSTOP), then the primary drops its links to them,
        so that nothing written from now on reaches them: lost with the
        primary if it dies now. (Filling the link instead is not enough: a
        kernel that lets a socket buffer 32 MiB passes later writes on.)
        """
        for node in self.replica_nodes():
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
        for node in self.replica_nodes():
            assert node.proc is not None
            wait_until(functools.partial(stopped, node.proc.pid), f"replica {node.port} stopped")
        primary = self.primary().client(socket_timeout=5)
        primary.execute_command("CLIENT", "KILL", "TYPE", "replica")
        wait_until(
            lambda: primary.info("replication")["connected_slaves"] == 0,
            "the primary without replicas",
        )

    def resume_replicas(self) -> None:
        """Let stalled replicas run again (SIGCONT)."""
        for node in self.servers:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)

    def clients_waiting_for_replicas(self) -> int:
        """How many clients of the primary are blocked in ``WAIT``."""
        clients = self.primary().client(socket_timeout=1).client_list()
        return sum(1 for client in clients if client.get("cmd") == "wait")

    def kill_primary(self) -> tuple[str, int]:
        """SIGKILL the primary (no goodbye to anyone); return its address."""
        old = self.primary_address()
        self.primary().kill()
        return old

    def wait_failover(self, old: tuple[str, int]) -> tuple[str, int]:
        """Wait until every Sentinel names a new primary that answers as one."""

        def promoted() -> tuple[str, int] | None:
            addresses = {
                (host.decode(), int(port))
                for host, port in (
                    s.client(socket_timeout=1).execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                    for s in self.sentinels
                )
            }
            if len(addresses) != 1 or old in addresses:
                return None
            new = addresses.pop()
            role = redis.Redis(*new, socket_timeout=1).role()[0]
            return new if role == b"master" else None

        return wait_until(promoted, f"a replica promoted in place of {old}")

    def stop(self) -> None:
        """Stop everything and remove the directory."""
        for node in [*self.sentinels, *self.servers]:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- RabbitMQ -----------------------------------------------------------------------

#: The RabbitMQ the broker tests use (``CO_TEST_AMQP_URL``, else the machine's).
AMQP_URL = os.environ.get("CO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def rabbitmq_answering(_name: str = "RabbitMQ") -> str | None:
    """:data:`AMQP_URL` when a server accepts connections at its host and port, else None.

    A ``find`` for :func:`tests.support.tools.require_tool`.
    """
    from kombu.utils.url import url_to_parts

    url = AMQP_URL
    parts = url_to_parts(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 1):
            return url
    except OSError:
        return None


# -- Celery workers whose streams live on a topology --------------------------------


def topology_worker(store_url: str, queue: str, *, concurrency: int = 2, **settings: Any) -> Worker:
    """A worker of :mod:`tests.apps.topologyapp` on ``queue``, publishing to ``store_url``.

    ``settings`` are extra Celery settings of its app (JSON-able), as
    :func:`tests.apps.topologyapp.topology_app` takes them. Its process group
    is its own, killed whole when it stops.
    """
    return Worker(
        "tests.apps.topologyapp:worker_app",
        queue=queue,
        concurrency=concurrency,
        hostname=f"topology-{uuid.uuid4().hex[:6]}@%h",
        extra_env={STORE_ENV: store_url, SETTINGS_ENV: json.dumps(settings)},
        new_session=True,
    )


@contextlib.contextmanager
def topology_workers(
    store_url: str, queue: str, count: int = 1, **settings: Any
) -> Iterator[list[Worker]]:
    """``count`` workers on ``queue`` publishing to ``store_url``; stopped at the end."""
    workers = [topology_worker(store_url, queue, **settings) for _ in range(count)]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()
