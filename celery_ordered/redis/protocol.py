"""Thin Python wrappers over the Lua scripts: the only module that knows keys.

Each method is one round trip to Redis. The scripts live one per file in
``celery_ordered/redis/lua/`` with a header naming every key and argument;
each is read once per process with ``_prelude.lua`` (the clock, wake tokens
and expiry renewal every script shares) put in front of it
(:func:`script_source`), and registered once per client (redis-py's
:class:`~redis.commands.core.Script` handles ``EVALSHA`` and reloads after
``SCRIPT FLUSH``).

The client may be one server (Sentinel's primary is one) or a Redis Cluster:
every key of a stream shares one hash slot, so each script runs whole on the
one node that holds the stream.

With a :class:`Durability`, every durable write (claim, publish, pop, close,
window) is followed, on the same connection and in the same round trip, by
``WAIT``: the call returns once that many replicas hold the write, so a
failover to one of them cannot take it back. Five scripts never wait for
replicas, as a failover that takes their write back costs no outcome:
``reclaim`` (its numbers only come due again), ``lease`` (a worker's
heartbeat: the next one, a third of a lease later, writes it again), ``hedge``
(at worst a second backup copy of a task meant for idempotent work),
``timing`` (a few run-time samples fewer) and ``stats`` (it reads).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, NoScriptError

from ..errors import ConfigurationError, ConsumerFenced, StreamDeleted, StreamStateLost
from ..steps import Command, Script, Step, blocking, run
from .clients import AsyncClient, Client, ClusterUnavailable
from .keys import StreamKeys

logger = logging.getLogger(__name__)

#: Longest single blocking wait on Redis, in seconds. A waiter that was told
#: nothing for this long looks at the stream again, so a wake-up token lost to
#: a Redis restart costs at most this much, never a stall. It is kept below the
#: client's ``socket_timeout`` (redis-py's default is 5 s), or the read of a
#: blocked ``BLPOP`` would time out first.
WAIT_SLICE = 2.0

#: Seconds between the renewals of a stream's expiry by one handle's frequent
#: scripts (the consumer's ``pop``, the producer's ``claim``): see :meth:`Protocol._renewal`.
RENEW_EVERY = 60.0

#: The scripts, one per operation: ``lua/<name>.lua``.
SCRIPTS = (
    "claim", "publish", "pop", "close", "stats", "reclaim", "window", "lease", "hedge", "timing"
)  # fmt: skip

#: The file put in front of every script: the local functions they share.
PRELUDE = "_prelude"

_T = TypeVar("_T")


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


def _prelude_functions() -> list[tuple[str, str]]:
    """The prelude's functions in order: (name, source), each with the comments before it."""
    functions: list[tuple[str, str]] = []
    chunk: list[str] = []
    for line in _read(PRELUDE).splitlines(keepends=True):
        chunk.append(line)
        if line.startswith("end"):
            source = "".join(chunk)
            found = re.search(r"^local function (\w+)\(", source, re.MULTILINE)
            if found is None:
                raise ValueError(f"{PRELUDE}.lua: a block ends with no local function: {source!r}")
            functions.append((found.group(1), source))
            chunk = []
    return functions


@functools.cache
def script_source(name: str) -> str:
    """The Lua Redis runs for script ``name``: what it calls of ``_prelude.lua``, then its own.

    The prelude defines local functions only (``now_ms()``, ``wake(key)``,
    ``refresh(ttl, key...)``), so each script keeps its own ``KEYS`` and
    ``ARGV`` as its header describes them. A script gets only the functions
    it calls (and those they call): Redis makes each of them anew on every
    call, which a publish, run once per task, would pay for nothing.
    """
    if name not in SCRIPTS:
        raise ValueError(f"no Lua script named {name!r}: the scripts are {', '.join(SCRIPTS)}")
    body = _read(name)
    functions = _prelude_functions()
    used = "".join(line.partition("--")[0] for line in body.splitlines(keepends=True))
    wanted: set[str] = set()
    for fn, source in reversed(functions):  # a function calls only those defined before it
        if re.search(rf"\b{fn}\(", used):
            wanted.add(fn)
            used += source
    return "".join(source for fn, source in functions if fn in wanted) + body


_registered: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def _scripts(client: Client | AsyncClient) -> dict[str, Any]:
    """The scripts registered on ``client`` (blocking or asyncio), once per client."""
    scripts = _registered.get(client)
    if scripts is None:
        scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}
        _registered[client] = scripts
    return scripts


#: Seconds a write waits for its replicas before it fails (``ordered_wait_timeout``).
DEFAULT_WAIT_TIMEOUT = 20.0


