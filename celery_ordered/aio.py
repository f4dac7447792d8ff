"""AsyncOrderedResultStream: the ordered stream for asyncio code.

The same stream as :class:`~celery_ordered.OrderedResultStream` (the same keys
and scripts, the same semantics: any threaded or asyncio handle may put into,
consume or take over a stream the other made), with the waits awaited on
``redis.asyncio`` so one event loop follows hundreds of streams in one thread.

How it is built, so that nothing is written twice:

- :meth:`AsyncOrderedResultStream.open` builds a threaded stream in a worker
  thread (it checks the arguments and opens the stream in Redis: one round
  trip) and takes its parts: its producer (preparing and sending puts,
  reclaiming overdue work, closing), its protocol (which shapes every round
  trip, :mod:`celery_ordered.steps`) and its consumer's settings.
- :class:`AsyncConsumer` is the consumer: the threaded one's logic
  (:class:`~celery_ordered.consumer.ConsumerCore`) driven with ``await``.
- Claims, a consumer's reads and acknowledgements, markers, the window and
  every blocking wait (``BLPOP`` on ``ready``, ``space``, ``done``) are awaited
  on the asyncio client (:class:`~celery_ordered.redis.aprotocol.AsyncProtocol`):
  a blocked waiter holds one connection, no thread.
- Off the event loop (``asyncio.to_thread``, the loop's default executor): each
  Celery send (kombu's publish blocks), ``close()`` (once per stream),
  ``stats()``, and the reclaim a waiting consumer runs at most every few
  seconds (it may send tasks again).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from celery import Celery, current_app

from . import checks, codec
from .config import redis_retry_for, resolve_redis, validate_window
from .consumer import Consumer, ConsumerCore
from .errors import (
    DispatchError,
    ProducerFailed,
    RedisUnavailable,
    StreamClosedError,
    StreamExhausted,
    StreamStateLost,
)
from .producer import Prepared, Producer
from .redis.aprotocol import AsyncProtocol
from .redis.clients import async_client_for
from .redis.keys import validate_name
from .redis.protocol import WAIT_SLICE, Claim, Protocol
from .steps import OnWait, Pause, Step, arun
from .stream import OrderedResultStream, StreamStats

__all__ = ["STREAM_OPTIONS", "AsyncConsumer", "AsyncOrderedMap", "AsyncOrderedResultStream"]

logger = logging.getLogger("celery_ordered.stream")

#: The keyword arguments an asyncio stream passes on to the threaded stream it
#: opens: all of :class:`~celery_ordered.OrderedResultStream`'s but ``client``.
STREAM_OPTIONS = frozenset(inspect.signature(OrderedResultStream).parameters) - {
    "app",
    "name",
    "window",
    "redis_url",
    "client",
}


class AsyncConsumer(ConsumerCore):
    """The consumer part of an asyncio stream handle (internal).

    Drives :class:`~celery_ordered.consumer.ConsumerCore` with ``await``
    under an ``asyncio.Lock``: its reads and waits on the asyncio protocol,
    its pauses with ``asyncio.sleep``, and ``on_wait`` (the reclaim of a
    consumer waiting for its head, which may send tasks) in a worker thread.
    """

    def __init__(
        self,
        name: str,
        protocol: Protocol,
        *,
        aprotocol: AsyncProtocol,
        on_wait: Callable[[int], None],
        **options: Any,
    ) -> None:
        super().__init__(name, protocol, **options)
        self._aprotocol = aprotocol
        self._on_wait = on_wait
        self._lock = asyncio.Lock()

    @classmethod
    def like(cls, consumer: Consumer, aprotocol: AsyncProtocol) -> AsyncConsumer:
        """An asyncio consumer with ``consumer``'s stream, protocol, settings and hook."""
        return cls(
            consumer.name,
            consumer.protocol,
            aprotocol=aprotocol,
            on_wait=consumer.on_wait,
            **consumer.settings(),
        )

    async def _perform(self, request: Any) -> Any:
        """Carry out one request of the core's operations, without blocking the loop."""
        if isinstance(request, Pause):
            return await asyncio.sleep(request.seconds)
        if isinstance(request, OnWait):
            return await asyncio.to_thread(self._on_wait, request.head)
        return await self._aprotocol.perform(request)

    async def _run(self, op: Step[Any]) -> Any:
        async with self._lock:
            return await arun(op, self._perform)

    async def get(self, timeout: float | None) -> Any:
        """The next outcome in order (see :meth:`AsyncOrderedResultStream.get`).

        A ``get`` of another task on this handle goes first: the wait for it
        counts against ``timeout``.
        """
        before = self.handed_out
        try:
            left = timeout
            if not self._lock.locked():
                await self._lock.acquire()
            else:
                began = time.monotonic()
                try:
                    # asyncio.Lock gives a grant it made to a waiter cancelled
                    # meanwhile to the next one: a timeout here leaks nothing.
                    await asyncio.wait_for(self._lock.acquire(), timeout)
                except asyncio.TimeoutError:
                    raise self.busy_error(timeout or 0.0) from None
                if timeout is not None:
                    left = max(0.0, timeout - (time.monotonic() - began))
            try:
                return await arun(self.next_op(left), self._perform)
            finally:
                self._lock.release()
        finally:
            self.tell_progress(before)

    async def acknowledge(self) -> None:
        """Tell Redis what was handed out (renewing the lease); nothing if not consuming."""
        await self._run(self.acknowledge_op())

    async def acknowledge_if_idle(self) -> bool:
        """Acknowledge what was handed out, unless a ``get`` is running; True if done."""
        if not self.unacknowledged or self._lock.locked():
            return False
        await self._run(self.acknowledge_op())
        return True

    async def take_over(self) -> None:
        """Become the stream's consumer now, fencing any other one."""
        await self._run(self.take_over_op())

    async def release(self) -> None:
        """Acknowledge and give up the consumer lease."""
        await self._run(self.release_op())


