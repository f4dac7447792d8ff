"""The consumer part of a stream: buffer, fetch, acknowledge, lease and progress.

:class:`ConsumerCore` is the consumer's logic, written once for the threaded
and the asyncio stream: the outcomes read from Redis but not handed out yet,
how far it has read, handed out and acknowledged, the consumer lease (its
epoch, fencing), the checks that Redis did not go back in time, how an
outcome is decoded and raised, and what it reports to a progress callback.
Its round trips are operations of :mod:`celery_ordered.steps` (generators of
requests), so it does no I/O of its own.

:class:`Consumer` drives it with blocking calls: it is what
:meth:`OrderedResultStream.get`, ``ack``, ``take_over``, ``release`` and
``position`` delegate to. One lock guards its state: one thread at a time
consumes, and a producer on the same handle acknowledges through
:meth:`Consumer.acknowledge_if_idle` only when no ``get`` is running. The
asyncio driver is :class:`celery_ordered.aio.AsyncConsumer`. Both talk to
Redis only through :class:`~celery_ordered.redis.protocol.Protocol`'s operations.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery

from . import checks, codec
from .errors import (
    ConfigurationError,
    ConsumerFenced,
    OrderedStreamError,
    ProducerFailed,
    RemoteTraceback,
    StreamEmpty,
    StreamExhausted,
)
from .progress import Progress
from .redis.protocol import WAIT_SLICE, Batch, LeaseHeld, Protocol
from .steps import OnWait, Pause, Step, run

#: How many ready outcomes a consumer reads from Redis in one round trip.
DEFAULT_PREFETCH = 256

#: A read that finds fewer outcomes than this may make the next read linger
#: (see ``ordered_consumer_linger`` and ``ConsumerCore._lingering``).
LINGER_BATCH = 16

#: Seconds a consumer's lease lasts after its last round trip to Redis, unless
#: the app sets ``ordered_consumer_lease``: a successor waits this long after
#: a consumer crashed before it takes over (or at once with ``takeover=True``).
DEFAULT_CONSUMER_LEASE = 30.0

# The stream's logger: users configure the stream's messages by this name.
logger = logging.getLogger("celery_ordered.stream")

#: What turns redis-py's errors into :class:`~celery_ordered.RedisUnavailable`
#: for one stream (the stream's ``_redis_errors``).
RedisErrors = Callable[[], contextlib.AbstractContextManager[None]]


def consumer_lease_setting(app: Celery) -> float:
    """The app's ``ordered_consumer_lease`` (seconds), else :data:`DEFAULT_CONSUMER_LEASE`."""
    value = app.conf.get("ordered_consumer_lease")
    if value is None:
        return DEFAULT_CONSUMER_LEASE
    try:
        lease = checks.seconds("ordered_consumer_lease", value, none=False, zero=False)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return float(lease or DEFAULT_CONSUMER_LEASE)