@dataclass(frozen=True)
class Durability:
    """How many replicas each write waits for (``WAIT``), and for how long."""

    #: Replicas that must acknowledge a write before it counts as done.
    replicas: int
    #: Seconds to wait for them before the write fails.
    timeout: float = DEFAULT_WAIT_TIMEOUT


class NotReplicated(redis.TimeoutError):
    """Fewer replicas than ``ordered_wait_replicas`` acknowledged a write in time.

    The write is on the primary; a failover before a replica has it could
    still lose it. It is a ``redis.TimeoutError``, so a stream reports it as
    :class:`~celery_ordered.RedisUnavailable` and a worker gives the task's
    message back to the broker, to publish again later. A claim is the
    exception: its numbers are taken on the primary, so the producer goes on
    with them (logging a warning) rather than leave them undispatched; a
    failover that loses them is then caught as
    :class:`~celery_ordered.StreamStateLost`.
    """

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        #: The script's reply on the primary.
        self.result = result


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
    #: The caller's consumer lease epoch.
    epoch: int = 0
    #: Numbers claimed so far.
    claimed: int = 0
    #: The producer's encoded error, once ``start`` reached a stream closed with one.
    error: bytes = b""


class LeaseHeld(Exception):
    """:meth:`Protocol.pop` could not acquire the consumer lease: another consumer holds it."""

    def __init__(self, remaining: float, owner: str) -> None:
        super().__init__(f"held by {owner} for {remaining:g}s more")
        #: Seconds until the other consumer's lease lapses, unless it renews it.
        self.remaining = remaining
        #: The other consumer's id (host, pid and handle).
        self.owner = owner


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
    #: The stream's incarnation id ("" when the stream does not exist).
    incarnation: str = ""
    #: Overdue tasks dispatched again, over the stream's life.
    redispatched: int = 0
    #: Places filled as lost after their last re-dispatch.
    lost: int = 0
    #: Backup copies sent by hedging, over the stream's life.
    hedged: int = 0
    #: The blocker's lane (its queue and priority, as ``liveness.lane_token``
    #: wrote it into its dispatch record); "" if none waits.
    head_lane: str = ""
    #: The blocker's record status: "T" a task, "M" a marker, "" none.
    head_status: str = ""
    #: The lease of the worker holding the blocker (its ``h:`` field), "" if none.
    head_lease: str = ""
    #: Where the blocker waits in its queue after a re-dispatch (``w:``), "" if not.
    head_waits: str = ""
    #: When a backup copy of the blocker was sent (``b:``, ms), "" if none.
    head_backup: str = ""
    #: Times the blocker was dispatched again.
    head_redispatched: int = 0
    #: When the blocker's lane may count as idle (ms); None if it has no deadline.
    head_deadline_ms: int | None = None
    #: The blocker's lane entry: "<highest number received>|<last activity ms>", or "".
    head_lane_progress: str = ""
    #: What the adaptive window last did and why; "" when the window is fixed.
    window_why: str = ""


@dataclass(frozen=True)
class Overdue:
    """One number :meth:`Protocol.reclaim` found overdue."""

    seq: int
    lost: bool
    record: bytes
    #: Why: "lapsed" (its worker's lease lapsed), "overtaken" (a number sent
    #: after it to its lane was received), "idle" (its lane showed no progress
    #: for ``lost_after``).
    why: str = ""


#: How many numbers from the consumer's position :meth:`Protocol.reclaim`
#: checks for being overtaken in their queue, per call.
RECLAIM_SCAN = 1000


