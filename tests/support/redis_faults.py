"""Redis broken for real: killed with SIGKILL, restarted on its data, replies cut.

- :func:`persistent_redis`: a private Redis that persists every write (AOF,
  ``appendfsync always``) in a directory the test owns, so a new server
  started on it has the data;
- :func:`kill_redis`: SIGKILL the ``redis-server`` process (no clean flush,
  no goodbye to its clients), then reap its keeper;
- :func:`blocked_clients`: how many clients wait in a blocking command (a
  consumer in ``get()`` waits in ``BLPOP``): what a test waits for before it
  breaks Redis under a waiting consumer;
- :class:`ReplyCutter`: a TCP proxy in front of a Redis that forwards one
  chosen request and then closes the client's connection instead of
  forwarding the reply: a reply lost between server and client.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import redis

from celery_ordered import RedisServer
from tests.support.processes import wait_gone

#: The arguments of a Redis that loses no acknowledged write in a crash.
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")


def persistent_redis(directory: str, *, port: int | None = None) -> RedisServer:
    """A started private Redis working in ``directory``, with AOF fsynced on every write.

    Its URL (a unix socket in ``directory``) stays the same across restarts.
    """
    return RedisServer(directory=directory, port=port, args=AOF_ALWAYS).start()


def kill_redis(server: RedisServer) -> None:
    """SIGKILL ``server``'s ``redis-server``, wait until it is gone, then reap its keeper."""
    client = redis.Redis.from_url(server.url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    os.kill(pid, signal.SIGKILL)
    wait_gone([pid])
    server.stop()  # the keeper: its Redis is already dead


def blocked_clients(url: str) -> int:
    """How many clients of the Redis at ``url`` wait in a blocking command."""
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["blocked_clients"])
    finally:
        client.close()


class ReplyCutter:
    """A TCP proxy on 127.0.0.1 in front of the Redis ``upstream`` (a pool's connection kwargs).

    It forwards everything both ways, except after :meth:`cut_reply_to`
    armed it: the next request that contains ``marker`` is forwarded to Redis
    (which runs it), and then the client's connection is closed instead of
    forwarding the reply. ``requests_with(marker)`` counts the requests seen
    that contained it; :attr:`cut` how many replies were cut. Use as a
    context manager; it closes every socket at the end.
    """

    def __init__(self, upstream: dict[str, Any]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: bytes | None = None
        self._seen: dict[bytes, int] = {}
        self._sockets: list[socket.socket] = [self._listener]
        self._closing = False
        #: How many replies were cut so far.
        self.cut = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, db: int) -> str:
        """A redis-py URL of database ``db`` through the proxy (with the upstream's password)."""
        password = self._upstream.get("password")
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def cut_reply_to(self, marker: bytes) -> None:
        """Cut the reply to the next request containing ``marker``, once."""
        with self._lock:
            self._armed = marker
            self._seen.setdefault(marker, 0)

    def requests_with(self, marker: bytes) -> int:
        """How many requests containing ``marker`` went through since it was armed."""
        with self._lock:
            return self._seen.get(marker, 0)

    def _connect_upstream(self) -> socket.socket:
        path = self._upstream.get("path")
        if path:
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(path)
            return upstream
        host = self._upstream.get("host", "127.0.0.1")
        return socket.create_connection((host, int(self._upstream.get("port", 6379))))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = self._connect_upstream()
            with self._lock:
                if self._closing:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        cut_next_reply = False
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [])
                if client in readable:
                    data = client.recv(65536)
                    if not data:
                        return
                    with self._lock:
                        for marker in self._seen:
                            if marker in data:
                                self._seen[marker] += 1
                        if self._armed is not None and self._armed in data:
                            # Decided before Redis can answer: its reply is never sent.
                            self._armed, cut_next_reply = None, True
                    upstream.sendall(data)
                if upstream in readable:
                    data = upstream.recv(65536)
                    if not data:
                        return
                    if cut_next_reply:
                        with self._lock:
                            self.cut += 1
                        return  # the reply is dropped with the connection
                    client.sendall(data)
        except (OSError, ValueError):
            # close() closed the sockets under us (select() then sees fd -1).
            return
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        """Stop accepting and close every connection."""
        with self._lock:
            self._closing = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ReplyCutter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def reply_cutter(client: redis.Redis) -> Iterator[ReplyCutter]:
    """A :class:`ReplyCutter` in front of the Redis ``client`` talks to."""
    with ReplyCutter(dict(client.connection_pool.connection_kwargs)) as cutter:
        yield cutter
