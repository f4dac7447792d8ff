"""Thin Python wrappers over the Lua scripts: the only module that knows keys.

Each method is one round trip to Redis. The scripts live one per file in
``celery_ordered/lua/`` with a header naming every key and argument; they are
read once per process and registered once per client (redis-py's
:class:`~redis.commands.core.Script` handles ``EVALSHA`` and reloads after
``SCRIPT FLUSH``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from .keys import StreamKeys

#: Longest single blocking wait on Redis, in seconds. A waiter that was told
#: nothing for this long looks at the stream again, so a wake-up token lost to
#: a Redis restart costs at most this much, never a stall. It is kept below the
#: client's ``socket_timeout`` (redis-py's default is 5 s), or the read of a
#: blocked ``BLPOP`` would time out first.
WAIT_SLICE = 2.0

_SCRIPTS = ("claim", "publish", "pop", "close", "stats", "reclaim")


@functools.cache
def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


_registered: weakref.WeakKeyDictionary[redis.Redis, dict[str, Any]] = weakref.WeakKeyDictionary()


def _scripts(client: redis.Redis) -> dict[str, Any]:
    scripts = _registered.get(client)
    if scripts is None:
        scripts = {name: client.register_script(_lua(name)) for name in _SCRIPTS}
        _registered[client] = scripts
    return scripts


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`Protocol.claim`."""

    first: int
    count: int
    closed: bool


@dataclass(frozen=True)
class Batch:
    """The outcome of :meth:`Protocol.pop`."""

    next: int
    closed_at: int | None
    stored: int
    start: int
    window: int
    members: list[bytes]


@dataclass(frozen=True)
class RawStats:
    """The outcome of :meth:`Protocol.stats`."""

    claimed: int
    next: int
    window: int
    stored: int
    contiguous: int
    closed_at: int | None
    #: Redis's clock, in ms, when the snapshot was taken.
    now_ms: int
    #: When the head-of-line blocker (number ``next + contiguous``, the first
    #: one whose outcome is missing) was claimed, in ms; None if none waits.
    head_claimed_ms: int | None


@dataclass(frozen=True)
class Overdue:
    """One number :meth:`Protocol.reclaim` found overdue."""

    seq: int
    lost: bool
    record: bytes


