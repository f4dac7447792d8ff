"""OrderedResultStream: dispatch Celery tasks, consume their outcomes in order."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, current_app
from celery.canvas import Signature
from kombu.serialization import prepare_accept_content, registry

from . import codec
from .config import (
    Client,
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
    DispatchError,
    OrderedStreamError,
    RedisUnavailable,
    ResultLost,
    StreamClosedError,
    StreamEmpty,
    StreamExhausted,
    StreamFull,
    StreamNotFound,
    UnsendableError,
)
from .keys import validate_name
from .progress import Progress
from .protocol import WAIT_SLICE, Batch, Claim, NotReplicated, Protocol
from .task import (
    CALL_TASK_NAME,
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


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(
            f"timeout must be None (wait as long as it takes) or a number of seconds "
            f">= 0, got {timeout!r}"
        )
    return float(timeout)


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
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        self.prefetch = prefetch
        if ack_every is not None and (
            isinstance(ack_every, bool) or not isinstance(ack_every, int) or ack_every < 1
        ):
            raise ValueError(f"ack_every must be None or an int >= 1, got {ack_every!r}")
        self.ack_every = ack_every
        if lost_after is not None and not _check_timeout(lost_after):
            raise ValueError(
                "lost_after must be more than 0 seconds: it is how long a task may take "
                "before it is dispatched again"
            )
        self.lost_after = lost_after or configured_lost_after(self.app)
        if max_redispatches is not None and (
            isinstance(max_redispatches, bool)
            or not isinstance(max_redispatches, int)
            or max_redispatches < 0
        ):
            raise ValueError(f"max_redispatches must be an int >= 0, got {max_redispatches!r}")
        self.max_redispatches = (
            max_redispatches
            if max_redispatches is not None
            else configured_max_redispatches(self.app)
        )
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
            if not create and not self._proto.exists():
                raise StreamNotFound(
                    f"no stream named {self.name!r} in this Redis: it was never created, "
                    "was deleted, or expired unused (ordered_stream_ttl); check the name, "
                    "or pass create=True to start it",
                    stream=self.name,
                )
            if window is not None:
                self._proto.set_window(validate_window(window))
            elif create:
                self._proto.set_window(self._default_window, only_if_unset=True)
        self._closed_here = False
        # Consumer state: outcomes read from Redis but not yet handed out, the
        # next number to read, and the number below which all was handed out
        # (acknowledged to Redis on the next round trip). -1: not known yet.
        self._buffer: collections.deque[bytes] = collections.deque()
        self._read = -1
        self._delivered = -1
        self._acked = -1
        self._ack_every = 1
        self._window_seen = window or self._default_window
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
        after :meth:`close`.
        """
        timeout = _check_timeout(timeout)
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
                self._proto.publish(seq, prepared.marker.member(seq, codec.MARKER))
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
        headers = {HEADER_STREAM: self.name, HEADER_SEQ: seq, HEADER_SERIALIZER: self.serializer}
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

    def close(self) -> None:
        """Close the stream to further puts (idempotent; any process may do it).

        Consumers then get every outcome already put, after which iteration
        ends and :meth:`get` raises :class:`~celery_ordered.StreamExhausted`.
        """
        with self._redis_errors():
            self._proto.close()
        self._closed_here = True

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
        closed and everything put was delivered.
        """
        timeout = _check_timeout(timeout)
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
        with self._redis_errors():
            while True:
                batch = self._pop(self.prefetch)
                if batch.members:
                    self._buffer.extend(batch.members)
                    self._read = batch.start + len(batch.members)
                    waiting = batch.stored - (batch.start - batch.next) - len(batch.members)
                    self.peak_out_of_order = max(self.peak_out_of_order, waiting)
                    return
                self._read = batch.start
                if batch.closed_at is not None and batch.start >= batch.closed_at:
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

    def _pop(self, limit: int) -> Batch:
        """Acknowledge what was handed out; read up to ``limit`` more (lock held)."""
        with self._redis_errors():
            batch = self._proto.pop(self._delivered, self._read, limit)
        self._delivered = max(self._delivered, batch.next)
        self._acked = batch.next
        if batch.closed_at is not None:
            self._closed_at = batch.closed_at
        self._window_seen = batch.window or self._default_window
        self._ack_every = self.ack_every or max(1, self._window_seen // 2)
        return batch

    def _prefetch_all(self) -> None:
        """Read every outcome that has arrived into this consumer's buffer.

        For owners of a private Redis (:mod:`celery_ordered.compat`) about to
        stop it: what was read stays deliverable by :meth:`get`.
        """
        with self._consumer_lock:
            while True:
                try:
                    self._fetch(timeout=0)
                except (StreamExhausted, StreamEmpty):
                    return

    def _buffered_locally(self) -> int:
        return len(self._buffer)

    def ack(self) -> None:
        """Tell Redis what this consumer has handed out so far.

        :meth:`get` does this on its next round trip by itself; call it before
        pausing a consumer for long, so producers see the window free up.
        """
        with self._consumer_lock:
            self._pop(0)

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
        """
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._redis_errors():
            while not self._finished():
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not self._proto.wait_done(min(remaining, self._reclaim_every())):
                    self._maybe_reclaim()

    def _finished(self) -> bool:
        raw = self._proto.stats()
        return raw.closed_at is not None and raw.next + raw.stored >= raw.closed_at

    def is_alive(self) -> bool:
        """False once the stream is closed and every outcome has arrived."""
        with self._redis_errors():
            return not self._finished()

    def stats(self) -> StreamStats:
        """Counters of the stream, read from Redis in one consistent snapshot."""
        if self._delivered >= 0:
            self.ack()
        with self._redis_errors():
            raw = self._proto.stats()
        blocker = raw.next + raw.contiguous
        return StreamStats(
            claimed=raw.claimed,
            delivered=raw.next,
            in_flight=raw.claimed - raw.next - raw.stored,
            buffered=raw.stored,
            out_of_order=raw.stored - raw.contiguous,
            window=raw.window or self._default_window,
            closed=raw.closed_at is not None,
            blocker=blocker if blocker < raw.claimed else None,
            blocker_waited=(
                (raw.now_ms - raw.head_claimed_ms) / 1000
                if raw.head_claimed_ms is not None and blocker < raw.claimed
                else None
            ),
        )

    @property
    def window(self) -> int:
        """The window cap stored in Redis."""
        with self._redis_errors():
            return self._proto.stats().window or self._default_window

    def set_window(self, window: int) -> None:
        """Change the window cap for every producer, while the stream runs."""
        window = validate_window(window)
        with self._redis_errors():
            self._proto.set_window(window)

    def delete(self) -> None:
        """Remove every key of the stream from Redis.

        Late outcomes for a deleted stream are dropped by the workers; they
        leave nothing behind.
        """
        with self._redis_errors():
            self._proto.delete()
        with self._consumer_lock:
            self._buffer.clear()

    def __enter__(self) -> OrderedResultStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(
        self,
        task: Callable[..., Any] | Task,
        iterable: Any,
        *,
        chunksize: int = 1,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """Put ``task(item)`` for each item; iterate over the outcomes in order.

        Lazy over ``iterable`` like ``multiprocessing.Pool.imap``: it is read
        only as window space frees up, so an endless generator works. A failed
        item raises at its position and the iteration goes on after it
        (``next()`` again). The stream is closed once ``iterable`` is exhausted.
        ``timeout`` applies to each wait for an outcome or for window space.

        With ``chunksize > 1``, up to that many items travel in one Celery
        message, run one after the other on one worker, and come back as one
        entry of the stream (the window then counts chunks); they are still
        yielded one by one, in order, and an item's exception fails only that
        item. A task given here is then called directly on the worker for each
        item (no per-item retries, routing or signals); plain functions suit
        chunks best.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        from .maps import ChunkedMap, OrderedMap  # the iterators build on this class

        if chunksize == 1:
            return OrderedMap(self, task, iter(iterable), timeout)
        return ChunkedMap(self, task, iter(iterable), timeout, chunksize)

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
