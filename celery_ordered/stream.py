"""OrderedResultStream: dispatch Celery tasks, consume their outcomes in order.

The stream is a facade: it checks its arguments, opens the stream in Redis
(one :class:`~celery_ordered.redis.protocol.Protocol`), and delegates to one
:class:`~celery_ordered.producer.Producer` (put, claim, send, reclaim, close)
and one :class:`~celery_ordered.consumer.Consumer` (get, acknowledge, lease,
progress); the map iterators are in :mod:`celery_ordered.maps`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, Task, current_app
from kombu.serialization import prepare_accept_content, registry

from . import checks, liveness
from .config import (
    ADAPTIVE_WINDOW_CEILING,
    DEFAULT_LOST_AFTER,
    DEFAULT_MAX_REDISPATCHES,
    DEFAULT_OVERTAKEN_AFTER,
    accepted_content,
    consumer_linger,
    default_window,
    durability,
    hedge_factor,
    overtaken_after,
    redis_client,
    redis_retry_for,
    serializer_for,
    stall_warning,
    stream_ttl,
    validate_window,
    window_adapts,
)
from .config import lost_after as configured_lost_after
from .config import max_redispatches as configured_max_redispatches
from .consumer import DEFAULT_CONSUMER_LEASE, DEFAULT_PREFETCH, Consumer, consumer_lease_setting
from .errors import (
    ConfigurationError,
    RedisUnavailable,
    StreamExhausted,
    StreamNotFound,
    StreamStateLost,
)
from .producer import Producer
from .progress import Progress
from .redis.clients import Client
from .redis.keys import validate_name
from .redis.protocol import WAIT_SLICE, NotReplicated, Protocol, RawStats
from .redis.urls import check_broker_url, one_line

__all__ = [
    "DEFAULT_CONSUMER_LEASE",
    "DEFAULT_PREFETCH",
    "OrderedResultStream",
    "StreamStats",
    "stats_from_raw",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamStats:
    """A snapshot of one stream, as :meth:`OrderedResultStream.stats` returns it."""

    #: Sequence numbers handed out so far (tasks and markers put).
    claimed: int
    #: Outcomes the consumer has taken, in order.
    delivered: int
    #: Claimed numbers whose outcome has not arrived yet.
    in_flight: int
    #: Outcomes that arrived and wait in Redis for the consumer.
    buffered: int
    #: Of those, the ones that cannot be delivered yet: an earlier one is missing.
    out_of_order: int
    #: The window cap: how far claims may run ahead of deliveries.
    window: int
    #: Whether the stream is closed to further puts.
    closed: bool
    #: The head-of-line blocker: the first number whose outcome is missing,
    #: which everything behind it waits for (None if none is missing).
    blocker: int | None = None
    #: Seconds since the blocker was dispatched (None if unknown).
    blocker_waited: float | None = None
    #: Overdue tasks dispatched again (by reclaim), over the stream's life.
    redispatched: int = 0
    #: Places filled with :class:`~celery_ordered.ResultLost` after the last re-dispatch.
    lost: int = 0
    #: Backup copies of straggling tasks sent (``hedge=``), over the stream's life.
    hedged: int = 0
    #: For an adaptive window (the default), what it last did and why, such as
    #: "grew to 80: the consumer waited for number 312 with the window full";
    #: None when the window is fixed (``window=``, ``ordered_window``, ``set_window``).
    window_why: str | None = field(default=None, compare=False)
    # What the blocker waits on. These change from one snapshot to the next
    # (ages, heartbeats), so they take no part in comparing two snapshots.
    #: What the blocker waits on: "started" or "received" (a live worker holds
    #: it), "lapsed" (its worker stopped renewing its lease: it is dispatched
    #: again at the next reclaim), "queued" (no worker holds it), "marker" (a
    #: marker its producer claimed but has not published); None if none blocks.
    blocker_state: str | None = field(default=None, compare=False)
    #: The queue the blocker was sent to (``name@priority`` with a priority).
    blocker_queue: str | None = field(default=None, compare=False)
    #: The worker holding the blocker (its node name and pid), if one does.
    blocker_worker: str | None = field(default=None, compare=False)
    #: Seconds since the blocker started running, if it did.
    blocker_started: float | None = field(default=None, compare=False)
    #: Seconds since the worker holding the blocker last renewed its lease.
    blocker_heartbeat: float | None = field(default=None, compare=False)
    #: How many times the blocker was dispatched (1 + re-dispatches).
    blocker_dispatches: int | None = field(default=None, compare=False)
    #: Seconds until the blocker is dispatched again, or given up as lost
    #: (0: at the next reclaim); None while a live worker holds it.
    blocker_next_dispatch: float | None = field(default=None, compare=False)
    #: All of it in one sentence, as the consumer's stall warning says it and
    #: ``celery ordered inspect`` shows it; None if nothing blocks.
    diagnosis: str | None = field(default=None, compare=False)


def stats_from_raw(
    raw: RawStats,
    default_window: int,
    *,
    lost_after: float = DEFAULT_LOST_AFTER,
    overtaken_after: float = DEFAULT_OVERTAKEN_AFTER,
    max_redispatches: int = DEFAULT_MAX_REDISPATCHES,
) -> StreamStats:
    """A :class:`StreamStats` from the snapshot :meth:`Protocol.stats` read.

    ``lost_after``, ``overtaken_after`` and ``max_redispatches`` are those
    of the handle that asks: they say when the blocker is dispatched again.
    """
    blocker = raw.next + raw.contiguous
    found = liveness.describe(
        raw,
        lost_after=lost_after,
        overtaken_after=overtaken_after,
        max_redispatches=max_redispatches,
    )
    return StreamStats(
        claimed=raw.claimed,
        delivered=raw.next,
        in_flight=raw.claimed - raw.next - raw.stored,
        buffered=raw.stored,
        out_of_order=raw.stored - raw.contiguous,
        window=raw.window or default_window,
        closed=raw.closed_at is not None,
        blocker=blocker if blocker < raw.claimed else None,
        blocker_waited=(
            (raw.now_ms - raw.head_claimed_ms) / 1000
            if raw.head_claimed_ms is not None and blocker < raw.claimed
            else None
        ),
        redispatched=raw.redispatched,
        lost=raw.lost,
        hedged=raw.hedged,
        blocker_state=found.state if found else None,
        blocker_queue=found.queue if found else None,
        blocker_worker=found.worker if found else None,
        blocker_started=found.started_ago if found else None,
        blocker_heartbeat=found.heartbeat_ago if found else None,
        blocker_dispatches=found.dispatches if found else None,
        blocker_next_dispatch=found.next_dispatch if found else None,
        diagnosis=found.text if found else None,
        window_why=raw.window_why or None,
    )


class OrderedResultStream:
    """Run Celery tasks in parallel and consume their outcomes in submission order.

    ::

        stream = OrderedResultStream(app, window=64)
        for page in pages:
            stream.put(render, page)      # blocks while 64 are ahead of the consumer
        stream.close()
        for html in stream:               # in the order put, as soon as possible
            out.write(html)

    Args:
        app: the Celery app that sends the tasks (default: the current app).
        name: the stream's name; any process that knows it and the Redis URL may
            put into the stream or consume it. None generates a unique name.
        window: how many outcomes may be claimed ahead of the consumer; stored
            in Redis, so it holds across producers and can be changed while the
            stream runs (:meth:`set_window`). None keeps the stream's current
            window, or takes the app's ``ordered_window`` (fixed), or else an
            adaptive window: it starts at 10 x the CPU count and grows (up to
            1,024) while it is what holds work back, and shrinks while
            outcomes wait for the consumer (``stats().window_why`` says why).
            A window given here or by ``ordered_window`` is a hard bound.
        redis_url: Redis holding the stream (default: the app's
            ``ordered_redis_url``, else its Redis result backend or broker).
        client: a ``redis.Redis`` (or ``redis.cluster.RedisCluster``) to use
            instead of ``redis_url``; it keeps its own retry settings.
        serializer: how outcomes are encoded (default: the app's
            ``ordered_serializer``, else its ``result_serializer``).
        accept: content types the consumer decodes (default: the app's
            ``result_accept_content``, else ``accept_content``).
        task_options: options for every ``apply_async`` of this stream, such as
            ``{"queue": "reports"}``.
        prefetch: how many ready outcomes the consumer reads per round trip.
        ack_every: the consumer acknowledges what it handed out every this many
            outcomes (None: half the window). After a consumer crash, at most
            this many are handed out again; 1 makes that only the one in hand.
        lost_after: seconds a task no worker holds may wait while its queue
            shows no progress (nothing of the stream received from it, no
            worker holding any of its tasks) before it counts as lost: it is
            dispatched again, up to ``max_redispatches`` times, then its
            place gets a :class:`~celery_ordered.ResultLost` error. A task a
            live worker holds never counts as lost, however long it runs; see
            docs/guarantees.md for the faster ways lost work is noticed.
            Default: the app's ``ordered_lost_after``, else one hour.
        max_redispatches: default: the app's ``ordered_max_redispatches``, else 3.
        hedge: for idempotent tasks only: True sends one backup copy of the
            task the consumer waits for once it has run 4 times the stream's
            typical run time (a number above 1: that many times); the first
            outcome wins. Default: the app's ``ordered_hedge``, else False.
        create: False to attach only to a stream that exists (raising
            :class:`~celery_ordered.StreamNotFound` otherwise), as a web view
            following a job by the name a client sent should.
        progress: called with a :class:`~celery_ordered.Progress` after each
            outcome this consumer hands out (a failed task's too), such as
            :func:`~celery_ordered.progress_bar`. It runs in the consuming
            thread, so keep it quick; an exception it raises is logged and
            the stream goes on.
        takeover: True to take the stream's consumption over at once from
            another consumer, which is fenced (its next round trip raises
            :class:`~celery_ordered.ConsumerFenced`). Without it, a second
            consumer waits (within its ``get`` timeout) as a standby until the
            first one's lease lapses or is released.
        consumer_lease: seconds a consumer's lease lasts after its last round
            trip (default: the app's ``ordered_consumer_lease``, else 30): how
            soon a successor takes over from a consumer that died.

    A stream has one consumer at a time. The first ``get`` takes the
    consumer lease, renewed by every round trip (each ``get`` that reads
    from Redis, each acknowledgement, and every 2 s while it waits).
    """

    def __init__(
        self,
        app: Celery | None = None,
        name: str | None = None,
        *,
        window: int | None = None,
        redis_url: str | None = None,
        client: Client | None = None,
        serializer: str | None = None,
        accept: list[str] | None = None,
        task_options: dict[str, Any] | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        ack_every: int | None = None,
        lost_after: float | None = None,
        max_redispatches: int | None = None,
        create: bool = True,
        progress: Callable[[Progress], object] | None = None,
        takeover: bool = False,
        consumer_lease: float | None = None,
        hedge: bool | float | None = None,
    ) -> None:
        if app is not None and not isinstance(app, Celery):
            raise TypeError(
                f"OrderedResultStream's first argument is the Celery app, got {app!r}: "
                "pass the app first, or name the stream with name="
            )
        if task_options is not None and not isinstance(task_options, Mapping):
            raise TypeError(
                f"task_options must be a dict of apply_async options, such as "
                f"{{'queue': 'reports'}}, got {task_options!r}"
            )
        self.app: Celery = app if app is not None else current_app
        self.name = validate_name(name) if name is not None else f"stream-{uuid.uuid4().hex}"
        if client is not None and redis_url is not None:
            raise ConfigurationError(
                "OrderedResultStream got both redis_url= and client=, which is "
                "over-determined: pass one of them"
            )
        if client is None:
            with self._redis_errors():
                client = redis_client(self.app, redis_url)
        self.redis = client
        broker_url = self.app.conf.get("broker_url")
        if isinstance(broker_url, str):  # kombu would cut such a password, and quote it
            check_broker_url(broker_url, "broker URL (broker_url)")
        self.serializer = serializer or serializer_for(self.app)
        if self.serializer not in registry._encoders:
            raise ConfigurationError(
                f"serializer {self.serializer!r} is not registered with kombu; use one of "
                f"{sorted(registry._encoders)}"
            )
        self.accept = prepare_accept_content(
            accept if accept is not None else accepted_content(self.app, self.serializer)
        )
        self.task_options = dict(task_options or {})
        self.prefetch: int = checks.count("prefetch", prefetch)
        self.ack_every = checks.count("ack_every", ack_every, none=True)
        lost = checks.seconds("lost_after", lost_after, none=True, zero=False)
        self.lost_after = lost if lost is not None else configured_lost_after(self.app)
        redispatches = checks.count("max_redispatches", max_redispatches, minimum=0, none=True)
        self.max_redispatches = (
            redispatches if redispatches is not None else configured_max_redispatches(self.app)
        )
        if not isinstance(takeover, bool):
            raise TypeError(f"takeover must be True or False, got {takeover!r}")
        lease = checks.seconds("consumer_lease", consumer_lease, none=True, zero=False)
        #: Seconds this consumer's lease lasts after each of its round trips.
        self.consumer_lease = lease if lease is not None else consumer_lease_setting(self.app)
        #: The hedging factor (see ``hedge``), or None when this handle does not hedge.
        self.hedge = hedge_factor(self.app, hedge)
        if window is not None:
            window = validate_window(window)
        if progress is not None and not callable(progress):
            raise TypeError(
                f"progress must be a callable taking a celery_ordered.Progress, such as "
                f"celery_ordered.progress_bar(), got {progress!r}"
            )
        self._default_window = default_window(self.app)
        self._proto = Protocol(
            client, self.name, ttl=stream_ttl(self.app), durability=durability(self.app)
        )
        with self._redis_errors():
            cap = self._proto.open(
                uuid.uuid4().hex,
                create=create,
                window=window or (self._default_window if create else 0),
                only_if_unset=window is None,
                adapt_to=(
                    ADAPTIVE_WINDOW_CEILING
                    if window is None
                    and create
                    and window_adapts(self.app)
                    and self._default_window < ADAPTIVE_WINDOW_CEILING
                    else 0
                ),
            )
        if cap is None:
            raise StreamNotFound(
                f"no stream named {self.name!r} in this Redis: it was never created, "
                "was deleted, or expired unused (ordered_stream_ttl); check the name, "
                "or pass create=True to start it",
                stream=self.name,
            )
        self._producer = Producer(
            self.app,
            self.name,
            self._proto,
            serializer=self.serializer,
            task_options=self.task_options,
            lost_after=self.lost_after,
            max_redispatches=self.max_redispatches,
            default_window=self._default_window,
            redis_errors=self._redis_errors,
            overtaken_after=overtaken_after(self.app),
            hedge=self.hedge is not None,
        )
        self._watcher = liveness.Watcher(
            self.app,
            self.name,
            self._proto,
            reclaim=self._producer.maybe_reclaim,
            backup=self._producer.backup,
            redis_url=lambda: liveness.where(client),
            stall_warning=stall_warning(self.app),
            hedge_factor=self.hedge,
            lost_after=self.lost_after,
            overtaken_after=self._producer.overtaken_after,
            max_redispatches=self.max_redispatches,
            wait_slice=self._producer.reclaim_every,
        )
        self._consumer = Consumer(
            self.name,
            self._proto,
            accept=self.accept,
            prefetch=self.prefetch,
            ack_every=self.ack_every,
            lease=self.consumer_lease,
            takeover=takeover,
            progress=progress,
            default_window=self._default_window,
            window=window or cap or self._default_window,
            redis_errors=self._redis_errors,
            on_wait=self._watcher.on_wait,
            reclaim_every=self._watcher.slice,
            linger=consumer_linger(self.app),
        )
        self._producer.free_space = self._consumer.acknowledge_if_idle

    def __repr__(self) -> str:
        return f"<OrderedResultStream {self.name!r} serializer={self.serializer!r}>"

    @property
    def producer(self) -> Producer:
        """This handle's producer part, for the library's own map iterators and
        wrappers; not part of the public API."""
        return self._producer

    @property
    def consumer(self) -> Consumer:
        """This handle's consumer part, for the library's own map iterators and
        wrappers; not part of the public API."""
        return self._consumer

    @property
    def peak_out_of_order(self) -> int:
        """The most outcomes ever seen waiting out of order by this consumer."""
        return self._consumer.peak_out_of_order

    @contextlib.contextmanager
    def _redis_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise RedisUnavailable(
                f"Redis refused the credentials for stream {self.name!r}: "
                f"{one_line(exc)}; check the "
                "user and password in the Redis URL",
                stream=self.name,
            ) from exc
        except NotReplicated as exc:
            raise RedisUnavailable(str(exc), stream=self.name) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(
                f"Redis for stream {self.name!r} did not answer: "
                f"{one_line(exc)} (retried for "
                f"{redis_retry_for(self.app):g}s; app setting ordered_redis_retry_for)",
                stream=self.name,
            ) from exc

    # -- producing ---------------------------------------------------------

    def put(self, task: Any, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> int:
        """Dispatch ``task(*args, **kwargs)`` and return its sequence number.

        ``task`` is an :func:`~celery_ordered.ordered_task` task, a signature of
        one, or a top-level function (run on a worker by ``celery_ordered.call``).
        Anything not callable is a marker: it takes no arguments, skips the
        workers and comes out at its place in the order.

        Blocks while the window is full; with ``timeout`` (seconds), raises
        :class:`~celery_ordered.StreamFull` (a ``queue.Full``) when it stays
        full that long. ``timeout`` is never passed to the task.

        Everything is checked before a number is claimed, so a refused put
        leaves no gap: :class:`~celery_ordered.UnsendableError` (a
        ``TypeError``) for a lambda, a nested function or arguments the
        serializer cannot encode; :class:`~celery_ordered.StreamClosedError`
        after :meth:`close`; :class:`~celery_ordered.StreamDeleted` once the
        stream was deleted (or Redis lost it), writing nothing.
        """
        timeout = checks.seconds("timeout", timeout)
        return self._producer.put(task, args, kwargs, timeout)

    def reclaim(self) -> int:
        """Dispatch again the tasks whose outcome is overdue; give up on hopeless ones.

        A number whose outcome has not arrived ``lost_after`` seconds after its
        dispatch (its message purged, expired or lost with a broker, its
        producer dead between claim and send, its result never published) is
        dispatched again from what ``put`` recorded, up to ``max_redispatches``
        times; then its place is filled with a :class:`~celery_ordered.ResultLost`
        error, so the stream moves on. Consumers and :meth:`join` call this by
        themselves while they wait; it is safe from any number of processes.
        Returns how many numbers it acted on.
        """
        return self._producer.reclaim()

    def close(self, error: BaseException | None = None) -> None:
        """Close the stream to further puts (idempotent; any process may do it).

        Consumers then get every outcome already put, after which iteration
        ends and :meth:`get` raises :class:`~celery_ordered.StreamExhausted`.

        ``error``: the exception that stopped the producer before it put all
        its work. Consumers then get every outcome put before it, followed by
        :class:`~celery_ordered.ProducerFailed` (its text, class name and
        traceback) instead of a normal end. Leaving ``with stream:`` by an
        exception does this. Only the call that closes the stream records an
        error: closing an already closed stream keeps it as it was.
        """
        self._producer.close(error)

    # -- consuming ---------------------------------------------------------

    def get(self, timeout: float | None = None) -> Any:
        """Return the next outcome in submission order.

        Waits for it (blocking on Redis, not polling); with ``timeout``
        (seconds), raises :class:`~celery_ordered.StreamEmpty` (a
        ``queue.Empty``) when it does not come in time. A task that failed
        raises here, at its position, as its own exception class where it can
        be rebuilt (else :class:`~celery_ordered.TaskFailed`), with
        ``stack_trace`` and ``seq`` attributes; the stream goes on after it.
        Raises :class:`~celery_ordered.StreamExhausted` once the stream is
        closed and everything put was delivered, or
        :class:`~celery_ordered.ProducerFailed` there instead if the producer
        closed it with an error.

        The first ``get`` makes this handle the stream's consumer (see
        :class:`OrderedResultStream`): while another consumer holds the lease,
        it waits for it within ``timeout``. :class:`~celery_ordered.ConsumerFenced`
        once another consumer took over; :class:`~celery_ordered.StreamDeleted`
        at once if the stream was deleted (or Redis lost it).
        """
        timeout = checks.seconds("timeout", timeout)
        return self._consumer.get(timeout)

    def ack(self) -> None:
        """Tell Redis what this consumer has handed out so far.

        :meth:`get` does this on its next round trip by itself; call it before
        pausing a consumer for long, so producers see the window free up (and
        the consumer lease is renewed). Does nothing on a handle that has not
        consumed.
        """
        self._consumer.acknowledge()

    def take_over(self) -> None:
        """Make this handle the stream's consumer now, fencing any other one.

        The consumer it replaces raises :class:`~celery_ordered.ConsumerFenced`
        on its next round trip. This handle goes on from what the stream has
        acknowledged: outcomes the other consumer handed out but had not
        acknowledged (at most its ``ack_every``) are handed out again. For a
        client that comes back after its old connection is gone, such as a
        browser resuming a server-sent event stream.
        """
        self._consumer.take_over()

    def release(self) -> None:
        """Acknowledge what was handed out and give up the consumer lease.

        Another consumer (a standby waiting in ``get``) may then take over at
        once instead of after ``ordered_consumer_lease``. A later ``get`` on
        this handle takes the lease again (if free) and goes on from what the
        stream has acknowledged. Does nothing on a handle that holds no lease.
        """
        self._consumer.release()

    def __iter__(self) -> OrderedResultStream:
        return self

    def __next__(self) -> Any:
        try:
            return self.get()
        except StreamExhausted:
            raise StopIteration from None

    @property
    def position(self) -> int:
        """How far this consumer has got: the position after the last outcome it
        handed out (0 before the first; where it resumed, for an attached one)."""
        return self._consumer.position

    # -- lifecycle and inspection -------------------------------------------

    def join(self, timeout: float | None = None) -> None:
        """Wait until the stream is closed and every outcome has arrived.

        Returns after ``timeout`` seconds even if that has not happened:
        :meth:`is_alive` tells which. The outcomes need not be consumed yet.
        A stream its producer closed with an error (:meth:`close` ``error=``)
        is finished too: ``join`` returns, and its consumer gets
        :class:`~celery_ordered.ProducerFailed` after the last outcome.
        Raises :class:`~celery_ordered.StreamDeleted` if the stream was
        deleted (or Redis lost it): it would never finish.
        """
        timeout = checks.seconds("timeout", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._redis_errors():
            while not self._finished():
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not self._proto.wait_done(min(remaining, self._producer.reclaim_every())):
                    self._producer.maybe_reclaim()

    def _finished(self) -> bool:
        raw = self._stats("join()")
        return raw.closed_at is not None and raw.next + raw.stored >= raw.closed_at

    def _stats(self, what: str) -> RawStats:
        raw = self._proto.stats()
        if raw.incarnation != self._proto.incarnation:
            raise self._proto.deleted(what)
        return raw

    def is_alive(self) -> bool:
        """False once the stream is closed and every outcome has arrived."""
        with self._redis_errors():
            return not self._finished()

    def stats(self) -> StreamStats:
        """Counters of the stream, read from Redis in one consistent snapshot.

        Raises :class:`~celery_ordered.StreamDeleted` if the stream was deleted.
        """
        if self._consumer.consuming:
            # Not while another thread waits in get() on this handle: it
            # acknowledges by itself, and stats() must not wait for it.
            self._consumer.acknowledge_if_idle()
        with self._redis_errors():
            raw = self._stats("stats()")
        return stats_from_raw(
            raw,
            self._default_window,
            lost_after=self.lost_after,
            overtaken_after=self._producer.overtaken_after,
            max_redispatches=self.max_redispatches,
        )

    @property
    def window(self) -> int:
        """The window cap stored in Redis."""
        with self._redis_errors():
            return self._stats("window").window or self._default_window

    def set_window(self, window: int) -> None:
        """Change the window cap for every producer, while the stream runs.

        Raises :class:`~celery_ordered.StreamDeleted` if the stream was deleted.
        """
        window = validate_window(window)
        with self._redis_errors():
            self._proto.set_window(window)

    def delete(self) -> None:
        """Remove every key of the stream from Redis.

        Late outcomes for a deleted stream are dropped by the workers; they
        leave nothing behind. Every handle of the stream, this one included,
        then raises :class:`~celery_ordered.StreamDeleted` on its next use
        (a consumer waiting in ``get`` within 2 s), writing nothing.
        """
        with self._redis_errors():
            self._proto.delete()
        self._consumer.drop_buffer()

    def __enter__(self) -> OrderedResultStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            self.close()
            return
        # The producer failed: consumers must not take that for a normal end.
        try:
            self.close(error=exc)
        except (StreamStateLost, RedisUnavailable) as failed:  # the producer's error goes on
            logger.warning(
                "stream %r: could not close it with the producer's error %r: %s",
                self.name, exc, failed,
            )  # fmt: skip

    def map(
        self,
        task: Callable[..., Any] | Task,
        iterable: Iterable[Any],
        *iterables: Iterable[Any],
        chunksize: int = 1,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Put ``task(item)`` for each item; iterate over the outcomes in order.

        With several iterables, ``task(*items)`` over ``zip(*iterables)``, the
        shortest ending it, as the builtin ``map`` and ``Executor.map`` do.

        Lazy over its input like ``multiprocessing.Pool.imap``: it is read
        only as window space frees up, so an endless generator works. A failed
        item raises at its position and the iteration goes on after it
        (``next()`` again). An exception raised by the input iterable itself
        comes out once, after the outcomes of every item read before it, and
        ends the iteration; the stream is then closed with that error
        (consumers elsewhere see :class:`~celery_ordered.ProducerFailed`).
        Otherwise the stream is closed once the input is exhausted, and every
        outcome handed out is acknowledged at the end. ``close()`` on the
        iterator ends it at once, as on a generator.

        ``timeout`` (seconds) bounds each ``next()``: its wait for window space
        and for the item's outcome together, as ``Pool.imap``'s
        ``next(timeout)``, not counted from this call as in ``Executor.map``
        (the input may be endless). It raises
        :class:`~celery_ordered.StreamEmpty`, both a ``TimeoutError`` and a
        ``queue.Empty``; nothing is lost, and ``next()`` again waits for the
        same item.

        With ``chunksize > 1``, up to that many items travel in one Celery
        message, run one after the other on one worker, and come back as one
        entry of the stream (the window then counts chunks); they are still
        yielded one by one, in order, and an item's exception fails only that
        item. A task given here is then called directly on the worker for each
        item (no per-item retries, routing or signals); plain functions suit
        chunks best.
        """
        from .maps import map_iterator  # the iterators build on this class

        return map_iterator(
            self, task, (iterable, *iterables), chunksize=chunksize, timeout=timeout
        )

    def starmap(
        self,
        task: Callable[..., Any] | Task,
        iterable: Iterable[Iterable[Any]],
        *,
        chunksize: int = 1,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Put ``task(*args)`` for each ``args`` of ``iterable``; outcomes in order.

        :meth:`map` for argument tuples, like ``itertools.starmap`` and
        ``multiprocessing.Pool.starmap`` (but lazy): everything :meth:`map`
        says holds, ``chunksize`` and ``timeout`` included.
        """
        from .maps import map_iterator

        return map_iterator(
            self, task, (iterable,), star=True, chunksize=chunksize, timeout=timeout
        )