class Protocol:
    """The operations on one stream's state in Redis.

    ``durability`` makes every write wait for that many replicas (see
    :class:`Durability`); None writes to the primary
    only, as Redis does by default.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        ttl: float | None = None,
        durability: Durability | None = None,
    ) -> None:
        self.client = client
        self.keys = StreamKeys(name)
        #: The stream's incarnation id, learned by :meth:`open`: the scripts
        #: that write refuse a stream that is not this incarnation any more.
        self.incarnation = ""
        #: ms every key lives after its last use; 0: forever.
        self.ttl_ms = int(ttl * 1000) if ttl else 0
        self.durability = durability
        self._run = _scripts(client)
        socket_timeout = client.get_connection_kwargs().get("socket_timeout")
        self.wait_slice = WAIT_SLICE
        if socket_timeout:
            self.wait_slice = min(WAIT_SLICE, max(0.05, float(socket_timeout) / 2))
        # When each script this handle runs often last renewed its keys' expiry.
        self._renewed_at: dict[str, float] = {}
        # Each producer's last claim id and the end of its numbers: a later
        # claim that starts below it means Redis lost writes (see claim()).
        self._claimed_to: dict[str, tuple[str, int]] = {}

    def _renewal(self, script: str, *, force: bool = False) -> int:
        """The ``ttl`` argument of ``script``, which this handle runs many times a second.

        ``ttl_ms`` (renew the expiry of every key the script touches) on the
        script's first call and then at most every :data:`RENEW_EVERY` (or a
        tenth of the TTL), or when ``force``; ``-ttl_ms`` in between: the
        script renews nothing, and gives an expiry only to a key it creates.
        A busy stream then pays for its keys' expiry once a minute, not on
        every call. Each script keeps its own schedule: each renews its keys.
        """
        if not self.ttl_ms:
            return 0
        now = time.monotonic()
        last = self._renewed_at.get(script, -math.inf)
        if force or now - last >= min(RENEW_EVERY, self.ttl_ms / 10_000):
            self._renewed_at[script] = now
            return self.ttl_ms
        return -self.ttl_ms

    def _and_the_rest(self, keys: list[str], ttl: int) -> list[str]:
        """``keys``, then every other key of the stream when ``ttl`` renews (> 0).

        A script that renews gives every key it is passed ``ttl`` ms
        (``refresh(ttl, unpack(KEYS))``), so a renewing call renews the whole
        stream, not only the keys it uses: no key of a stream in use expires
        before the others. (A ``pending`` hash that expired while its numbers
        waited in a queue, say, made their outcomes look like duplicates, and
        left nothing to dispatch again: a stall nothing could end.)
        """
        if ttl <= 0:
            return keys
        return keys + [key for key in self.keys.all() if key not in keys]

    # -- running scripts -------------------------------------------------------

    def _call(self, name: str, keys: list[str], args: list[Any], *, durable: bool = True) -> Any:
        """Run one script; ``durable``: its writes wait for the replicas of :attr:`durability`.

        False for a script that writes nothing (stats), or whose writes a
        failover may take back harmlessly (reclaim).
        """
        if durable and self.durability is not None:
            return self._durably(self._run[name], keys, args, self.durability)
        return self._cluster_hint(lambda: self._run[name](keys=keys, args=args))

    def _cluster_hint(self, do: Callable[[], _T]) -> _T:
        """Run ``do``; a MOVED reply means the URL names one node of a cluster."""
        try:
            return do()
        except MovedError as exc:  # a RedisCluster client follows these itself
            raise self.moved(exc) from exc

    def moved(self, exc: MovedError) -> ConfigurationError:
        """The error for a ``MOVED`` reply: the URL names one node of a cluster."""
        return ConfigurationError(
            f"the Redis of stream {self.keys.name!r} is a node of a Redis Cluster (it "
            f"answered MOVED {exc}): connect with redis+cluster://host:port so that each "
            "stream goes to the node that holds it"
        )

    def perform(self, request: Script | Command) -> Any:
        """Carry out one request of an operation (see :mod:`celery_ordered.steps`), blocking."""
        if isinstance(request, Script):
            return self._call(request.name, request.keys, request.args, durable=request.durable)
        return self._cluster_hint(lambda: self.client.execute_command(*request.args))

    def _durably(self, script: Any, keys: list[str], args: list[Any], want: Durability) -> Any:
        """``EVALSHA``, a write of the ``mark`` key and ``WAIT``, on one connection.

        ``WAIT`` counts the replicas that hold every earlier write of its own
        connection, so all three go out together on one connection, in one
        round trip. The ``mark`` write makes the count cover a retried script
        that found its work done and wrote nothing (the first try's writes came
        before it). Too few replicas: ``WAIT`` again on the same connection
        until ``want.timeout`` has passed, then :class:`NotReplicated`. A lost
        connection runs all three again (every script is safe to repeat).
        """
        if self.ttl_ms:
            mark: tuple[Any, ...] = ("SET", self.keys.mark, 1, "PX", self.ttl_ms)
        else:
            mark = ("SET", self.keys.mark, 1)

        def attempt(node: redis.Redis, conn: Any) -> tuple[Any, int]:
            # The replicas get want.timeout from the moment the primary has the write.
            deadline = time.monotonic() + want.timeout

            def wait_ms() -> int:
                # WAIT 0 would wait forever; a slice keeps it under socket_timeout.
                return max(1, int(min(deadline - time.monotonic(), self.wait_slice) * 1000))

            evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
            replies = _send(node, conn, [evalsha, mark, ("WAIT", want.replicas, wait_ms())])
            if isinstance(replies[0], NoScriptError):  # a new or flushed server
                _send(node, conn, [("SCRIPT", "LOAD", script.script)])
                replies = _send(node, conn, [evalsha, mark, ("WAIT", want.replicas, wait_ms())])
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            acked = int(replies[-1])
            while acked < want.replicas and time.monotonic() < deadline:
                acked = int(_send(node, conn, [("WAIT", want.replicas, wait_ms())])[0])
            return replies[0], acked

        result, acked = self._cluster_hint(lambda: self._on_one_connection(keys[0], attempt))
        if acked < want.replicas:
            raise NotReplicated(
                f"stream {self.keys.name!r}: only {acked} of the {want.replicas} replica(s) "
                f"asked for (ordered_wait_replicas) acknowledged a write within "
                f"{want.timeout:g}s (ordered_wait_timeout). The write is on the primary, but a "
                "failover now could lose it; check that the replicas are up and in sync",
                result=result,
            )
        return result

    def _on_one_connection(self, key: str, attempt: Callable[[redis.Redis, Any], _T]) -> _T:
        """Run ``attempt(node, connection)`` on a connection to the node holding ``key``.

        Connection errors (a failover, a node restarting) are retried with the
        client's backoff on a fresh connection, after a cluster client has
        looked at the cluster's layout again.
        """
        cluster = self.client if isinstance(self.client, RedisCluster) else None
        retry = _retry_of(self.client)

        def once() -> _T:
            node: redis.Redis = (
                self.client  # type: ignore[assignment]
                if cluster is None
                else cluster.get_redis_connection(cluster.get_node_from_key(key))
            )
            pool = node.connection_pool
            conn = pool.get_connection()
            try:
                return attempt(node, conn)
            except (MovedError, AskError) as exc:
                if cluster is None:
                    raise
                raise ClusterUnavailable(f"the slot of {key} is moving: {exc}") from exc
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                raise
            finally:
                pool.release(conn)

        def failed(error: Exception) -> None:
            if give_up is not None and time.monotonic() >= give_up:
                raise error  # out of retry_for: Retry passes this on
            if cluster is not None:
                # Unreachable now: the next try reports the cluster's state.
                with contextlib.suppress(Exception):
                    cluster.nodes_manager.initialize()

        if retry is None:
            return once()
        # Taking a connection already retries for about retry_for when Redis
        # is down: bound the retries of the whole by that time too.
        retry_for = getattr(retry, "retry_for", None)
        give_up = None if retry_for is None else time.monotonic() + retry_for
        result: _T = retry.call_with_retry(once, failed)
        return result

    # -- the operations ----------------------------------------------------------

    def claim_op(
        self,
        records: list[bytes],
        default_window: int,
        *,
        producer: str,
        claim_id: str,
        lost_after: float | None = None,
    ) -> Step[Claim]:
        """Claim up to ``len(records)`` numbers if the window allows (see claim.lua).

        ``records`` says what each number is for (dispatched again if its
        outcome is overdue by ``lost_after`` seconds); ``claim_id``, unique per
        call from ``producer``, makes a retry of this same call after a lost
        reply return the same numbers.

        Numbers only ever grow: a claim that starts below the end of this
        ``producer``'s previous one means the stream's state in Redis went
        back in time (a failover to a replica that had not received the latest
        writes, a restore from an older snapshot), and raises
        :class:`~celery_ordered.StreamStateLost` instead of handing out
        numbers whose tasks are already on their way.

        An operation (:mod:`celery_ordered.steps`); :meth:`claim` runs it, blocking.
        """
        k = self.keys
        ttl = self._renewal("claim")
        try:
            first, count = yield Script(
                "claim",
                self._and_the_rest(
                    [k.seq, k.next, k.window, k.closed, k.space, k.pending, k.deadlines,
                     k.producers, k.created, k.results, k.adapt],
                    ttl,
                ),
                [
                    len(records), default_window, int((lost_after or 0) * 1000), ttl,
                    producer, claim_id, self.incarnation, *records,
                ],
            )  # fmt: skip
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "put") from exc
        except NotReplicated as exc:
            # The numbers are taken on the primary: raising would leave them
            # undispatched (a gap until lost_after) and a retried put would
            # claim new ones (the task twice). Go on with them.
            logger.warning("%s; this producer goes on with the numbers it claimed", exc)
            first, count = exc.result
        claim = Claim(int(first), int(count), closed=int(first) < 0)
        if claim.count:
            last_id, floor = self._claimed_to.get(producer, ("", 0))
            if claim_id != last_id and claim.first < floor:
                raise self.went_back(
                    f"Redis handed out number {claim.first} again, after this producer "
                    f"had claimed up to {floor - 1}",
                    seq=claim.first,
                )
            self._claimed_to[producer] = (claim_id, claim.first + claim.count)
        return claim

    claim = blocking(claim_op)

    def went_back(self, what: str, *, seq: int) -> StreamStateLost:
        """The error for a stream whose state in Redis went back in time: ``what`` happened."""
        return StreamStateLost(
            f"stream {self.keys.name!r}: {what}. The stream's state in Redis went back in "
            "time (a failover to a replica that had not yet received the latest writes, "
            "or a restore from an older snapshot), so outcomes may be missing or doubled: "
            "start the work again on a new stream. "
            "app.conf.ordered_wait_replicas makes every write wait for replicas, so that "
            "a failover cannot take it back",
            stream=self.keys.name,
            seq=seq,
        )

    def deleted(self, what: str) -> StreamDeleted:
        """The error for a stream that is gone (or is another incarnation) under ``what``."""
        return StreamDeleted(
            f"stream {self.keys.name!r} was deleted (delete(), celery ordered purge, its "
            "keys expired after ordered_stream_ttl unused, or its Redis lost them: a "
            f"restart without persistence, FLUSHDB) while {what} used it; nothing was "
            "written. Start the work again on a new stream",
            stream=self.keys.name,
        )

    def _deleted_or(self, exc: redis.ResponseError, what: str) -> Exception:
        """A script's ``DELETED`` error reply as :class:`StreamDeleted`; others as they are."""
        if str(exc) == "DELETED":
            return self.deleted(what)
        return exc

    def publish_op(self, seq: int, member: bytes, *, incarnation: str | None = None) -> Step[int]:
        """Store one outcome; 1 stored, 0 duplicate or late, < 0 refused (see :meth:`refused`).

        -1: never claimed in this incarnation of the stream; -2: claimed in
        it, but the stream's state went back to before that claim.
        ``incarnation`` (default: this handle's, if it opened the stream) is
        the incarnation the number was claimed in: another one (the stream
        was deleted, maybe created again) refuses the outcome. "" skips that
        check (and cannot tell -2 from -1).

        An operation (:mod:`celery_ordered.steps`); :meth:`publish` runs it, blocking.
        """
        k = self.keys
        stored = yield Script(
            "publish",
            [k.seq, k.next, k.results, k.ready, k.closed, k.done, k.pending, k.created,
             k.window, k.space, k.adapt],
            [seq, member, self.ttl_ms, self.incarnation if incarnation is None else incarnation],
        )  # fmt: skip
        return int(stored)

    publish = blocking(publish_op)

    def refused(self, stored: int, seq: int, what: str) -> StreamStateLost:
        """The error for :meth:`publish`'s refusal ``stored`` (< 0) of number ``seq``."""
        if stored == -2:
            return self.went_back(
                f"number {seq}, claimed by {what}, is beyond every number its Redis has handed out",
                seq=seq,
            )
        return self.deleted(what)

    def pop_op(
        self,
        ack: int,
        start: int,
        limit: int,
        *,
        owner: str = "",
        epoch: int = 0,
        lease: float = 30.0,
        mode: str = "",
        waited: bool = False,
    ) -> Step[Batch]:
        """Acknowledge below ``ack`` and read the gapless run from ``start``.

        Only the holder of the consumer lease may: ``epoch`` is the caller's
        (0 acquires the lease, raising :class:`LeaseHeld` while ``owner``'s
        rival holds a live one, unless ``mode`` is ``"take"``); another epoch
        raises :class:`~celery_ordered.ConsumerFenced`. ``lease`` (seconds)
        is renewed by every call; ``mode="free"`` releases it after this call.
        ``waited`` tells that the caller waited for outcomes before this call
        (it lingered, or waited on ``ready``): an adaptive window more than
        half in use before this call's acknowledgement then grows, even if
        the head is there (see ``pop.lua``).

        Acknowledging numbers that were never claimed means the stream's state
        went back in time: :class:`~celery_ordered.StreamStateLost`, instead
        of waiting for outcomes that can never come. A stream deleted since
        it was opened: :class:`~celery_ordered.StreamDeleted`.

        An operation (:mod:`celery_ordered.steps`); :meth:`pop` runs it, blocking.
        """
        k = self.keys
        ttl = self._renewal("pop", force=epoch == 0)
        try:
            reply = yield Script(
                "pop",
                self._and_the_rest(
                    [k.next, k.results, k.closed, k.space, k.ready, k.window, k.seq, k.created,
                     k.consumer, k.error, k.adapt, k.pending, k.deadlines],
                    ttl,
                ),
                [ack, start, limit, ttl, self.incarnation, owner, epoch, max(1, int(lease * 1000)),
                 mode, 1 if waited else 0],
            )  # fmt: skip
        except redis.ResponseError as exc:
            word, _, rest = str(exc).partition(" ")
            if word == "ROLLBACK":
                claimed = int(rest)
                raise self.went_back(
                    f"this consumer has taken outcomes up to number {ack - 1}, but Redis says "
                    f"only {claimed} numbers were ever claimed",
                    seq=claimed,
                ) from exc
            if word == "LEASED":
                remaining, _, holder = rest.partition(" ")
                raise LeaseHeld(int(remaining) / 1000, holder) from exc
            if word == "FENCED":
                current, _, holder = rest.partition(" ")
                raise ConsumerFenced(
                    f"stream {self.keys.name!r}: another consumer ({holder}) took over "
                    f"consuming it (lease epoch {current}; this consumer had {epoch}), so "
                    "this one stopped rather than skip or repeat outcomes; its outcomes "
                    "handed out but not acknowledged go to the new consumer. Keep one "
                    "consumer per stream, and get() more often than ordered_consumer_lease "
                    "(a consumer that pauses for longer may be taken over); take_over() "
                    "makes this one the consumer again",
                    stream=self.keys.name,
                ) from exc
            raise self._deleted_or(exc, "a consumer") from exc
        closed = int(reply[1])
        return Batch(
            next=int(reply[0]),
            closed_at=None if closed < 0 else closed,
            stored=int(reply[2]),
            start=int(reply[3]),
            window=int(reply[4]),
            epoch=int(reply[5]),
            claimed=int(reply[6]),
            error=bytes(reply[7]),
            members=list(reply[8:]),
        )

    pop = blocking(pop_op)

    def close_op(self, error: bytes = b"") -> Step[int]:
        """Close the stream to claims; returns the number of claims made.

        ``error`` (encoded) is kept for consumers if this call is the one that
        closes the stream: they get it after every outcome, in place of a
        normal end.

        An operation (:mod:`celery_ordered.steps`); :meth:`close` runs it, blocking.
        """
        k = self.keys
        own = [k.seq, k.next, k.results, k.closed, k.ready, k.done, k.space, k.created, k.error]
        try:
            claimed = yield Script(
                "close",
                self._and_the_rest(own, self.ttl_ms),
                [self.ttl_ms, self.incarnation, error],
            )
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "close()") from exc
        return int(claimed)

    close = blocking(close_op)

    def stats(self) -> RawStats:
        """One consistent snapshot of the stream's counters and of its blocker."""
        return run(self.stats_op(), self.perform)

    def stats_op(self) -> Step[RawStats]:
        """:meth:`stats` as an operation of :mod:`celery_ordered.steps`."""
        k = self.keys
        reply = yield Script(
            "stats",
            [k.seq, k.next, k.window, k.results, k.closed, k.pending, k.created, k.counters,
             k.deadlines, k.lanes, k.adapt],
            [],
            durable=False,  # it reads only
        )  # fmt: skip
        (claimed, nxt, window, stored, contiguous, closed, now, head, incarnation,
         redispatched, lost, hedged, lane, status, lease, waits, backup, head_redispatched,
         deadline, progress, window_why) = reply  # fmt: skip
        return RawStats(
            int(claimed),
            int(nxt),
            int(window),
            int(stored),
            int(contiguous),
            None if int(closed) < 0 else int(closed),
            int(now),
            None if int(head) < 0 else int(head),
            self._text(incarnation),
            int(redispatched),
            int(lost),
            int(hedged),
            self._text(lane),
            self._text(status),
            self._text(lease),
            self._text(waits),
            self._text(backup),
            int(head_redispatched),
            None if int(deadline) < 0 else int(deadline),
            self._text(progress),
            self._text(window_why),
        )

    def reclaim(self, lost_after: float, limit: int, **options: Any) -> list[Overdue]:
        """Numbers whose outcome cannot come: to dispatch again, or (past ``limit``) lost.

        ``options`` are :meth:`reclaim_op`'s: ``batch``, ``overtaken_after``, ``scan``.
        """
        return run(self.reclaim_op(lost_after, limit, **options), self.perform)

    def reclaim_op(
        self,
        lost_after: float,
        limit: int,
        batch: int = 100,
        *,
        overtaken_after: float = 10.0,
        scan: int = RECLAIM_SCAN,
    ) -> Step[list[Overdue]]:
        """:meth:`reclaim` as an operation of :mod:`celery_ordered.steps`.

        See ``reclaim.lua``: a number whose worker's lease lapsed, one that
        no worker received while a number sent after it to the same queue was
        received more than ``overtaken_after`` seconds ago (checked for the
        first ``scan`` numbers from the consumer's position), and one no worker
        holds whose queue showed no progress for ``lost_after`` seconds. At
        most ``batch`` numbers per call.

        It writes (moves deadlines on, counts re-dispatches) but does not wait
        for replicas: if a failover takes a reclaim back, the numbers come due
        again and are reclaimed again. A handle that opened the stream acts
        only on the incarnation it opened: another one (the stream was
        deleted, maybe created again under its name) raises
        :class:`~celery_ordered.StreamDeleted`, and nothing is written.
        """
        k = self.keys
        renew = self._renewal("reclaim")
        try:
            reply = yield Script(
                "reclaim",
                self._and_the_rest(
                    [k.next, k.results, k.pending, k.deadlines, k.counters, k.seq, k.lanes,
                     k.created],
                    renew,
                ),
                [int(lost_after * 1000), limit, batch, self.ttl_ms, int(overtaken_after * 1000),
                 scan, self.incarnation, renew],
                durable=False,  # it writes, but losing its writes to a failover is harmless
            )  # fmt: skip
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "a reclaim of lost work") from exc
        return [
            Overdue(int(reply[i + 1]), reply[i] == b"lost", reply[i + 2], self._text(reply[i + 3]))
            for i in range(0, len(reply), 4)
        ]

    def open_op(
        self,
        new_id: str,
        *,
        create: bool,
        window: int = 0,
        only_if_unset: bool = False,
        adapt_to: int = 0,
    ) -> Step[int | None]:
        """Learn the stream's incarnation (:attr:`incarnation`), creating the stream if asked.

        ``create``: a stream that does not exist is created as incarnation
        ``new_id``; else it is left alone and None returned. A ``window`` is
        stored as :meth:`set_window` does; with ``adapt_to``, the window it
        stores adapts, from ``window`` up to ``adapt_to`` (see ``pop.lua``).
        Returns the cap in force (0: none).

        An operation (:mod:`celery_ordered.steps`); :meth:`open` runs it, blocking.
        """
        k = self.keys
        cap, incarnation = yield Script(
            "window",
            self._and_the_rest([k.window, k.space, k.created, k.seq, k.adapt], self.ttl_ms),
            [
                window,
                int(only_if_unset),
                self.ttl_ms,
                new_id,
                "create" if create else "attach",
                adapt_to,
            ],
            # Attaching writes nothing worth waiting for replicas (at most the
            # id of a stream made before incarnation ids, or its expiry).
            durable=create or bool(window),
        )
        if not incarnation:
            return None
        self.incarnation = incarnation.decode() if isinstance(incarnation, bytes) else incarnation
        return int(cap)

    open = blocking(open_op)

    def set_window_op(self, window: int, *, only_if_unset: bool = False) -> Step[int]:
        """Store the window cap and wake blocked producers to look at it.

        Returns the cap in force: with ``only_if_unset``, a cap already stored
        stays. Raises :class:`~celery_ordered.StreamDeleted` if the stream is
        not the incarnation :meth:`open` found any more.

        An operation (:mod:`celery_ordered.steps`); :meth:`set_window` runs it, blocking.
        """
        k = self.keys
        try:
            cap, _ = yield Script(
                "window",
                self._and_the_rest([k.window, k.space, k.created, k.seq, k.adapt], self.ttl_ms),
                [window, int(only_if_unset), self.ttl_ms, self.incarnation, "known", 0],
            )
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "set_window()") from exc
        return int(cap)

    set_window = blocking(set_window_op)

    def delete(self) -> int:
        """Remove every key of the stream; returns how many existed."""
        return int(self._cluster_hint(lambda: self.client.delete(*self.keys.all())))

    def wait_op(self, token: str, timeout: float) -> Step[bool]:
        """Block until a wake-up token comes on list ``token`` (or ``timeout``); True if one did.

        ``token`` is ``"space"`` (:meth:`wait_space`), ``"ready"``
        (:meth:`wait_ready`) or ``"done"`` (:meth:`wait_done`). An operation
        of :mod:`celery_ordered.steps`: one blocking command, of at most
        :attr:`wait_slice` seconds.
        """
        # The timeout is in seconds (fractions allowed since Redis 6); 0 would
        # mean forever, so keep it strictly positive and bounded.
        wait = min(max(timeout, 0.001), self.wait_slice)
        if token == "done":  # the token stays: see wait_done
            got = yield Command(("BRPOPLPUSH", self.keys.done, self.keys.done, wait))
        else:
            got = yield Command(("BLPOP", getattr(self.keys, token), wait))
        return got is not None

    def wait_space(self, timeout: float) -> bool:
        """Block until a consumer frees window space (or ``timeout``)."""
        return run(self.wait_op("space", timeout), self.perform)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the head of the stream may be ready (or ``timeout``)."""
        return run(self.wait_op("ready", timeout), self.perform)

    def wait_done(self, timeout: float) -> bool:
        """Block until every claimed number may be filled (or ``timeout``).

        Being done is final, so the token stays for any other joiner: the
        list is rotated onto itself (``BRPOPLPUSH done done``), never emptied,
        so it keeps the expiry the scripts gave it; nothing is written here.
        """
        return run(self.wait_op("done", timeout), self.perform)

    # -- liveness: worker leases, run times and backups ------------------------------

    @staticmethod
    def _text(value: Any) -> str:
        """A script's string reply as ``str``."""
        return value.decode() if isinstance(value, bytes) else str(value)

    def beat(
        self,
        incarnation: str,
        holder: str,
        lease: float,
        held: list[tuple[int, str, float, float | None, str]],
        released: list[int],
    ) -> int:
        """A worker's heartbeat for the numbers of this stream it holds (see ``lease.lua``).

        ``held``: ``(number, state, seconds since received, seconds since
        started or None, lane)`` per number, the state ``"received"`` or
        ``"started"`` (each gets a lease of ``lease`` seconds from now, held by
        ``holder``), or ``"gone"`` (received since the last beat and done: it
        only tells that its lane moves). ``released``: numbers the holder gave
        back without an outcome. Returns how many held numbers still wait for their outcome;
        raises :class:`~celery_ordered.StreamDeleted` if the stream is not
        incarnation ``incarnation`` in this Redis (nothing is written then).

        Its writes do not wait for replicas: a failover that loses a heartbeat
        loses at most one beat's renewal, which the next beat makes again.
        """
        k = self.keys
        entries = [
            f"{seq} {state} {max(0, int(received * 1000))} "
            f"{-1 if started is None else max(0, int(started * 1000))} {lane}"
            for seq, state, received, started, lane in held
        ]
        args = [incarnation, self.ttl_ms, max(1, int(lease * 1000)), holder, len(entries),
                " ".join(str(seq) for seq in released), *entries]  # fmt: skip
        keys = self._and_the_rest([k.pending, k.deadlines, k.lanes, k.created, k.seq], self.ttl_ms)
        try:
            return int(self._call("lease", keys, args, durable=False))
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "a worker's heartbeat") from exc

    def note_runtimes(self, incarnation: str, runtimes: list[float]) -> int:
        """Note run times (seconds) of this stream's tasks, for hedging (see ``timing.lua``).

        Returns how many were ever noted; raises
        :class:`~celery_ordered.StreamDeleted` if the stream is not
        incarnation ``incarnation`` here. Not waited for by replicas: a lost
        sample changes nothing that matters.
        """
        k = self.keys
        args = [
            incarnation,
            self.ttl_ms,
            len(runtimes),
            *(max(0, round(t * 1000)) for t in runtimes),
        ]
        try:
            return int(self._call("timing", [k.timing, k.created], args, durable=False))
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "a worker noting run times") from exc

    def hedge(
        self, head: int, factor: float, waited: float, samples: int
    ) -> tuple[float | None, bytes]:
        """Whether to send a backup copy of ``head`` now (see ``hedge.lua``).

        Returns the typical run time of the stream's tasks in seconds (None
        while fewer than ``samples`` are noted) and the record to send again
        (b"" for none): once ``head`` has run ``factor`` times that long (at
        least ``waited`` seconds, the time a consumer has waited for it). At
        most one backup per number. Not waited for by replicas: a failover
        that loses the mark at worst lets a second backup go. Raises
        :class:`~celery_ordered.StreamDeleted` if the stream is not the
        incarnation this handle opened.
        """
        k = self.keys
        try:
            typical, record = self._call(
                "hedge",
                [k.pending, k.timing, k.counters, k.created],
                [head, factor, max(0, int(waited * 1000)), samples, self.ttl_ms, self.incarnation],
                durable=False,
            )
        except redis.ResponseError as exc:
            raise self._deleted_or(exc, "a backup copy of a slow task") from exc
        return (None if int(typical) < 0 else int(typical) / 1000), bytes(record or b"")


def _send(node: redis.Redis, conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write on ``conn``; their replies, errors as values."""
    conn.send_packed_command(conn.pack_commands(commands))
    replies: list[Any] = []
    for command in commands:
        try:
            replies.append(node.parse_response(conn, command[0]))
        except redis.ResponseError as exc:  # read whole: the connection stays usable
            replies.append(exc)
    return replies


def _retry_of(client: Client) -> Any:
    """The retry policy of ``client`` (None: a single try).

    The clients of :func:`~celery_ordered.redis.clients.client_for` retry for about
    ``retry_for`` seconds; a client passed in keeps its own policy.
    """
    if isinstance(client, RedisCluster):
        return getattr(client, "co_retry", None) or client.retry
    return client.get_retry()