class Protocol:
    """The operations on one stream's state in Redis."""

    def __init__(self, client: redis.Redis, name: str, *, ttl: float | None = None) -> None:
        self.client = client
        self.keys = StreamKeys(name)
        #: ms every key lives after its last use; 0: forever.
        self.ttl_ms = int(ttl * 1000) if ttl else 0
        self._run = _scripts(client)
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self.wait_slice = WAIT_SLICE
        if socket_timeout:
            self.wait_slice = min(WAIT_SLICE, max(0.05, float(socket_timeout) / 2))

    def claim(
        self,
        records: list[bytes],
        default_window: int,
        *,
        producer: str,
        claim_id: str,
        lost_after: float | None = None,
    ) -> Claim:
        """Claim up to ``len(records)`` numbers if the window allows (see claim.lua).

        ``records`` says what each number is for (dispatched again if its
        outcome is overdue by ``lost_after`` seconds); ``claim_id``, unique per
        call from ``producer``, makes a retry of this same call after a lost
        reply return the same numbers.
        """
        k = self.keys
        first, count = self._run["claim"](
            keys=[
                k.seq, k.next, k.window, k.closed, k.space, k.pending, k.deadlines,
                k.producers,
            ],
            args=[
                len(records), default_window, int((lost_after or 0) * 1000), self.ttl_ms,
                producer, claim_id, *records,
            ],
        )  # fmt: skip
        return Claim(int(first), int(count), closed=int(first) < 0)

    def publish(self, seq: int, member: bytes) -> int:
        """Store one outcome; 1 stored, 0 duplicate or late, -1 never claimed."""
        k = self.keys
        return int(
            self._run["publish"](
                keys=[k.seq, k.next, k.results, k.ready, k.closed, k.done, k.pending, k.deadlines],
                args=[seq, member, self.ttl_ms],
            )
        )

    def pop(self, ack: int, start: int, limit: int) -> Batch:
        """Acknowledge below ``ack`` and read the gapless run from ``start``."""
        k = self.keys
        reply = self._run["pop"](
            keys=[k.next, k.results, k.closed, k.space, k.ready, k.window],
            args=[ack, start, limit, self.ttl_ms],
        )
        closed = int(reply[1])
        return Batch(
            next=int(reply[0]),
            closed_at=None if closed < 0 else closed,
            stored=int(reply[2]),
            start=int(reply[3]),
            window=int(reply[4]),
            members=list(reply[5:]),
        )

    def close(self) -> int:
        """Close the stream to claims; returns the number of claims made."""
        k = self.keys
        return int(
            self._run["close"](
                keys=[k.seq, k.next, k.results, k.closed, k.ready, k.done, k.space],
                args=[self.ttl_ms],
            )
        )

    def stats(self) -> RawStats:
        """One consistent snapshot of the stream's counters."""
        k = self.keys
        claimed, nxt, window, stored, contiguous, closed, now, head = self._run["stats"](
            keys=[k.seq, k.next, k.window, k.results, k.closed, k.pending]
        )
        return RawStats(
            int(claimed),
            int(nxt),
            int(window),
            int(stored),
            int(contiguous),
            None if int(closed) < 0 else int(closed),
            int(now),
            None if int(head) < 0 else int(head),
        )

    def reclaim(self, lost_after: float, limit: int, batch: int = 100) -> list[Overdue]:
        """Numbers overdue for an outcome: to dispatch again, or (past ``limit``) lost."""
        k = self.keys
        reply = self._run["reclaim"](
            keys=[k.next, k.results, k.pending, k.deadlines],
            args=[int(lost_after * 1000), limit, batch],
        )
        return [
            Overdue(int(reply[i + 1]), reply[i] == b"lost", reply[i + 2])
            for i in range(0, len(reply), 3)
        ]

    def set_window(self, window: int, *, only_if_unset: bool = False) -> None:
        """Store the window cap and wake blocked producers to look at it."""
        k = self.keys
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(k.window, window, nx=only_if_unset)
            pipe.rpush(k.space, 1)
            pipe.ltrim(k.space, 0, 0)
            if self.ttl_ms:
                pipe.pexpire(k.window, self.ttl_ms)
                pipe.pexpire(k.space, self.ttl_ms)
            pipe.execute()

    def exists(self) -> bool:
        """Whether anything was ever claimed in (or a window set on) the stream."""
        k = self.keys
        return bool(self.client.exists(k.seq, k.window))

    def delete(self) -> int:
        """Remove every key of the stream; returns how many existed."""
        return int(self.client.delete(*self.keys.all()))

    def _wait(self, key: str, timeout: float) -> bool:
        # BLPOP's timeout is in seconds (fractions allowed since Redis 6); 0
        # would mean forever, so keep it strictly positive and bounded.
        wait = min(max(timeout, 0.001), self.wait_slice)
        return self.client.blpop([key], timeout=wait) is not None

    def wait_space(self, timeout: float) -> bool:
        """Block until a consumer frees window space (or ``timeout``)."""
        return self._wait(self.keys.space, timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the head of the stream may be ready (or ``timeout``)."""
        return self._wait(self.keys.ready, timeout)

    def wait_done(self, timeout: float) -> bool:
        """Block until every claimed number may be filled (or ``timeout``)."""
        got = self._wait(self.keys.done, timeout)
        if got:
            # Being done is final: leave the token for any other joiner.
            self.client.rpush(self.keys.done, 1)
            self.client.ltrim(self.keys.done, 0, 0)
        return got
