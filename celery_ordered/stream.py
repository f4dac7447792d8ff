"""OrderedResultStream: dispatch Celery tasks, consume their outcomes in order."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, current_app
from celery.canvas import Signature
from kombu.serialization import prepare_accept_content, registry

from . import checks, codec
from .config import (
    accepted_content,
    default_window,
    durability,
    function_allowed,
    redis_client,
    redis_retry_for,
    serializer_for,
    stream_ttl,
    validate_window,
)
from .config import lost_after as configured_lost_after
from .config import max_redispatches as configured_max_redispatches
from .errors import (
    ConfigurationError,
    ConsumerFenced,
    DispatchError,
    OrderedStreamError,
    ProducerFailed,
    RedisUnavailable,
    RemoteTraceback,
    ResultLost,
    StreamClosedError,
    StreamEmpty,
    StreamExhausted,
    StreamFull,
    StreamNotFound,
    StreamStateLost,
    UnsendableError,
)
from .progress import Progress
from .redis.clients import Client
from .redis.keys import validate_name
from .redis.protocol import WAIT_SLICE, Batch, Claim, LeaseHeld, NotReplicated, Protocol, RawStats
from .task import (
    CALL_TASK_NAME,
    HEADER_INCARNATION,
    HEADER_SEQ,
    HEADER_SERIALIZER,
    HEADER_STREAM,
    TASK_TARGET_PREFIX,
    OrderedTask,
    function_reference,
)

#: How many ready outcomes a consumer reads from Redis in one round trip.
DEFAULT_PREFETCH = 256

#: ``apply_async`` options a dispatch record keeps for a re-dispatch.
RECORDED_OPTIONS = frozenset(
    {"queue", "routing_key", "exchange", "priority", "expires", "time_limit",
     "soft_time_limit", "serializer", "compression"}
)  # fmt: skip

#: Status of a dispatch record: a task to send, or a marker to publish.
RECORD_TASK = b"T"
RECORD_MARKER = b"M"

#: Seconds a consumer's lease lasts after its last round trip to Redis, unless
#: the app sets ``ordered_consumer_lease``: a successor waits this long after
#: a consumer crashed before it takes over (or at once with ``takeover=True``).
DEFAULT_CONSUMER_LEASE = 30.0

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


def stats_from_raw(raw: RawStats, default_window: int) -> StreamStats:
    """A :class:`StreamStats` from the snapshot :meth:`Protocol.stats` read."""
    blocker = raw.next + raw.contiguous
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
    )


@dataclass(frozen=True)
class _Prepared:
    """What ``put`` validated and encoded before claiming a number."""

    record: bytes
    marker: codec.Encoded | None = None
    task: Task | None = None
    task_name: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    options: dict[str, Any] | None = None


def _consumer_lease_setting(app: Celery) -> float:
    """The app's ``ordered_consumer_lease`` (seconds), else :data:`DEFAULT_CONSUMER_LEASE`."""
    value = app.conf.get("ordered_consumer_lease")
    if value is None:
        return DEFAULT_CONSUMER_LEASE
    try:
        lease = checks.seconds("ordered_consumer_lease", value, none=False, zero=False)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return float(lease or DEFAULT_CONSUMER_LEASE)


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
            window, or the app's ``ordered_window``, or 10 x the CPU count.
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
        lost_after: seconds after its dispatch when a task's missing outcome is
            overdue: it is dispatched again, up to ``max_redispatches`` times,
            then its place gets a :class:`~celery_ordered.ResultLost` error.
            Default: the app's ``ordered_lost_after``, else one hour.
        max_redispatches: default: the app's ``ordered_max_redispatches``, else 3.
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
    ) -> None:
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
        self.consumer_lease = lease if lease is not None else _consumer_lease_setting(self.app)
        if window is not None:
            window = validate_window(window)
        if progress is not None and not callable(progress):
            raise TypeError(
                f"progress must be a callable taking a celery_ordered.Progress, such as "
                f"celery_ordered.progress_bar(), got {progress!r}"
            )
        self._progress = progress
        self._began = time.monotonic()
        self._handed_out = 0
        self._closed_at: int | None = None
        self._task_accept = prepare_accept_content(self.app.conf.accept_content or ["json"])
        self._default_window = default_window(self.app)
        self._proto = Protocol(
            client, self.name, ttl=stream_ttl(self.app), durability=durability(self.app)
        )
        self._next_reclaim = 0.0
        self._producer_id = uuid.uuid4().hex
        with self._redis_errors():
            cap = self._proto.open(
                uuid.uuid4().hex,
                create=create,
                window=window or (self._default_window if create else 0),
                only_if_unset=window is None,
            )
        if cap is None:
            raise StreamNotFound(
                f"no stream named {self.name!r} in this Redis: it was never created, "
                "was deleted, or expired unused (ordered_stream_ttl); check the name, "
                "or pass create=True to start it",
                stream=self.name,
            )
        self._closed_here = False
        # Consumer state: outcomes read from Redis but not yet handed out, the
        # next number to read, and the number below which all was handed out
        # (acknowledged to Redis on the next round trip). -1: not known yet.
        self._buffer: collections.deque[bytes] = collections.deque()
        self._read = -1
        self._delivered = -1
        self._acked = -1
        self._ack_every = 1
        self._window_seen = window or cap or self._default_window
        # The highest claim count and close this consumer has seen: Redis
        # saying less later means the stream's state went back in time.
        self._claimed_seen = 0
        # Consumer lease: this handle's id, its epoch (0: it holds none) and
        # whether its next acquisition takes over from a live consumer.
        self._consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._epoch = 0
        self._take_over_next = takeover
        self._fenced: ConsumerFenced | None = None
        self._consumer_lock = threading.Lock()
        #: The most outcomes ever seen waiting out of order by this consumer.
        self.peak_out_of_order = 0

    def __repr__(self) -> str:
        return f"<OrderedResultStream {self.name!r} serializer={self.serializer!r}>"

    @contextlib.contextmanager
    def _redis_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise RedisUnavailable(
                f"Redis refused the credentials for stream {self.name!r}: {exc}; check the "
                "user and password in the Redis URL",
                stream=self.name,
            ) from exc
        except NotReplicated as exc:
            raise RedisUnavailable(str(exc), stream=self.name) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailable(
                f"Redis for stream {self.name!r} did not answer: {exc} (retried for "
                f"{redis_retry_for(self.app):g}s; app setting ordered_redis_retry_for)",
                stream=self.name,
            ) from exc

    # -- producing ---------------------------------------------------------

    def put(self, task: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> int:
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
        prepared = self._prepare(task, args, kwargs)
        if self._closed_here:
            raise StreamClosedError(
                f"put() on stream {self.name!r} after close(): open a new stream for more work",
                stream=self.name,
            )
        seq = self._claim(prepared.record, timeout)
        self._send(prepared, seq)
        return seq

    def _prepare(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Prepared:
        if not callable(task):
            if args or kwargs:
                raise ValueError(
                    f"put({task!r}, ...): {type(task).__name__} is not callable, so it is a "
                    "marker, and a marker takes no arguments. Put the marker alone, or "
                    "put a callable task with its arguments"
                )
            marker = codec.encode(task, self.serializer, what="marker")
            return _Prepared(record=marker.member(0, RECORD_MARKER), marker=marker)
        options = dict(self.task_options)
        if isinstance(task, Signature):
            options.update(task.options)
            args = tuple(task.args) + args
            kwargs = {**task.kwargs, **kwargs}
            name = task.task
            found = self.app.tasks.get(name)
        elif isinstance(task, Task):
            name, found = self._task_in_app(task)
        else:
            reference = self._function_reference(task)
            name = CALL_TASK_NAME
            found = self.app.tasks[CALL_TASK_NAME]
            args, kwargs = (reference, list(args), kwargs), {}
        if found is not None and not isinstance(found, OrderedTask):
            raise UnsendableError(
                f"task {name!r} is a plain Celery task, so its workers would not publish "
                "its result into the stream: decorate it with @celery_ordered.ordered_task "
                "(or @app.task(base=celery_ordered.OrderedTask))"
            )
        serializer = options.get("serializer") or getattr(found, "serializer", None)
        serializer = serializer or self.app.conf.task_serializer
        recorded = {
            key: getattr(value, "name", value)  # a kombu Queue or Exchange: by name
            for key, value in options.items()
            if key in RECORDED_OPTIONS
        }
        record = codec.encode(
            {"task": name, "args": list(args), "kwargs": kwargs, "options": recorded},
            serializer,
            what=f"arguments of {name}",
        )
        return _Prepared(
            record=record.member(0, RECORD_TASK),
            task=found,
            task_name=name,
            args=args,
            kwargs=kwargs,
            options=options,
        )

    def _task_in_app(self, task: Task) -> tuple[str, Task]:
        """``task`` as this stream's app knows it: its name and its instance.

        An ``@ordered_task`` is a proxy that resolves through the *current*
        app, which is per thread: put from another thread, a task defined in
        a script (``__main__``) would get another app's name for it, and be
        sent where no worker knows it. Look it up in the stream's app instead.
        """
        name = str(task.name)
        found = self.app.tasks.get(name)
        if found is None and task.app is not self.app:
            function = getattr(task, "__wrapped__", None)
            if function is not None:
                own_name = self.app.gen_task_name(function.__name__, function.__module__)
                if own_name in self.app.tasks:
                    return own_name, self.app.tasks[own_name]
        return name, found if found is not None else task

    def _claim(self, record: bytes, timeout: float | None) -> int:
        return self._claim_block([record], timeout).first

    def _claim_block(self, records: list[bytes], timeout: float | None) -> Claim:
        """Claim up to ``len(records)`` numbers in one round trip (at least one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        claim_id = uuid.uuid4().hex
        with self._redis_errors():
            while True:
                claim = self._proto.claim(
                    records,
                    self._default_window,
                    producer=f"{self._producer_id}-{os.getpid()}-{threading.get_ident()}",
                    claim_id=claim_id,
                    lost_after=self.lost_after,
                )
                if claim.closed:
                    self._closed_here = True
                    raise StreamClosedError(
                        f"put() on stream {self.name!r}, which is closed: open a new "
                        "stream for more work",
                        stream=self.name,
                    )
                if claim.count:
                    return claim
                if self._delivered > self._acked and self._consumer_lock.acquire(blocking=False):
                    # This object's own consumer has handed out outcomes it has
                    # not acknowledged: do it now, or put and get from one
                    # thread would wait on each other. (A consumer inside get()
                    # holds the lock, and acknowledges by itself.)
                    try:
                        self._pop(0)
                    finally:
                        self._consumer_lock.release()
                    continue
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamFull(
                        f"stream {self.name!r}: the window stayed full for {timeout}s; "
                        "the consumer is behind (get() more, or raise the window)",
                        stream=self.name,
                    )
                self._proto.wait_space(remaining)

    def _send(self, prepared: _Prepared, seq: int) -> None:
        if prepared.marker is not None:
            with self._redis_errors():
                if self._proto.publish(seq, prepared.marker.member(seq, codec.MARKER)) < 0:
                    raise self._proto.deleted("put()")
            return
        try:
            self._dispatch(
                prepared.task,
                prepared.task_name,
                prepared.args,
                prepared.kwargs or {},
                prepared.options or {},
                seq,
            )
        except Exception as exc:
            error = DispatchError(
                f"sending task {prepared.task_name!r} for stream {self.name!r} failed: {exc!r}",
                stream=self.name,
                seq=seq,
            )
            self._fill_with_error(seq, error, prepared.task_name)
            raise error from exc

    def _dispatch(
        self,
        task: Task | None,
        name: str,
        args: Any,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        seq: int,
    ) -> None:
        headers = {
            HEADER_STREAM: self.name,
            HEADER_SEQ: seq,
            HEADER_SERIALIZER: self.serializer,
            HEADER_INCARNATION: self._proto.incarnation,
        }
        options = dict(options)
        options["headers"] = {**(options.get("headers") or {}), **headers}
        options["ignore_result"] = True
        if task is not None:
            task.apply_async(args, kwargs, **options)
        else:
            self.app.send_task(name, args, kwargs, **options)

    def _fill_with_error(self, seq: int, error: BaseException, task_name: str) -> None:
        payload = codec.exception_payload(error, "", self.serializer, task_name)
        encoded = codec.encode(payload, self.serializer)
        with self._redis_errors():
            self._proto.publish(seq, encoded.member(seq, codec.ERROR))

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
        with self._redis_errors():
            overdue = self._proto.reclaim(self.lost_after, self.max_redispatches)
        for item in overdue:
            self._act_on_overdue(item.seq, item.lost, item.record)
        return len(overdue)

    def _act_on_overdue(self, seq: int, lost: bool, record: bytes) -> None:
        _, status, content_type, content_encoding, body = record.split(b":", 4)
        if status == RECORD_MARKER:
            # The producer died between claiming and publishing a marker: the
            # record holds the encoded marker, which goes in as it is.
            encoded = codec.Encoded(content_type.decode(), content_encoding.decode(), body)
            with self._redis_errors():
                self._proto.publish(seq, encoded.member(seq, codec.MARKER))
            return
        try:
            dispatch = codec.decode(record, self._task_accept).value
            name = str(dispatch["task"])
        except Exception as exc:  # unreadable: nothing can be sent again
            logger.error("stream %s: dispatch record of %d is unreadable: %r", self.name, seq, exc)
            lost, name, dispatch = True, "?", {}
        if lost:
            logger.warning(
                "stream %s: no outcome for %d (%s) after %d re-dispatches: filled as lost",
                self.name, seq, name, self.max_redispatches,
            )  # fmt: skip
            dispatches = self.max_redispatches + 1
            each = "its one dispatch" if dispatches == 1 else f"each of its {dispatches} dispatches"
            error = ResultLost(
                f"task {name!r} at position {seq} of stream {self.name!r} gave no outcome "
                f"within {self.lost_after:g}s of {each}: its message or its worker was lost",
                stream=self.name,
                seq=seq,
                exc_type="ResultLost",
                task_name=name,
            )
            payload = codec.exception_payload(error, "", self.serializer, name)
            member = codec.encode(payload, self.serializer).member(seq, codec.LOST)
            with self._redis_errors():
                self._proto.publish(seq, member)
            return
        logger.warning("stream %s: outcome of %d (%s) is overdue: dispatching again",
                       self.name, seq, name)  # fmt: skip
        try:
            self._dispatch(
                self.app.tasks.get(name),
                name,
                dispatch.get("args") or [],
                dispatch.get("kwargs") or {},
                dispatch.get("options") or {},
                seq,
            )
        except Exception as exc:  # the broker is down: the number comes due again
            logger.error("stream %s: re-dispatch of %d failed: %r", self.name, seq, exc)

    def _maybe_reclaim(self) -> None:
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every()
            self.reclaim()

    def _reclaim_every(self) -> float:
        return min(self._proto.wait_slice, max(0.05, self.lost_after / 4))

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
        member = b""
        if error is not None:
            if not isinstance(error, BaseException):
                raise TypeError(
                    f"close(error=...) takes the exception that stopped the producer "
                    f"(or None for a normal end), got {type(error).__name__}: {error!r}"
                )
            member = self._encode_producer_error(error)
        with self._redis_errors():
            self._proto.close(member)
        self._closed_here = True

    def _encode_producer_error(self, error: BaseException) -> bytes:
        stack_trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        payload = codec.exception_payload(error, stack_trace, self.serializer, None)
        payload.pop("exc", None)  # text travels, never the object: consumers rebuild nothing
        try:
            encoded = codec.encode(payload, self.serializer, what="producer's error")
        except UnsendableError:  # say, a traceback over the size limit: keep its end
            payload["stack_trace"] = stack_trace[-100_000:]
            payload["exc_message"] = [repr(a)[:10_000] for a in error.args]
            encoded = codec.encode(payload, self.serializer, what="producer's error")
        return encoded.member(0, codec.ERROR)

    def _producer_failed(self, member: bytes, closed_at: int) -> ProducerFailed:
        try:
            payload = codec.decode(member, self.accept).value
            exc_type = str(payload.get("exc_type") or "Exception")
            exc_module = str(payload.get("exc_module") or "")
            args = payload.get("exc_message") or []
            message = ", ".join(str(a) for a in (args if isinstance(args, list) else [args]))
            stack_trace = str(payload.get("stack_trace") or "")
        except Exception as exc:  # an error this consumer cannot read: say so
            exc_type, exc_module, stack_trace = "?", "", ""
            message = f"(its error could not be decoded here: {exc})"
        name = f"{exc_module}.{exc_type}" if exc_module not in ("", "builtins") else exc_type
        error = ProducerFailed(
            f"the producer of stream {self.name!r} failed after putting {closed_at} "
            f"outcome(s), all handed out: {name}: {message}",
            stream=self.name,
            seq=closed_at,
            exc_type=exc_type,
            exc_module=exc_module,
            stack_trace=stack_trace,
        )
        if stack_trace:
            error.__cause__ = RemoteTraceback(stack_trace)
        return error

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
        if self._progress is None:
            return self._get(timeout)
        before = self._handed_out
        try:
            return self._get(timeout)
        finally:
            if self._handed_out != before:
                self._tell_progress()

    def _tell_progress(self) -> None:
        assert self._progress is not None
        elapsed = time.monotonic() - self._began
        report = Progress(
            delivered=self._delivered,
            total=self._closed_at,
            elapsed=elapsed,
            rate=self._handed_out / elapsed if elapsed > 0 else 0.0,
        )
        try:
            self._progress(report)
        except Exception:
            logger.exception(
                "stream %r: the progress callback %r failed; the stream goes on",
                self.name,
                self._progress,
            )

    def _get(self, timeout: float | None) -> Any:
        with self._consumer_lock:
            if self._fenced is not None:
                raise ConsumerFenced(str(self._fenced), stream=self.name)
            if not self._buffer:
                self._fetch(timeout)
            elif self._delivered - self._acked >= self._ack_every:
                # Free window space before the buffer runs dry, so producers
                # keep going while this consumer works through its buffer.
                self._pop(0)
            member = self._buffer.popleft()
            self._handed_out += 1
            try:
                outcome = codec.decode(member, self.accept)
            except Exception as exc:
                seq = int(member.split(b":", 1)[0])
                self._delivered = seq + 1
                raise OrderedStreamError(
                    f"stream {self.name!r}: the outcome at {seq} could not be decoded "
                    f"({exc}); if it is a content type this consumer should accept, pass "
                    "accept=[...] to the stream",
                    stream=self.name,
                    seq=seq,
                ) from exc
            self._delivered = outcome.seq + 1
        if outcome.status in (codec.ERROR, codec.LOST):
            raise codec.rebuild_exception(
                outcome.value, stream=self.name, seq=outcome.seq, lost=outcome.status == codec.LOST
            )
        return outcome.value

    def _fetch(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        told_waiting = False
        with self._redis_errors():
            while True:
                try:
                    batch = self._pop(self.prefetch)
                except LeaseHeld as held:
                    # Another consumer holds the stream: wait as its standby.
                    remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                    if remaining <= 0:
                        raise StreamEmpty(
                            f"stream {self.name!r}: another consumer ({held.owner}) holds its "
                            f"consumer lease for {held.remaining:g}s more, and this one waited "
                            f"{timeout}s for it. A stream has one consumer at a time; pass "
                            "takeover=True (or call take_over()) to take it over at once",
                            stream=self.name,
                        ) from None
                    if not told_waiting:
                        told_waiting = True
                        logger.warning(
                            "stream %r: another consumer (%s) holds its consumer lease (%gs "
                            "more); this one waits to take over once it lapses or is released",
                            self.name, held.owner, held.remaining,
                        )  # fmt: skip
                    threading.Event().wait(min(held.remaining + 0.005, remaining, WAIT_SLICE))
                    continue
                if batch.members:
                    self._buffer.extend(batch.members)
                    self._read = batch.start + len(batch.members)
                    waiting = batch.stored - (batch.start - batch.next) - len(batch.members)
                    self.peak_out_of_order = max(self.peak_out_of_order, waiting)
                    return
                self._read = batch.start
                if batch.closed_at is not None and batch.start >= batch.closed_at:
                    if batch.error:
                        raise self._producer_failed(batch.error, batch.closed_at)
                    raise StreamExhausted(
                        f"stream {self.name!r} is closed and all {batch.closed_at} outcomes "
                        "were delivered",
                        stream=self.name,
                    )
                self.peak_out_of_order = max(
                    self.peak_out_of_order, batch.stored - (batch.start - batch.next)
                )
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise StreamEmpty(
                        f"stream {self.name!r}: outcome {batch.start} did not arrive "
                        f"within {timeout}s",
                        stream=self.name,
                        seq=batch.start,
                    )
                if not self._proto.wait_ready(min(remaining, self._reclaim_every())):
                    self._maybe_reclaim()

    def _pop(self, limit: int, mode: str = "") -> Batch:
        """Acknowledge what was handed out; read up to ``limit`` more (lock held).

        Takes the consumer lease first if this handle holds none (raising
        :class:`~celery_ordered.redis.protocol.LeaseHeld` while another consumer
        holds it), and renews it otherwise; ``mode="free"`` releases it.
        """
        if self._fenced is not None:
            raise ConsumerFenced(str(self._fenced), stream=self.name)
        acquiring = self._epoch == 0
        if acquiring and self._take_over_next:
            mode = "take"
        try:
            with self._redis_errors():
                batch = self._proto.pop(
                    -1 if acquiring else self._delivered,
                    self._read,
                    limit,
                    owner=self._consumer_id,
                    epoch=self._epoch,
                    lease=self.consumer_lease,
                    mode=mode,
                )
        except ConsumerFenced as exc:
            self._fenced = exc
            raise
        if acquiring:
            self._epoch = batch.epoch
            self._take_over_next = False
        self._check_not_rolled_back(batch)
        self._delivered = max(self._delivered, batch.next)
        self._acked = batch.next
        if batch.closed_at is not None:
            self._closed_at = batch.closed_at
        self._window_seen = batch.window or self._default_window
        self._ack_every = self.ack_every or max(1, self._window_seen // 2)
        return batch

    def _check_not_rolled_back(self, batch: Batch) -> None:
        """Redis must never say less than this consumer has already seen."""
        if batch.claimed < self._claimed_seen:
            raise self._proto.went_back(
                f"this consumer saw {self._claimed_seen} numbers claimed, but Redis now says "
                f"{batch.claimed}",
                seq=batch.claimed,
            )
        if self._closed_at is not None and (
            batch.closed_at is None or batch.closed_at < self._closed_at
        ):
            now = "open" if batch.closed_at is None else f"closed at {batch.closed_at}"
            raise self._proto.went_back(
                f"this consumer saw the stream closed at {self._closed_at} claims, but Redis "
                f"now says it is {now}",
                seq=self._closed_at,
            )
        self._claimed_seen = batch.claimed

    def _prefetch_all(self) -> None:
        """Read every outcome that has arrived into this consumer's buffer.

        For owners of a private Redis (:mod:`celery_ordered.compat`) about to
        stop it: what was read stays deliverable by :meth:`get`.
        """
        with self._consumer_lock:
            while True:
                try:
                    self._fetch(timeout=0)
                except (StreamExhausted, StreamEmpty, ProducerFailed):
                    return

    def _buffered_locally(self) -> int:
        return len(self._buffer)

    def ack(self) -> None:
        """Tell Redis what this consumer has handed out so far.

        :meth:`get` does this on its next round trip by itself; call it before
        pausing a consumer for long, so producers see the window free up (and
        the consumer lease is renewed). Does nothing on a handle that has not
        consumed.
        """
        with self._consumer_lock:
            if self._epoch:
                self._pop(0)

    def take_over(self) -> None:
        """Make this handle the stream's consumer now, fencing any other one.

        The consumer it replaces raises :class:`~celery_ordered.ConsumerFenced`
        on its next round trip. This handle goes on from what the stream has
        acknowledged: outcomes the other consumer handed out but had not
        acknowledged (at most its ``ack_every``) are handed out again. For a
        client that comes back after its old connection is gone, such as a
        browser resuming a server-sent event stream.
        """
        with self._consumer_lock:
            self._fenced = None
            self._epoch = 0
            self._take_over_next = True
            self._buffer.clear()
            self._read = self._delivered = self._acked = -1
            self._pop(0)

    def release(self) -> None:
        """Acknowledge what was handed out and give up the consumer lease.

        Another consumer (a standby waiting in ``get``) may then take over at
        once instead of after ``ordered_consumer_lease``. A later ``get`` on
        this handle takes the lease again (if free) and goes on from what the
        stream has acknowledged. Does nothing on a handle that holds no lease.
        """
        with self._consumer_lock:
            if not self._epoch or self._fenced is not None:
                return
            self._pop(0, mode="free")
            self._epoch = 0
            self._buffer.clear()
            self._read = -1

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
        return max(self._delivered, 0)

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
                if not self._proto.wait_done(min(remaining, self._reclaim_every())):
                    self._maybe_reclaim()

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
        if self._delivered >= 0 and self._fenced is None:
            self.ack()
        with self._redis_errors():
            raw = self._stats("stats()")
        return stats_from_raw(raw, self._default_window)

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
        with self._consumer_lock:
            self._buffer.clear()

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

    def _chunk_target(self, task: Any) -> str:
        """What a chunk runs: ``"task:NAME"`` or a plain function reference."""
        if isinstance(task, Task):
            return TASK_TARGET_PREFIX + str(task.name)
        if isinstance(task, Signature) or not callable(task):
            raise UnsendableError(
                f"map(chunksize=...) needs a task or a top-level function, got {task!r}"
            )
        return self._function_reference(task)

    def _function_reference(self, function: Callable[..., Any]) -> str:
        """The reference workers run ``function`` by, if this app lets them."""
        reference = function_reference(function)
        module = reference.partition(":")[0]
        if not function_allowed(self.app, module):
            raise UnsendableError(
                f"{reference}: workers may not run plain functions from module "
                f"{module!r} (standard-library modules are refused unless listed). "
                "Add it to app.conf.ordered_function_modules, or wrap the call in an "
                "@ordered_task task"
            )
        return reference