class ConsumerCore:
    """The consumer part of one stream handle, without I/O (internal).

    Reads outcomes from Redis in batches of up to ``prefetch`` into its
    buffer, hands them out in order, acknowledges what it handed out every
    ``ack_every`` outcomes and before it waits, holds the consumer lease, and
    tells the progress callback. ``reclaim_every`` is the producer part's: a
    consumer waiting for its head asks for an :class:`~celery_ordered.steps.OnWait`
    (the head's number) each time a wait of up to ``reclaim_every()`` seconds
    passes without it, on which its driver reclaims overdue work.

    Its operations (``*_op``) yield requests for a driver to perform; the
    driver also serialises them (a lock), since they change this state.
    """

    def __init__(
        self,
        name: str,
        protocol: Protocol,
        *,
        accept: Any,
        prefetch: int,
        ack_every: int | None,
        lease: float,
        takeover: bool,
        progress: Callable[[Progress], object] | None,
        default_window: int,
        window: int,
        redis_errors: RedisErrors,
        reclaim_every: Callable[[], float],
        linger: float = 0.0,
    ) -> None:
        self.name = name
        self.protocol = protocol
        self.accept = accept
        self.prefetch = prefetch
        self.ack_every = ack_every
        self.lease = lease
        self.default_window = default_window
        self.redis_errors = redis_errors
        self._reclaim_every = reclaim_every
        # When this consumer last looked after a head it waited for (OnWait).
        self._looked_after = time.monotonic()
        self._progress = progress
        self._began = time.monotonic()
        #: Outcomes handed out by this handle (a failed task's too).
        self.handed_out = 0
        # What the consumer knows of the stream: where it was closed (None:
        # open as far as it knows), and the window as last read from Redis.
        self._closed_at: int | None = None
        #: The window cap as this handle last saw it (on opening the stream,
        #: then on each of its round trips).
        self.window_seen = window
        # Outcomes read from Redis but not yet handed out, the next number to
        # read, and the number below which all was handed out (acknowledged to
        # Redis on the next round trip). -1: not known yet.
        self._buffer: collections.deque[bytes] = collections.deque()
        self._read = -1
        self._delivered = -1
        self._acked = -1
        self._ack_every = 1  # in force: ack_every, or half the window seen
        # The highest claim count this consumer has seen: Redis saying less
        # later (or reopening a close it saw) means the stream went back in time.
        self._claimed_seen = 0
        # Consumer lease: this handle's id, its epoch (0: it holds none) and
        # whether its next acquisition takes over from a live consumer.
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._epoch = 0
        self._take_over_next = takeover
        self._fenced: ConsumerFenced | None = None
        # True while a round trip that takes the lease waits for its reply,
        # and after one left without it (its asyncio driver was cancelled):
        # the lease may then be this handle's, at an epoch it does not know.
        self._acquiring = False
        #: The most outcomes ever seen waiting out of order by this consumer.
        self.peak_out_of_order = 0
        #: Seconds outcomes may gather between small reads (see :meth:`_lingering`).
        self.linger = linger
        # When the last read that found outcomes was made, how many the last read
        # found (0: none), and the rate outcomes came at lately (per second).
        self._last_read_at: float | None = None
        self._last_found = 0
        self._rate = 0.0

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that build a consumer like this one, as it stands.

        The asyncio stream builds its consumer from the threaded stream it
        opens (:class:`~celery_ordered.aio.AsyncOrderedResultStream`), so
        both take their arguments, checked once, from the same place.
        """
        return {
            "accept": self.accept,
            "prefetch": self.prefetch,
            "ack_every": self.ack_every,
            "lease": self.lease,
            "takeover": self._take_over_next,
            "progress": self._progress,
            "default_window": self.default_window,
            "window": self.window_seen,
            "redis_errors": self.redis_errors,
            "reclaim_every": self._reclaim_every,
            "linger": self.linger,
        }

    # -- what it knows -------------------------------------------------------

    @property
    def position(self) -> int:
        """The position after the last outcome handed out (0 before the first)."""
        return max(self._delivered, 0)

    @property
    def buffered(self) -> int:
        """Outcomes read from Redis into this handle, not handed out yet."""
        return len(self._buffer)

    @property
    def consuming(self) -> bool:
        """True once this handle has consumed, unless another consumer fenced it."""
        return self._delivered >= 0 and self._fenced is None

    @property
    def holds_lease(self) -> bool:
        """True while this handle holds the consumer lease, as far as it knows."""
        return self._epoch != 0 and self._fenced is None

    @property
    def unacknowledged(self) -> bool:
        """True if it handed out outcomes that Redis has not been told of yet."""
        return self._delivered > self._acked

    # -- handing out ---------------------------------------------------------

    def busy_error(self, timeout: float) -> StreamEmpty:
        """The :class:`~celery_ordered.StreamEmpty` of a ``get`` that waited out
        its ``timeout`` behind another ``get`` on this handle."""
        return StreamEmpty(
            f"stream {self.name!r}: another get() on this handle (another thread or "
            f"task) held its consumer for all of the {timeout:g}s this one waited; the "
            "outcomes come out one get() at a time, in order",
            stream=self.name,
        )

    def next_op(self, timeout: float | None) -> Step[Any]:
        """The next outcome in order (see :meth:`OrderedResultStream.get`).

        Reads from Redis when the buffer is empty (waiting within
        ``timeout``), and acknowledges every ``ack_every`` outcomes. A failed
        task's outcome is raised, as its own exception where it can be rebuilt.
        """
        if self._fenced is not None:
            raise ConsumerFenced(str(self._fenced), stream=self.name)
        if not self._buffer:
            yield from self.fetch_op(timeout)
        elif self._delivered - self._acked >= self._ack_every:
            # Free window space before the buffer runs dry, so producers
            # keep going while this consumer works through its buffer.
            yield from self.pop_op(0)
        member = self._buffer.popleft()
        self.handed_out += 1
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

    def tell_progress(self, handed_out_before: int) -> None:
        """Tell the progress callback, if this handle has one and handed out
        an outcome since it had handed out ``handed_out_before``."""
        if self._progress is None or self.handed_out == handed_out_before:
            return
        elapsed = time.monotonic() - self._began
        report = Progress(
            delivered=self._delivered,
            total=self._closed_at,
            elapsed=elapsed,
            rate=self.handed_out / elapsed if elapsed > 0 else 0.0,
        )
        try:
            self._progress(report)
        except Exception:
            logger.exception(
                "stream %r: the progress callback %r failed; the stream goes on",
                self.name,
                self._progress,
            )

    # -- reading from Redis --------------------------------------------------

    def _lingering(self, deadline: float | None) -> float:
        """Seconds to let outcomes gather before the next read (0: read now).

        When outcomes arrive about as fast as they are handed out, reading
        each one as it comes costs a round trip or two per outcome (the read,
        then a wait for the next). So after a read that found only a few
        (fewer than :data:`LINGER_BATCH`), while at least that many numbers
        are in flight and outcomes have lately come fast enough that
        ``linger`` seconds bring at least two, the next read comes after the
        time that brings about :data:`LINGER_BATCH` at that rate, at most
        ``linger`` seconds after the last read, and carries several at once.
        Fewer numbers in flight do not stop it while the producers may claim
        a batch's worth meanwhile (the stream is open and the window has room
        for one): a producer thread that puts as fast as the workers run
        keeps only a few numbers ahead of its consumer, and its outcomes
        would otherwise be read one round trip (and a wait) at a time.
        Never past the caller's ``timeout``; a slow stream (a put, then a
        get, say) never lingers, and nor does a read that no batch could
        follow: the last outcomes of a closed stream, or a full window's,
        come as soon as they are published.
        """
        if not self.linger or self._last_read_at is None:
            return 0.0
        if not 0 < self._last_found < LINGER_BATCH or self._rate * self.linger < 2:
            return 0.0
        if self._claimed_seen - self._read < LINGER_BATCH:
            # Redis's cursor is where this consumer last acknowledged: the
            # producers may claim up to the window beyond it meanwhile.
            room = self.window_seen - (self._claimed_seen - max(self._acked, 0))
            if self._closed_at is not None or room < LINGER_BATCH:
                return 0.0
        until = self._last_read_at + min(self.linger, LINGER_BATCH / self._rate)
        if deadline is not None:
            until = min(until, deadline)
        return max(0.0, until - time.monotonic())

    def _note_read(self, found: int) -> None:
        """Note a read that found ``found`` outcomes: the recent rate, and when to linger."""
        now = time.monotonic()
        if self._last_read_at is not None and now > self._last_read_at:
            rate = found / (now - self._last_read_at)
            self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
        self._last_read_at = now
        self._last_found = found

    def fetch_op(self, timeout: float | None) -> Step[None]:
        """Fill the buffer: wait (within ``timeout``) for the next outcome."""
        deadline = None if timeout is None else time.monotonic() + timeout
        told_waiting = False
        pause = self._lingering(deadline)
        if pause > 0:
            yield Pause(pause)
        # Whether this consumer waited for outcomes before the read (it lingered,
        # or found its head missing and waited): an adaptive window may grow then.
        waited = pause > 0
        with self.redis_errors():
            while True:
                try:
                    batch = yield from self.pop_op(self.prefetch, waited=waited)
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
                    yield Pause(min(held.remaining + 0.005, remaining, WAIT_SLICE))
                    continue
                if batch.members:
                    self._note_read(len(batch.members))
                    self._buffer.extend(batch.members)
                    self._read = batch.start + len(batch.members)
                    waiting = batch.stored - (batch.start - batch.next) - len(batch.members)
                    self.peak_out_of_order = max(self.peak_out_of_order, waiting)
                    return
                self._read = batch.start
                self._last_found = 0
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
                    # A consumer that polls (get(timeout=0), or timeouts shorter
                    # than a wait slice) never waits out a slice, and would never
                    # reclaim lost work nor warn: it looks after its head as
                    # often as a waiting consumer does.
                    if time.monotonic() - self._looked_after >= self._reclaim_every():
                        self._looked_after = time.monotonic()
                        yield OnWait(batch.start)
                    raise StreamEmpty(
                        f"stream {self.name!r}: outcome {batch.start} did not arrive "
                        f"within {timeout}s",
                        stream=self.name,
                        seq=batch.start,
                    )
                wait = min(remaining, self._reclaim_every())
                waited = True
                if not (yield from self.protocol.wait_op("ready", wait)):
                    self._looked_after = time.monotonic()
                    yield OnWait(batch.start)

    def pop_op(self, limit: int, mode: str = "", *, waited: bool = False) -> Step[Batch]:
        """Acknowledge what was handed out; read up to ``limit`` more.

        Takes the consumer lease first if this handle holds none (raising
        :class:`~celery_ordered.redis.protocol.LeaseHeld` while another consumer
        holds it), and renews it otherwise; ``mode="free"`` releases it.
        ``waited``: this consumer waited for outcomes before this read (see
        :meth:`celery_ordered.redis.protocol.Protocol.pop_op`).
        """
        if self._fenced is not None:
            raise ConsumerFenced(str(self._fenced), stream=self.name)
        acquiring = self._epoch == 0
        if acquiring and self._take_over_next and mode != "free":
            mode = "take"
        self._acquiring = acquiring
        try:
            with self.redis_errors():
                batch = yield from self.protocol.pop_op(
                    -1 if acquiring else self._delivered,
                    self._read,
                    limit,
                    owner=self._owner,
                    epoch=self._epoch,
                    lease=self.lease,
                    mode=mode,
                    waited=waited,
                )
        except ConsumerFenced as exc:
            self._fenced = exc
            raise
        except Exception:
            self._acquiring = False
            raise
        self._acquiring = False
        if acquiring:
            self._epoch = batch.epoch
            self._take_over_next = False
        self._check_not_rolled_back(batch)
        self._delivered = max(self._delivered, batch.next)
        self._acked = batch.next
        if batch.closed_at is not None:
            self._closed_at = batch.closed_at
        self.window_seen = batch.window or self.default_window
        self._ack_every = self.ack_every or max(1, self.window_seen // 2)
        return batch

    def _check_not_rolled_back(self, batch: Batch) -> None:
        """Redis must never say less than this consumer has already seen."""
        if batch.claimed < self._claimed_seen:
            raise self.protocol.went_back(
                f"this consumer saw {self._claimed_seen} numbers claimed, but Redis now says "
                f"{batch.claimed}",
                seq=batch.claimed,
            )
        if self._closed_at is not None and (
            batch.closed_at is None or batch.closed_at < self._closed_at
        ):
            now = "open" if batch.closed_at is None else f"closed at {batch.closed_at}"
            raise self.protocol.went_back(
                f"this consumer saw the stream closed at {self._closed_at} claims, but Redis "
                f"now says it is {now}",
                seq=self._closed_at,
            )
        self._claimed_seen = batch.claimed

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

    # -- acknowledgement and the lease ---------------------------------------

    def acknowledge_op(self) -> Step[None]:
        """Tell Redis what was handed out (renewing the lease); nothing if not consuming."""
        if self._epoch:
            yield from self.pop_op(0)

    def take_over_op(self) -> Step[None]:
        """Become the stream's consumer now, fencing any other one (see the stream's)."""
        self._fenced = None
        self._epoch = 0
        self._take_over_next = True
        self._buffer.clear()
        self._read = self._delivered = self._acked = -1
        yield from self.pop_op(0)

    def release_op(self) -> Step[None]:
        """Acknowledge and give up the consumer lease (see the stream's).

        After a round trip that took the lease but whose reply never came
        (its caller was cancelled), the lease is taken again to be given up.
        """
        if self._fenced is not None or not (self._epoch or self._acquiring):
            return
        try:
            yield from self.pop_op(0, mode="free")
        except LeaseHeld:  # another consumer's: that round trip did not take it
            return
        self._epoch = 0
        self._buffer.clear()
        self._read = -1

    def drop_buffer(self) -> None:
        """Forget the outcomes read and not handed out (the stream was deleted)."""
        self._buffer.clear()


class Consumer(ConsumerCore):
    """The consumer part of a threaded stream handle (internal: see ``OrderedResultStream``).

    Drives :class:`ConsumerCore` with blocking calls under one lock.
    ``on_wait`` is the producer part's: a consumer waiting for its head calls
    it with the head's number each time a wait of up to ``reclaim_every()``
    seconds passes without it, and it reclaims overdue work.
    """

    def __init__(
        self, name: str, protocol: Protocol, *, on_wait: Callable[[int], None], **options: Any
    ) -> None:
        super().__init__(name, protocol, **options)
        #: Called with the head's number each time a wait slice passes without it.
        self.on_wait = on_wait
        self._lock = threading.Lock()

    def _perform(self, request: Any) -> Any:
        """Carry out one request of the core's operations, blocking."""
        if isinstance(request, Pause):
            return threading.Event().wait(request.seconds)
        if isinstance(request, OnWait):
            return self.on_wait(request.head)
        return self.protocol.perform(request)

    def _run(self, op: Step[Any]) -> Any:
        with self._lock:
            return run(op, self._perform)

    def get(self, timeout: float | None) -> Any:
        """The next outcome in order (see :meth:`OrderedResultStream.get`).

        A ``get`` of another thread on this handle goes first: the wait for it
        counts against ``timeout``, as it would for ``queue.Queue.get``.
        """
        before = self.handed_out
        try:
            if self._lock.acquire(blocking=False):
                left = timeout
            else:
                began = time.monotonic()
                if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
                    raise self.busy_error(timeout or 0.0)
                left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
            try:
                return run(self.next_op(left), self._perform)
            finally:
                self._lock.release()
        finally:
            self.tell_progress(before)

    def prefetch_all(self) -> None:
        """Read every outcome that has arrived into this consumer's buffer.

        For owners of a private Redis (:mod:`celery_ordered.compat`) about to
        stop it: what was read stays deliverable by :meth:`get`.
        """
        while self.read_now():
            pass

    def read_now(self) -> bool:
        """Read what has arrived into this handle's buffer, without waiting (one read).

        True if it read outcomes. Also acknowledges what was handed out. For
        :meth:`prefetch_all`, and for :meth:`OrderedResultStream.map`, which is
        its own producer: a read that finds the head missing with the window
        full grows an adaptive window, and the map can fill the room before it
        waits (see :class:`~celery_ordered.maps.OrderedMap`).
        """
        with self._lock:
            try:
                run(self.fetch_op(timeout=0), self._perform)
            except (StreamExhausted, StreamEmpty, ProducerFailed):
                return False
            return True

    def acknowledge(self) -> None:
        """Tell Redis what was handed out (renewing the lease); nothing if not consuming."""
        self._run(self.acknowledge_op())

    def acknowledge_if_idle(self) -> bool:
        """Acknowledge what was handed out, unless a ``get`` is running; True if done.

        For a producer on this handle that found the window full: without it,
        put and get from one thread would wait on each other. (A consumer
        inside ``get`` holds the lock, and acknowledges by itself.)
        """
        if self.unacknowledged and self._lock.acquire(blocking=False):
            try:
                run(self.pop_op(0), self._perform)
            finally:
                self._lock.release()
            return True
        return False

    def stop_acknowledging(self) -> None:
        """Hand out what is buffered without any more acknowledgements to Redis.

        For the owner of a private Redis that is about to stop it, after
        :meth:`prefetch_all`: no acknowledgement may try the Redis that is gone.
        """
        self._ack_every = sys.maxsize

    def take_over(self) -> None:
        """Become the stream's consumer now, fencing any other one (see the stream's)."""
        self._run(self.take_over_op())

    def release(self) -> None:
        """Acknowledge and give up the consumer lease (see the stream's)."""
        self._run(self.release_op())

    def drop_buffer(self) -> None:
        """Forget the outcomes read and not handed out (the stream was deleted)."""
        with self._lock:
            super().drop_buffer()