class AsyncOrderedResultStream:
    """:class:`~celery_ordered.OrderedResultStream` for asyncio: put, get and wait with ``await``.

    ::

        async with AsyncOrderedResultStream(app, window=64) as stream:
            for page in pages:
                await stream.put(render, page)   # waits while 64 are ahead
        async for html in stream:                # in the order put
            await response.write(html)

    It takes :class:`~celery_ordered.OrderedResultStream`'s arguments
    (``window``, ``redis_url``, ``serializer``, ``accept``, ``task_options``,
    ``prefetch``, ``ack_every``, ``lost_after``, ``max_redispatches``,
    ``create``, ``progress``, ``takeover``, ``consumer_lease``...), with the same
    meaning and defaults, except ``client=``: it talks to Redis through a
    ``redis.asyncio`` client of its own (one per URL and settings per event
    loop, closed when the loop shuts down) and a redis-py one for what runs in
    a thread, so give ``redis_url`` (or the app's settings) instead. A
    ``progress`` callback runs on the event loop: keep it quick.

    The constructor only records its arguments (and checks the name, so
    :attr:`name` is known at once); :meth:`open`, or the first call that
    needs Redis, checks the rest and opens the stream in Redis, raising
    what ``OrderedResultStream(...)`` raises (:class:`~celery_ordered.StreamNotFound`
    for ``create=False``, a ``ValueError`` for a bad argument...).

    Everything the threaded stream promises holds here: order, markers, a
    failed task raised at its position with ``stack_trace`` (the stream goes
    on after it), the window and its backpressure, one consumer at a time
    (the lease, ``takeover=``, :class:`~celery_ordered.ConsumerFenced`),
    resuming by name, timeouts (:class:`~celery_ordered.StreamEmpty`,
    :class:`~celery_ordered.StreamFull`), :class:`~celery_ordered.ProducerFailed`,
    :class:`~celery_ordered.StreamDeleted`, :class:`~celery_ordered.StreamStateLost`
    and :class:`~celery_ordered.RedisUnavailable`.

    Cancellation: a task cancelled while it waits in :meth:`get` (or in
    ``async for``), or whose ``async for`` over the stream is left any other
    way than by its end, acknowledges exactly what this consumer handed out
    and releases the consumer lease, so a consumer that resumes by name
    (``create=False``) goes on at once right after the last outcome handed
    out: nothing repeated, nothing lost. A :meth:`put` cancelled while it
    waits for window space claims nothing; once its number is claimed, its
    task is sent even if the put is cancelled.
    """

    def __init__(
        self,
        app: Celery | None = None,
        name: str | None = None,
        *,
        window: int | None = None,
        redis_url: str | None = None,
        **options: Any,
    ) -> None:
        if "client" in options:
            raise TypeError(
                "AsyncOrderedResultStream takes no client=: it needs a redis.asyncio client "
                "and a redis-py one of the same Redis, which it makes from the URL; pass "
                "redis_url= (or set the app's ordered_redis_url) instead"
            )
        unknown = sorted(set(options) - STREAM_OPTIONS)
        if unknown:
            raise TypeError(
                f"AsyncOrderedResultStream() got unexpected keyword argument(s) {unknown}; "
                f"it takes those of OrderedResultStream: {sorted(STREAM_OPTIONS)}"
            )
        self.app: Celery = app if app is not None else current_app._get_current_object()
        self.name = validate_name(name) if name is not None else f"stream-{uuid.uuid4().hex}"
        self._redis_url = redis_url
        self._options = {"window": window, "redis_url": redis_url, **options}
        self._threaded: OrderedResultStream | None = None
        self._opening = asyncio.Lock()
        # This handle's producer id in the stream's claims (see claim.lua):
        # a claim retried after a lost reply returns the numbers of its first try.
        self._producer_key = f"{uuid.uuid4().hex}-{os.getpid()}-aio"
        self._claiming = asyncio.Lock()  # one claim of this handle at a time
        self._background: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<AsyncOrderedResultStream {self.name!r}>"

    # -- opening ---------------------------------------------------------------

    async def open(self) -> None:
        """Check the arguments and open the stream in Redis (creating it unless ``create=False``).

        Every other method does this on first use; calling it first raises a
        bad argument or :class:`~celery_ordered.StreamNotFound` at once.
        Idempotent.
        """
        if self._threaded is not None:
            return
        async with self._opening:
            if self._threaded is not None:
                return
            build = functools.partial(OrderedResultStream, self.app, self.name, **self._options)
            threaded = await asyncio.to_thread(build)
            url, transport_options = resolve_redis(self.app, self._redis_url)
            client = async_client_for(
                url, redis_retry_for(self.app), transport_options=transport_options
            )
            self._producer: Producer = threaded.producer
            self._protocol: Protocol = threaded.producer.protocol
            self._aprotocol = AsyncProtocol(self._protocol, client)
            self._consumer = AsyncConsumer.like(threaded.consumer, self._aprotocol)
            self._threaded = threaded

    async def _ready(self) -> OrderedResultStream:
        await self.open()
        assert self._threaded is not None
        return self._threaded

    # -- producing -------------------------------------------------------------

    async def put(
        self, task: Any, /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> int:
        """Dispatch ``task(*args, **kwargs)``; its sequence number.

        As :meth:`OrderedResultStream.put <celery_ordered.OrderedResultStream.put>`:
        ``task`` is an ordered task, a signature of one, a top-level function,
        or anything not callable (a marker). Waits while the window is full;
        with ``timeout`` (seconds), raises :class:`~celery_ordered.StreamFull`.
        The claim is awaited on Redis; the task is sent by Celery (kombu's
        routing, signatures and message protocol, untouched) in a worker
        thread, so the event loop never blocks on the broker.
        """
        timeout = checks.seconds("timeout", timeout)
        await self._ready()
        prepared = self._producer.prepare(task, args, kwargs)
        if self._producer.known_closed:
            raise StreamClosedError(
                f"put() on stream {self.name!r} after close(): open a new stream for more work",
                stream=self.name,
            )
        return (await self._put([prepared], timeout)).first

    async def _put(self, run: list[Prepared], timeout: float | None) -> Claim:
        """Claim numbers for ``run`` (as many as the window allows, at least one) and send them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        claim_id = uuid.uuid4().hex
        while True:
            # One claim of this handle at a time. A put cancelled while it
            # waits its turn claims nothing; once its claim is on its way, it
            # goes through and its tasks are sent, even if this put is cancelled.
            await self._claiming.acquire()
            attempt = self._keep(self._claim_and_send(run, claim_id))
            claim: Claim = await asyncio.shield(attempt)
            if claim.count:
                return claim
            if await self._consumer.acknowledge_if_idle():
                # This handle's own consumer acknowledged what it had handed out:
                # or put and get from one task would wait on each other.
                continue
            remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise self._producer.full_error(timeout)
            with self._producer.redis_errors():
                await self._aprotocol.run(self._protocol.wait_op("space", remaining))

    async def _claim_and_send(self, run: list[Prepared], claim_id: str) -> Claim:
        """Claim numbers for ``run`` and send what was claimed.

        The caller holds ``_claiming``; this releases it once the claim is done.
        """
        producer = self._producer
        try:
            op = self._protocol.claim_op(
                [prepared.record for prepared in run],
                producer.default_window,
                producer=self._producer_key,
                claim_id=claim_id,
                lost_after=producer.lost_after,
            )
            with producer.redis_errors():
                claim = await self._aprotocol.run(op)
        finally:
            self._claiming.release()
        if claim.closed:
            raise producer.closed_error()
        errors: list[DispatchError] = []
        for offset, prepared in enumerate(run[: claim.count]):
            try:
                await self._send(prepared, claim.first + offset)
            except DispatchError as exc:  # its number holds the error: go on with the rest
                errors.append(exc)
        if errors:
            raise errors[0]
        return claim

    async def _send(self, prepared: Prepared, seq: int) -> None:
        """Publish a marker at ``seq`` here, or send the task (a DispatchError fills ``seq``)."""
        if prepared.marker is None:
            await asyncio.to_thread(self._producer.send, prepared, seq)
            return
        member = prepared.marker.member(seq, codec.MARKER)
        with self._producer.redis_errors():
            stored = await self._aprotocol.run(self._protocol.publish_op(seq, member))
            if stored < 0:
                raise self._protocol.refused(stored, seq, "put()")

    def _keep(self, work: Any) -> asyncio.Future[Any]:
        """Run ``work`` as a task this stream holds on to until it is done."""
        future: asyncio.Future[Any] = asyncio.ensure_future(work)
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        return future

    async def close(self, error: BaseException | None = None) -> None:
        """Close the stream to further puts (idempotent; any process may do it).

        As :meth:`OrderedResultStream.close <celery_ordered.OrderedResultStream.close>`:
        ``error`` is the exception that stopped the producer; consumers get
        :class:`~celery_ordered.ProducerFailed` instead of a normal end.
        """
        await self._ready()
        await asyncio.to_thread(self._producer.close, error)

    async def reclaim(self) -> int:
        """Dispatch again the tasks whose outcome is overdue; give up on hopeless ones.

        As :meth:`OrderedResultStream.reclaim <celery_ordered.OrderedResultStream.reclaim>`
        (run in a worker thread: it may send tasks). Returns how many numbers
        it acted on.
        """
        await self._ready()
        return await asyncio.to_thread(self._producer.reclaim)

    # -- consuming -------------------------------------------------------------

    async def get(self, timeout: float | None = None) -> Any:
        """The next outcome in submission order.

        As :meth:`OrderedResultStream.get <celery_ordered.OrderedResultStream.get>`:
        waits (on Redis, not polling) within ``timeout`` seconds, then
        :class:`~celery_ordered.StreamEmpty`; a failed task raises here, at its
        position, and the stream goes on after it;
        :class:`~celery_ordered.StreamExhausted` (or
        :class:`~celery_ordered.ProducerFailed`) at the end. Cancelled while it
        waits, it acknowledges what this consumer handed out and releases the
        consumer lease (see the class).
        """
        timeout = checks.seconds("timeout", timeout)
        await self._ready()
        try:
            return await self._consumer.get(timeout)
        except asyncio.CancelledError:
            await self._leave()
            raise

    def __aiter__(self) -> _AsyncOutcomes:
        """The outcomes in order, until the stream is closed and drained.

        A failed task raises out of the loop at its position, and the
        iteration goes on after it: ``async for`` again, or the next
        ``anext()`` of an iterator held (``contextlib.aclosing(aiter(stream))``),
        hands out the next outcome. Leaving the loop before its end
        (``break``, an exception in its body, the task cancelled)
        acknowledges what was handed out and releases the consumer lease,
        once the iteration is closed (at once with ``contextlib.aclosing``,
        else when it is collected).
        """
        return _AsyncOutcomes(self)

    async def _leave(self) -> None:
        """Acknowledge and release the lease: this consumer is going away (cancelled)."""
        try:
            await asyncio.shield(self._keep(self._consumer.release()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # it goes away anyway: its lease lapses by itself
            logger.warning(
                "stream %r: a consumer going away could not acknowledge what it handed out "
                "(%s); a successor may get up to ack_every of them again",
                self.name, exc,
            )  # fmt: skip

    async def ack(self) -> None:
        """Tell Redis what this consumer has handed out so far (see the threaded ``ack``)."""
        await self._ready()
        await self._consumer.acknowledge()

    async def take_over(self) -> None:
        """Make this handle the stream's consumer now, fencing any other one.

        As :meth:`OrderedResultStream.take_over <celery_ordered.OrderedResultStream.take_over>`.
        """
        await self._ready()
        await self._consumer.take_over()

    async def release(self) -> None:
        """Acknowledge what was handed out and give up the consumer lease.

        As :meth:`OrderedResultStream.release <celery_ordered.OrderedResultStream.release>`.
        """
        await self._ready()
        await self._consumer.release()

    @property
    def position(self) -> int:
        """How far this consumer has got: the position after the last outcome it
        handed out (0 before the first, or before it is opened)."""
        return self._consumer.position if self._threaded is not None else 0

    @property
    def peak_out_of_order(self) -> int:
        """The most outcomes ever seen waiting out of order by this consumer."""
        return self._consumer.peak_out_of_order if self._threaded is not None else 0

    # -- lifecycle and inspection ------------------------------------------------

    async def join(self, timeout: float | None = None) -> None:
        """Wait until the stream is closed and every outcome has arrived.

        As :meth:`OrderedResultStream.join <celery_ordered.OrderedResultStream.join>`:
        returns after ``timeout`` seconds even if not (:meth:`is_alive` tells).
        """
        timeout = checks.seconds("timeout", timeout)
        threaded = await self._ready()
        deadline = None if timeout is None else time.monotonic() + timeout
        producer = self._producer
        while await self.is_alive():
            remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            wait = self._protocol.wait_op("done", min(remaining, producer.reclaim_every()))
            with threaded.producer.redis_errors():
                woken = await self._aprotocol.run(wait)
            if not woken:
                await asyncio.to_thread(producer.maybe_reclaim)

    async def is_alive(self) -> bool:
        """False once the stream is closed and every outcome has arrived."""
        with (await self._ready()).producer.redis_errors():
            raw = await self._aprotocol.run(self._protocol.stats_op())
        if raw.incarnation != self._protocol.incarnation:
            raise self._protocol.deleted("is_alive()")
        return raw.closed_at is None or raw.next + raw.stored < raw.closed_at

    async def stats(self) -> StreamStats:
        """Counters of the stream, as :meth:`OrderedResultStream.stats
        <celery_ordered.OrderedResultStream.stats>` reads them (in a worker thread)."""
        threaded = await self._ready()
        if self._consumer.consuming:
            # Not while another task waits in get() on this handle: it
            # acknowledges by itself, and stats() must not wait for it.
            await self._consumer.acknowledge_if_idle()
        return await asyncio.to_thread(threaded.stats)

    async def set_window(self, window: int) -> None:
        """Change the window cap for every producer, while the stream runs."""
        window = validate_window(window)
        await self._ready()
        with self._producer.redis_errors():
            await self._aprotocol.run(self._protocol.set_window_op(window))

    async def delete(self) -> None:
        """Remove every key of the stream from Redis (see the threaded ``delete``)."""
        await self._ready()
        with self._producer.redis_errors():
            await self._aprotocol.delete()
        self._consumer.drop_buffer()

    async def __aenter__(self) -> AsyncOrderedResultStream:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            await self.close()
            return
        # The producer failed: consumers must not take that for a normal end.
        try:
            await self.close(error=exc)
        except (StreamStateLost, RedisUnavailable) as failed:  # the producer's error goes on
            logger.warning(
                "stream %r: could not close it with the producer's error %r: %s",
                self.name, exc, failed,
            )  # fmt: skip

    def amap(
        self,
        task: Any,
        iterable: Iterable[Any] | AsyncIterator[Any],
        *iterables: Iterable[Any] | AsyncIterator[Any],
        timeout: float | None = None,
    ) -> AsyncOrderedMap:
        """Put ``task(item)`` for each item; iterate (``async for``) over the outcomes in order.

        The asyncio twin of :meth:`OrderedResultStream.map
        <celery_ordered.OrderedResultStream.map>`: each iterable may be a plain
        one or an async one (an async generator, say); with several,
        ``task(*items)`` over them zipped, the shortest ending it. The input
        is read only as window space frees up (an endless one works); a sync
        iterable is read on the event loop, so it should not block.

        A failed item raises at its position, and iterating again goes on
        after it. An exception raised by the input itself comes out once,
        after the outcomes of every item read before it, and ends the
        iteration; the stream is closed with it (other consumers see
        :class:`~celery_ordered.ProducerFailed`). Otherwise the stream is
        closed once the input is exhausted. ``timeout`` (seconds) bounds each
        wait for the next outcome (:class:`~celery_ordered.StreamEmpty`;
        nothing is lost, iterating again waits for the same item).
        ``aclose()`` ends it at once: nothing more is read or put, the stream
        is closed and what was handed out is acknowledged; an iterator left
        before its end without it (``break``, its task cancelled) is ended
        that way once it is collected. If another handle closes the stream
        while input is left, :class:`~celery_ordered.StreamClosedError`
        comes out after the outcomes put, as from the threaded ``map``.
        """
        timeout = checks.seconds("timeout", timeout)
        return AsyncOrderedMap(self, task, (iterable, *iterables), timeout)


class _AsyncOutcomes:
    """The async iterator of an :class:`AsyncOrderedResultStream`: ``aiter(stream)``.

    Each ``anext()`` is the stream's next outcome (``get()``), a failed task's
    exception raised at its position, and the iteration goes on after it. It
    ends (``StopAsyncIteration``) once the stream is closed and drained.
    Closed (:meth:`aclose`) or collected while it holds an outcome it handed
    out, as an async generator suspended at its ``yield`` would be, it
    acknowledges what the stream handed out and releases its consumer lease.
    After a failed task's exception it holds nothing: ``async for`` again
    goes on from the stream, whose lease stays this consumer's.
    """

    # Defaults that make __del__ safe even if __init__ did not finish.
    _done = True
    _holding = False

    def __init__(self, stream: AsyncOrderedResultStream) -> None:
        self._stream = stream
        self._loop = asyncio.get_running_loop()
        self._done = False

    def __aiter__(self) -> _AsyncOutcomes:
        return self

    async def __anext__(self) -> Any:
        self._holding = False
        if self._done:
            raise StopAsyncIteration
        try:
            outcome = await self._stream.get()
        except StreamExhausted:
            self._done = True
            raise StopAsyncIteration from None
        self._holding = True
        return outcome

    async def aclose(self) -> None:
        """Leave the stream before its end: acknowledge, release the lease (once)."""
        leave, self._holding, self._done = self._holding and not self._done, False, True
        if leave:
            await self._stream._leave()

    def __del__(self) -> None:
        # Left unclosed, holding an outcome (a break out of ``async for``): leave
        # the stream on its loop, as the loop closes an async generator it collects.
        if not self._holding or self._done or self._loop.is_closed():
            return
        stream = self._stream
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(lambda: stream._keep(stream._leave()))


class AsyncOrderedMap:
    """The async iterator :meth:`AsyncOrderedResultStream.amap` returns.

    A task of its own feeds the stream (reads the input, puts each item), so
    the input is read only as window space frees up; the iterator hands out
    the stream's outcomes in order. An iterator left before its end without
    ``aclose()`` (``break``, its consumer cancelled) is closed once it is
    collected, as an async generator is: its feeder stops, the stream is
    closed and what was handed out is acknowledged.
    """

    def __init__(
        self,
        stream: AsyncOrderedResultStream,
        task: Any,
        iterables: tuple[Iterable[Any] | AsyncIterator[Any], ...],
        timeout: float | None,
    ) -> None:
        if not iterables:
            raise TypeError("amap() needs at least one iterable of items to call the task on")
        self.stream = stream
        self.task = task
        self.timeout = timeout
        self._iterables = iterables
        self._feeding: asyncio.Future[None] | None = None
        self._fed = _Fed()
        #: True once the iteration has ended.
        self.finished = False

    def __aiter__(self) -> AsyncOrderedMap:
        return self

    async def __anext__(self) -> Any:
        if self.finished:
            raise StopAsyncIteration
        if self._feeding is None:
            await self.stream.open()
            feed = _feed(self.stream, self.task, self._iterables, self._fed)
            self._feeding = self.stream._keep(feed)
        try:
            value = await self.stream.get(self.timeout)
        except (StreamExhausted, ProducerFailed) as end:
            # The stream ended: closed by the feeder (at the end of the input,
            # or with its failure), or by another handle while input was left,
            # which the feeder learns from its next put: hear it out first.
            await asyncio.wait({self._feeding})
            error = self._fed.input_error
            if isinstance(end, ProducerFailed) and (
                error is None or isinstance(error, StreamClosedError)
            ):
                raise  # another producer's failure closed it
            await self.aclose()
            if error is None:
                raise StopAsyncIteration from None
            raise error from None
        refused = self._fed.refused.pop(self.stream.position - 1, None)
        if refused is not None:
            raise refused
        return value

    async def aclose(self) -> None:
        """End the iteration now: nothing more is read or put; the stream is closed
        (with what was put still in it) and what was handed out is acknowledged."""
        if self.finished:
            return
        self.finished = True
        if self._feeding is not None and not self._feeding.done():
            self._feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeding
        if self._feeding is not None:
            await self.stream.close()
            await self.stream.ack()

    def __del__(self) -> None:
        # Left before its end without aclose(): close it on its loop, as the
        # loop closes an async generator that is collected unfinished.
        feeding = self._feeding
        if self.finished or feeding is None:
            return
        loop = feeding.get_loop()
        if loop.is_closed():
            return
        closing = self._closed_when_left()
        try:
            loop.call_soon_threadsafe(self.stream._keep, closing)
        except RuntimeError:  # the loop closed meanwhile: nothing can run there now
            closing.close()

    async def _closed_when_left(self) -> None:
        try:
            await self.aclose()
        except Exception as exc:  # nobody waits for this: say it, as the stream does
            logger.warning(
                "stream %r: could not close it after its amap() was left before the end: %s",
                self.stream.name, exc,
            )  # fmt: skip


class _Fed:
    """What an amap's feeder tells its iterator (it holds no reference to the iterator,
    so that an iterator left behind is collected, which stops the feeder)."""

    def __init__(self) -> None:
        #: Items the stream's producer refused (their place holds a marker), by
        #: number: raised there instead.
        self.refused: dict[int, BaseException] = {}
        #: What stopped the feeder before the input's end: the input's own
        #: exception, or the stream's (closed by another handle, say).
        self.input_error: BaseException | None = None


async def _feed(
    stream: AsyncOrderedResultStream,
    task: Any,
    iterables: tuple[Iterable[Any] | AsyncIterator[Any], ...],
    fed: _Fed,
) -> None:
    """Put ``task(*items)`` for every row of ``iterables``, then close the stream
    (with the input's error if it failed)."""
    producer = stream._producer
    try:
        async for items in _zipped(iterables):
            try:
                prepared = producer.prepare(task, tuple(items), {})
            except (TypeError, ValueError) as refused:
                # Refused before a number was claimed: a marker holds its
                # place, where the iterator raises this error instead.
                claim = await stream._put([producer.prepare(None, (), {})], None)
                fed.refused[claim.first] = refused
                continue
            with contextlib.suppress(DispatchError):  # its place holds the error
                await stream._put([prepared], None)
    except Exception as exc:  # the input (or putting) failed: after what it gave
        fed.input_error = exc
        await stream.close(error=exc)
        return
    await stream.close()


async def _zipped(
    iterables: tuple[Iterable[Any] | AsyncIterator[Any], ...],
) -> AsyncIterator[list[Any]]:
    """Rows of one item from each iterable, sync or async, until the shortest ends."""
    iterators: list[Iterator[Any] | AsyncIterator[Any]] = [
        it.__aiter__() if hasattr(it, "__aiter__") else iter(it) for it in iterables
    ]
    while True:
        row = []
        for it in iterators:
            try:
                row.append(await it.__anext__() if hasattr(it, "__anext__") else next(it))
            except (StopIteration, StopAsyncIteration):
                return
        yield row
