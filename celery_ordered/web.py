"""Stream a job's outcomes to a web client, in order: server-sent events or NDJSON.

::

    from celery_ordered import OrderedResultStream
    from celery_ordered.web import RESPONSE_HEADERS, SSE_CONTENT_TYPE, sse_events

    body = sse_events(OrderedResultStream(app, name=job_name))  # an iterator of bytes
    return Response(body, content_type=SSE_CONTENT_TYPE, headers=RESPONSE_HEADERS)

These generators know no web framework; ``celery_ordered.contrib.flask`` and
``celery_ordered.contrib.django`` wrap them into a response in one call.
:func:`async_sse_events` and :func:`async_ndjson_lines` are their asyncio
twins, for an :class:`~celery_ordered.AsyncOrderedResultStream` or any async
iterable (``celery_ordered.contrib.fastapi`` wraps them for FastAPI and
Starlette): the same options, the same chunks.

Each outcome is one JSON object (UTF-8, on one line) carrying its
``position``: its sequence number in the stream, or its index for any other
iterable. A value::

    {"position": 0, "value": ...}

a task that failed, at its position; the stream goes on after it::

    {"position": 3, "error": {"type": "ValueError", "message": "..."}}

(``"traceback"``, the worker's stack trace, only with ``tracebacks=True``),
and, once everything was sent, the last object::

    {"end": true, "total": 12}

where ``total`` is the number of positions (the last one plus 1). With
``progress=`` (seconds), a report of how far the job is goes at most that
often, between outcomes and while the stream waits::

    {"progress": true, "delivered": 12, "claimed": 20, "total": null, "rate": 8.5,
     "waiting": {"position": 12, "on": "outcome", "seconds": 3.2, "diagnosis": null}}

(``delivered``: outcomes of the whole stream delivered so far; ``claimed``:
positions put so far; ``total``: the number of positions once the stream is
closed, else null; ``rate``: outcomes per second this response sent;
``waiting``: null, or the position the stream has waited on for a whole
wait, ``on`` its ``"outcome"`` (put ``seconds`` ago) or on the
``"producer"`` (not put yet)). In server-sent events each object is the
``data:`` of an event named ``result``, ``failure``, ``progress`` or
``end``, with the position as the ``id:`` of outcomes (so a reconnecting
``EventSource`` sends it back as ``Last-Event-ID``); comment lines keep an
idle connection open. In NDJSON each object is a line.

When the client goes away, the server closes the generator: it stops
consuming at once and, by default, leaves the stream as it is, so that a
reconnecting client resumes it (``on_disconnect="close"`` instead closes
the stream to further puts, which stops its producer). Neither deletes the
stream: its keys expire ``ordered_stream_ttl`` seconds after their last use,
or call :meth:`~celery_ordered.OrderedResultStream.delete` once the job is
over.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
)
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

import redis

from . import checks
from .aio import AsyncOrderedResultStream
from .errors import (
    ConfigurationError,
    ConsumerFenced,
    OrderedStreamError,
    ProducerFailed,
    RedisUnavailable,
    StreamEmpty,
    StreamExhausted,
    StreamStateLost,
    TaskFailed,
)
from .redis.urls import mask_url
from .stream import OrderedResultStream, StreamStats

__all__ = [
    "DEFAULT_HEARTBEAT",
    "NDJSON_CONTENT_TYPE",
    "RESPONSE_HEADERS",
    "SSE_CONTENT_TYPE",
    "async_ndjson_lines",
    "async_sse_events",
    "ndjson_lines",
    "sse_events",
]

#: Content type of :func:`sse_events` bodies (the event-stream format is UTF-8 always).
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"

#: Content type of :func:`ndjson_lines` bodies (JSON is UTF-8 by definition).
NDJSON_CONTENT_TYPE = "application/x-ndjson"

#: Headers a streaming response needs: no caching, and no buffering by nginx
#: (``X-Accel-Buffering``), which would otherwise hold events back until its
#: buffer fills.
RESPONSE_HEADERS: dict[str, str] = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

#: Seconds between comment lines while the next outcome is awaited: well under
#: the 60 s idle timeout of nginx and of most load balancers.
DEFAULT_HEARTBEAT = 15.0

OnDisconnect = Literal["keep", "close"]
Default = Callable[[Any], Any]
#: What a body reads: a stream, or any iterable of outcomes; blocking or asyncio.
Source = OrderedResultStream | AsyncOrderedResultStream | Iterable[Any] | AsyncIterable[Any]
_T = TypeVar("_T")

logger = logging.getLogger(__name__)


# -- reading outcomes ----------------------------------------------------------
#
# The body is written once, as asynchronous generators over a source whose
# calls are awaited. A threaded stream or a plain iterable is wrapped so that
# its calls complete at once (they block instead of suspending); the blocking
# body then steps the same generators without an event loop (_run_blocking).


@dataclass(frozen=True)
class _Item:
    """One outcome read from the source: a value, or the error at its position."""

    position: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _End:
    total: int


@dataclass(frozen=True)
class _Progress:
    """How far the job is: the ``progress`` object of the module docstring."""

    delivered: int
    claimed: int | None
    total: int | None
    rate: float
    waiting: dict[str, Any] | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "progress": True,
            "delivered": self.delivered,
            "claimed": self.claimed,
            "total": self.total,
            "rate": self.rate,
            "waiting": self.waiting,
        }


_HEARTBEAT = object()  # nothing arrived for a heartbeat's time
_IDLE = object()  # nothing arrived for an idle slice (a body served from a thread)

#: Seconds a body served from a thread of its own (:class:`_ThreadedBody`) may
#: wait on its stream without coming back to that thread, when it sends no
#: heartbeats (NDJSON): the thread then notices a client that left within
#: this, instead of when the next outcome comes (which may be hours).
IDLE_SLICE = 2.0

#: Errors an iterable source raises about itself, not one item: they would come
#: back on every read, so they end the response instead of becoming a failure.
#: (A stream's are told apart by its position: see :func:`_read_stream`.)
_FATAL = (RedisUnavailable, StreamStateLost, ConfigurationError, ConsumerFenced)


class _Pacer:
    """When a body sends a progress event (at most one every ``every`` seconds), and
    the rate it reports: outcomes this body sent per second since it began."""

    def __init__(self, every: float | None) -> None:
        self.every = every
        self.sent = 0
        self._began = time.monotonic()
        self._last: float | None = None

    def due(self) -> bool:
        if self.every is None:
            return False
        return self._last is None or time.monotonic() - self._last >= self.every

    def report(
        self,
        delivered: int,
        claimed: int | None = None,
        total: int | None = None,
        waiting: dict[str, Any] | None = None,
    ) -> _Progress:
        now = self._last = time.monotonic()
        elapsed = now - self._began
        rate = round(self.sent / elapsed, 3) if elapsed > 0 else 0.0
        return _Progress(delivered, claimed, total, rate, waiting)

    def from_stats(self, stats: StreamStats, position: int, *, waiting: bool) -> _Progress:
        """A report of the stream's counters, for a body at ``position`` (the next one to
        hand out); ``waiting``: the body has waited a whole slice for it."""
        total = stats.claimed if stats.closed else None
        wait = _waiting(stats, position) if waiting else None
        return self.report(max(stats.delivered, position), stats.claimed, total, wait)

    def ending(self, total: int) -> list[object]:
        """The last entries of a body: a final report (when reporting), then the end."""
        if self.every is None:
            return [_End(total)]
        return [self.report(total, total, total), _End(total)]


def _waiting(stats: StreamStats, head: int) -> dict[str, Any]:
    """What a stream that waits for position ``head`` waits on."""
    if stats.claimed <= head:
        # Nothing was put at that position yet: the stream waits for its producer.
        return {"position": head, "on": "producer", "seconds": None, "diagnosis": None}
    seconds = stats.blocker_waited if stats.blocker == head else None
    return {
        "position": head,
        "on": "outcome",
        "seconds": None if seconds is None else round(seconds, 3),
        # Why it waits, as the consumer's stall warning says it: held by which
        # worker and since when, or queued where, and when it is sent again.
        "diagnosis": stats.diagnosis if stats.blocker == head else None,
    }


def _wait_slice(
    heartbeat: float | None, progress: float | None, idle: float | None = None
) -> float | None:
    """How long one read may wait: the shortest of the heartbeat, the progress
    interval and, for a body without heartbeats, ``idle``."""
    idle = idle if heartbeat is None else None
    slices = [s for s in (heartbeat, progress, idle) if s is not None]
    return min(slices) if slices else None


class _StreamSource(Protocol):
    """What the body reads from a stream (a threaded one through :class:`_Blocking`)."""

    @property
    def name(self) -> str: ...
    @property
    def position(self) -> int: ...
    async def get(self, timeout: float | None = None) -> Any: ...
    async def stats(self) -> StreamStats: ...
    async def take_over(self) -> None: ...
    async def release(self) -> None: ...
    async def close(self) -> None: ...


class _Blocking:
    """A threaded stream behind the awaited calls the body makes: each completes
    at once (it blocks instead of suspending)."""

    def __init__(self, stream: OrderedResultStream) -> None:
        self._stream = stream

    @property
    def name(self) -> str:
        return self._stream.name

    @property
    def position(self) -> int:
        return self._stream.position

    async def get(self, timeout: float | None = None) -> Any:
        return self._stream.get(timeout=timeout)

    async def stats(self) -> StreamStats:
        return self._stream.stats()

    async def take_over(self) -> None:
        self._stream.take_over()

    async def release(self) -> None:
        self._stream.release()

    async def close(self) -> None:
        self._stream.close()


class _Items:
    """A plain iterable behind awaited calls, like :class:`_Blocking`."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterator = iter(iterable)

    async def next(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if callable(close):
            close()  # like ``yield from``: a closed body closes its source


class _AsyncItems:
    """An async iterable (such as ``stream.amap(...)``) as :class:`_Items` reads it."""

    def __init__(self, iterable: AsyncIterable[Any]) -> None:
        self._iterator = aiter(iterable)

    async def next(self) -> Any:
        return await anext(self._iterator)

    async def close(self) -> None:
        aclose = getattr(self._iterator, "aclose", None)
        if callable(aclose):
            await aclose()


#: Runs a clean-up step to its end (see :func:`_shielded`).
Finisher = Callable[[Coroutine[Any, Any, None]], Awaitable[None]]


async def _awaited(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step``: in a blocking body, nothing suspends, so nothing cancels it."""
    await step


async def _shielded(step: Coroutine[Any, Any, None]) -> None:
    """Run ``step`` to its end even if the body is being cancelled: a server
    cancels the body when its client leaves (Starlette's cancel scope then
    cancels every later await), and the stream must still be handed on."""
    await asyncio.shield(step)


async def _read_stream(
    stream: _StreamSource,
    after: int | None,
    wait: float | None,
    pacer: _Pacer,
    on_disconnect: OnDisconnect,
    finish: Finisher,
    quiet: object = _HEARTBEAT,
) -> AsyncGenerator[object, None]:
    """Outcomes past ``after``, heartbeat tokens and progress reports, then the end.

    ``quiet`` is what comes when nothing did for a slice and no report is due:
    a heartbeat, or ``_IDLE`` for a body without heartbeats.
    """
    left = False
    try:
        if after is not None:
            # A client resuming (Last-Event-ID): its old response is gone, but
            # may still hold the consumer lease until the server notices.
            await stream.take_over()
        while True:
            before = stream.position
            try:
                value = await stream.get(timeout=wait)
            except StreamEmpty:
                if pacer.due():
                    yield pacer.from_stats(await stream.stats(), stream.position, waiting=True)
                else:
                    yield quiet
                continue
            except StreamExhausted:
                for entry in pacer.ending(stream.position):
                    yield entry
                return
            except ProducerFailed as exc:
                # The job was cut short: say so after the last outcome, then
                # end the body, so the client stops rather than reconnects.
                if after is None or stream.position > after:
                    yield _Item(stream.position, error=exc)
                for entry in pacer.ending(stream.position):
                    yield entry
                return
            except ConsumerFenced:
                # Another response took the stream over: a reconnecting client
                # (Last-Event-ID) whose old response is this one. Its client is
                # gone, or follows the new one: end quietly, without "end".
                logger.info("stream %r: taken over by a newer response", stream.name)
                return
            except Exception as exc:
                if stream.position == before:
                    # No outcome was taken: an error of the stream itself (Redis
                    # down or refusing every write, the state lost), which would
                    # come back on every read. The response ends unfinished.
                    raise
                # A failed task (whatever its class: a redis-py error too), or an
                # undecodable outcome: at its place, and the stream goes on.
                seq = getattr(exc, "seq", None)
                item = _Item(seq if isinstance(seq, int) else stream.position - 1, error=exc)
            else:
                item = _Item(stream.position - 1, value)
            if after is None or item.position > after:  # else the client has it already
                pacer.sent += 1
                yield item
            if pacer.due():
                yield pacer.from_stats(await stream.stats(), stream.position, waiting=False)
    except (GeneratorExit, asyncio.CancelledError):
        # Closed (or cancelled) before the end: the client left. What it was
        # handed and did not acknowledge stays in the stream, for a
        # reconnecting client.
        left = True
        raise
    finally:
        await finish(_leave(stream, close=left and on_disconnect == "close"))


async def _leave(stream: _StreamSource, *, close: bool) -> None:
    """Close the stream if the client left with ``on_disconnect="close"``, and hand it
    on at once (a reconnecting client, another page) rather than after the consumer
    lease lapses."""
    if close:
        try:
            await stream.close()
        except (RedisUnavailable, redis.RedisError):
            logger.warning("stream %r: could not close it after the client left", stream.name)
    try:
        await stream.release()
    except redis.RedisError as exc:  # it lapses with the consumer lease
        logger.warning("stream %r: could not hand it on: %s", stream.name, mask_url(exc))
    except OrderedStreamError:
        pass


async def _read_items(
    items: _Items | _AsyncItems, after: int | None, pacer: _Pacer, finish: Finisher
) -> AsyncGenerator[object, None]:
    """The items of an iterable, numbered from 0, as :func:`_read_stream` reads a stream."""
    position = 0
    try:
        while True:
            try:
                value = await items.next()
            except StopAsyncIteration:
                for entry in pacer.ending(position):
                    yield entry
                return
            except _FATAL:
                raise
            except Exception as exc:  # an item that failed; the iterator may go on
                item = _Item(position, error=exc)
            else:
                item = _Item(position, value)
            position += 1
            if after is None or item.position > after:
                pacer.sent += 1
                yield item
            if pacer.due():
                yield pacer.report(position)
    finally:
        await finish(items.close())


def _read(
    source: Source,
    after: int | None,
    heartbeat: float | None,
    progress: float | None,
    on_disconnect: OnDisconnect,
    idle: float | None = None,
) -> AsyncGenerator[object, None]:
    """The entries of a body of ``source`` (see :func:`_read_stream`); a stream
    read without heartbeats comes back every ``idle`` seconds with ``_IDLE``."""
    pacer = _Pacer(progress)
    wait = _wait_slice(heartbeat, progress, idle)
    quiet = _HEARTBEAT if heartbeat is not None else _IDLE
    if isinstance(source, OrderedResultStream):
        return _read_stream(_Blocking(source), after, wait, pacer, on_disconnect, _awaited, quiet)
    if isinstance(source, AsyncOrderedResultStream):
        return _read_stream(source, after, wait, pacer, on_disconnect, _shielded, quiet)
    if isinstance(source, AsyncIterable):
        return _read_items(_AsyncItems(source), after, pacer, _shielded)
    return _read_items(_Items(source), after, pacer, _awaited)


def _run_blocking(body: AsyncGenerator[bytes, None]) -> Generator[bytes, None, None]:
    """``body``'s chunks, stepped without an event loop: all it awaits completes at once.

    Closing this generator (the server does when the client leaves) closes
    ``body`` the same way.
    """
    try:
        while True:
            try:
                chunk = _completed(body.__anext__())
            except StopAsyncIteration:
                return
            yield chunk
    finally:
        _completed(body.aclose())


def _completed(step: Coroutine[Any, Any, _T]) -> _T:
    """The result of ``step``, which must complete without suspending."""
    try:
        step.send(None)
    except StopIteration as done:
        return cast(_T, done.value)
    step.close()
    raise RuntimeError("a blocking response body awaited something that suspends")


# -- encoding ------------------------------------------------------------------


def _dumps(obj: Any, default: Default | None) -> bytes:
    try:
        text = json.dumps(
            obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=default
        )
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON's \\u escapes carry it
        return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=default).encode()


def _error_fields(exc: BaseException, tracebacks: bool) -> dict[str, Any]:
    name, message = type(exc).__qualname__, str(exc)
    if type(exc) is TaskFailed and exc.exc_type:
        # The worker's class could not be rebuilt here: show its name, not ours.
        name = exc.exc_type
        prefix = f"{exc.exc_module}.{exc.exc_type}: " if exc.exc_module else ""
        message = message.removeprefix(prefix)
    fields: dict[str, Any] = {"type": name, "message": message}
    if tracebacks:
        fields["traceback"] = getattr(exc, "stack_trace", None) or None
    return fields


def _encode(item: _Item, default: Default | None, tracebacks: bool) -> tuple[str, bytes]:
    """``("result" | "failure", JSON)`` for one outcome."""
    if item.error is not None:
        fields = _error_fields(item.error, tracebacks)
        return "failure", _dumps({"position": item.position, "error": fields}, None)
    try:
        return "result", _dumps({"position": item.position, "value": item.value}, default)
    except Exception as exc:
        if isinstance(exc, ValueError) and "Out of range float" in str(exc):
            fix = (
                "NaN and infinities are not JSON (default= is never called for a float): "
                "return None, or a string, in their place"
            )
        else:
            fix = "Pass default= (such as default=str) to encode such values"
        message = (
            f"the value at position {item.position} (a {type(item.value).__name__}) cannot "
            f"be sent as JSON: {exc}. {fix}, or return JSON-ready values from the task"
        )
        logger.error("%s", message)
        error = {"type": type(exc).__name__, "message": message}
        return "failure", _dumps({"position": item.position, "error": error}, None)


def _sse_chunk(entry: object, default: Default | None, tracebacks: bool) -> bytes | None:
    """One server-sent event (or comment) for an entry of the body."""
    if isinstance(entry, _Item):
        event, data = _encode(entry, default, tracebacks)
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (entry.position, event.encode(), data)
    if isinstance(entry, _Progress):
        # No id: a reconnecting EventSource resumes after the last outcome.
        return b"event: progress\ndata: %s\n\n" % _dumps(entry.fields(), None)
    if isinstance(entry, _End):
        return b"event: end\ndata: %s\n\n" % _dumps({"end": True, "total": entry.total}, None)
    if entry is _IDLE:
        return None
    return b": keep-alive\n\n"


def _ndjson_chunk(entry: object, default: Default | None, tracebacks: bool) -> bytes | None:
    """One line for an entry of the body (None for a heartbeat: NDJSON has no comments)."""
    if isinstance(entry, _Item):
        return _encode(entry, default, tracebacks)[1] + b"\n"
    if isinstance(entry, _Progress):
        return _dumps(entry.fields(), None) + b"\n"
    if isinstance(entry, _End):
        return _dumps({"end": True, "total": entry.total}, None) + b"\n"
    return None


async def _encoded(
    entries: AsyncGenerator[object, None],
    encode: Callable[[object], bytes | None],
    first: bytes | None = None,
) -> AsyncGenerator[bytes, None]:
    """The body: ``first`` (sent at once), then each entry encoded; an empty chunk
    for ``_IDLE`` (which only a body served from a thread asks for)."""
    if first is not None:
        yield first
    try:
        async for entry in entries:
            chunk = encode(entry)
            if chunk is not None:
                yield chunk
            elif entry is _IDLE:
                yield b""
    finally:
        await entries.aclose()


def _sse_opening(retry: float | None) -> bytes:
    """The first chunk of an SSE body: the client sees the response open even while
    the head of the line is still running."""
    field = b"" if retry is None else b"retry: %d\n" % round(retry * 1000)
    return b": open\n" + field + b"\n"


# -- the public generators -------------------------------------------------------


def _is_async(source: Any) -> bool:
    """Whether ``source`` is read with ``await`` (an asyncio stream or an async iterable)."""
    return isinstance(source, (AsyncOrderedResultStream, AsyncIterable))


def _check_source(source: Any, *, asynchronous: bool) -> None:
    if asynchronous:
        if not _is_async(source):
            raise TypeError(
                f"the source must be an AsyncOrderedResultStream or an async iterable of "
                f"outcomes (such as stream.amap(...)), got {type(source).__name__}: a "
                "blocking source is served by sse_events() or ndjson_lines(), in a thread"
            )
        return
    if _is_async(source):
        raise TypeError(
            f"{type(source).__name__} is read with await: serve it with async_sse_events() "
            "or async_ndjson_lines() (celery_ordered.contrib.fastapi does)"
        )
    if isinstance(source, (str, bytes)) or not isinstance(source, (OrderedResultStream, Iterable)):
        raise TypeError(
            f"the source must be an OrderedResultStream or an iterable of outcomes (such "
            f"as stream.map(...) or celery_ordered.imap(...)), got {type(source).__name__}"
        )


def _check_common(after: Any, default: Any, tracebacks: Any, on_disconnect: Any) -> None:
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
        raise ValueError(
            f"after must be None or the last position the client has (an int >= 0), got {after!r}"
        )
    if default is not None and not callable(default):
        raise TypeError(
            f"default must be None or a callable that turns a value into something JSON "
            f"can encode (like json.dumps's default=str), got {default!r}"
        )
    if not isinstance(tracebacks, bool):
        raise TypeError(f"tracebacks must be True or False, got {tracebacks!r}")
    if on_disconnect not in ("keep", "close"):
        raise ValueError(
            f"on_disconnect must be 'keep' (a reconnecting client resumes the stream) or "
            f"'close' (close it to further puts), got {on_disconnect!r}"
        )


def _check_seconds(name: str, value: Any) -> float | None:
    """None, or ``value`` as seconds > 0 (:func:`celery_ordered.checks.seconds`)."""
    return None if value is None else checks.seconds(name, value, none=False, zero=False)


def sse_events(
    source: OrderedResultStream | Iterable[Any],
    *,
    after: int | None = None,
    heartbeat: float | None = DEFAULT_HEARTBEAT,
    retry: float | None = None,
    progress: float | None = None,
    default: Default | None = None,
    tracebacks: bool = False,
    on_disconnect: OnDisconnect = "keep",
) -> Generator[bytes, None, None]:
    """The outcomes of ``source`` as server-sent events: one ``bytes`` chunk per event.

    ::

        events = sse_events(OrderedResultStream(app, name=job), after=last_event_id)
        return Response(events, content_type=SSE_CONTENT_TYPE, headers=RESPONSE_HEADERS)

    Events are ``result``, ``failure`` (a task's error at its position; the
    stream goes on) and ``end`` (everything was sent; a browser must then
    call ``EventSource.close()``, or it reconnects), and ``progress`` with
    ``progress=``. The failure event is not named ``error``: ``EventSource``
    fires ``error`` for its own connection errors. Each event's ``data:`` is
    a JSON object described at the top of this module.

    Args:
        source: an :class:`~celery_ordered.OrderedResultStream` (positions are
            its sequence numbers), or any iterable of outcomes, such as
            ``stream.map(...)`` (positions count from 0; an item that raises
            is a failure and the iteration goes on if the iterator does).
        after: skip positions up to this one: the ``Last-Event-ID`` a
            reconnecting ``EventSource`` sends. An ``OrderedResultStream``
            source is then taken over (:meth:`~celery_ordered.OrderedResultStream.take_over`):
            the client's old response is gone, though it may still hold the
            stream's consumer lease. Without it, a second response on the
            same stream waits (sending keep-alives) until the first one ends.
        heartbeat: seconds between ``: keep-alive`` comments while the next
            outcome is awaited, so that proxies keep the connection open and a
            departed client is noticed; None for none. Only an
            ``OrderedResultStream`` source can be waited on this way.
        retry: seconds the browser waits before reconnecting (the ``retry:``
            field); None leaves the browser's default (a few seconds).
        progress: send a ``progress`` event (how many outcomes were
            delivered, of how many, the rate, and what the stream waits on)
            at most every ``progress`` seconds: after outcomes, and while the
            stream waits (in place of keep-alives, where it is the shorter);
            a final one goes before ``end``. None (the default) sends none.
            Each costs one round trip to Redis (:meth:`~celery_ordered.OrderedResultStream.stats`).
        default: called for a value JSON cannot encode, returns one it can
            (like :func:`json.dumps`'s ``default``). Without it, or if it
            fails, such a value is sent as a failure at its position, with a
            message saying so, and logged.
        tracebacks: include the worker's stack trace in failures. Off by
            default: a stack trace tells a browser about your code.
        on_disconnect: what to do when the client leaves before the end:
            ``"keep"`` the stream as it is, to be resumed, or ``"close"`` it to
            further puts (its producer's next ``put`` raises
            :class:`~celery_ordered.StreamClosedError`).

    Raises:
        RedisUnavailable: from the iteration, when Redis stays down: the
            response ends without its ``end`` event.
    """
    _check_source(source, asynchronous=False)
    arguments = (after, heartbeat, retry, progress, default, tracebacks, on_disconnect)
    return _run_blocking(_made(source, True, *arguments))


def ndjson_lines(
    source: OrderedResultStream | Iterable[Any],
    *,
    after: int | None = None,
    progress: float | None = None,
    default: Default | None = None,
    tracebacks: bool = False,
    on_disconnect: OnDisconnect = "keep",
) -> Generator[bytes, None, None]:
    """The outcomes of ``source`` as newline-delimited JSON: one line per outcome.

    ::

        lines = ndjson_lines(stream.map(render, pages))
        return Response(lines, content_type=NDJSON_CONTENT_TYPE, headers=RESPONSE_HEADERS)

    Each line is one JSON object (``value`` or ``error``, with its
    ``position``), and the last is ``{"end": true, "total": N}``: a body
    without it was cut short. With ``progress=``, ``{"progress": true, ...}``
    lines come in between. NDJSON has no comment lines, so there are no
    heartbeats: a connection idle for longer than a proxy's timeout is
    closed by the proxy (progress lines, sent while the stream waits, keep
    it open). The arguments are those of :func:`sse_events`.
    """
    _check_source(source, asynchronous=False)
    arguments = (after, None, None, progress, default, tracebacks, on_disconnect)
    return _run_blocking(_made(source, False, *arguments))


def async_sse_events(
    source: AsyncOrderedResultStream | AsyncIterable[Any], **options: Any
) -> AsyncGenerator[bytes, None]:
    """:func:`sse_events` for asyncio: the outcomes of ``source`` as server-sent events.

    ::

        stream = AsyncOrderedResultStream(app, name=job, create=False)
        events = async_sse_events(stream, after=last_event_id, progress=0.5)
        return StreamingResponse(events, media_type=SSE_CONTENT_TYPE, headers=RESPONSE_HEADERS)

    ``source`` is an :class:`~celery_ordered.AsyncOrderedResultStream` or any
    async iterable of outcomes (such as ``stream.amap(...)``); ``options`` are
    those of :func:`sse_events`, and so are the events. The event loop never
    waits on Redis. When the server cancels the body (its client left), the
    stream acknowledges exactly what the body was handed, so a reconnecting
    client resumes right after its ``Last-Event-ID``.
    """
    _check_source(source, asynchronous=True)
    return _made(source, True, **_with_defaults(sse_events, options))


def async_ndjson_lines(
    source: AsyncOrderedResultStream | AsyncIterable[Any], **options: Any
) -> AsyncGenerator[bytes, None]:
    """:func:`ndjson_lines` for asyncio, as :func:`async_sse_events` is for :func:`sse_events`."""
    _check_source(source, asynchronous=True)
    options = _with_defaults(ndjson_lines, options)
    return _made(source, False, heartbeat=None, retry=None, **options)


def _with_defaults(function: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against ``function``'s keyword arguments, with its defaults."""
    bound = inspect.signature(function).bind(None, **options)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name != "source"}


def _made(
    source: Source,
    sse: bool,
    after: int | None,
    heartbeat: float | None,
    retry: float | None,
    progress: float | None,
    default: Default | None,
    tracebacks: bool,
    on_disconnect: OnDisconnect,
    idle: float | None = None,
) -> AsyncGenerator[bytes, None]:
    """The body of :func:`sse_events` (``sse``) or :func:`ndjson_lines`: its arguments
    are checked at the call, and it runs when iterated. ``idle``: see :func:`_read`."""
    _check_common(after, default, tracebacks, on_disconnect)
    heartbeat = _check_seconds("heartbeat", heartbeat)
    retry = _check_seconds("retry", retry)
    progress = _check_seconds("progress", progress)
    entries = _read(source, after, heartbeat, progress, on_disconnect, idle)
    if sse:
        chunk = functools.partial(_sse_chunk, default=default, tracebacks=tracebacks)
        return _encoded(entries, chunk, _sse_opening(retry))
    line = functools.partial(_ndjson_chunk, default=default, tracebacks=tracebacks)
    return _encoded(entries, line)


def _last_event_id(header: str | None) -> int | None:
    """The position in a ``Last-Event-ID`` header, or None if it holds none.

    The header comes from the client: anything but a position is ignored.
    """
    raw = (header or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 20 else None


def _body(
    source: OrderedResultStream | Iterable[Any], format: str, options: dict[str, Any]
) -> tuple[Generator[bytes, None, None], str]:
    """The body and content type of a response in ``format`` (for the contrib helpers)."""
    return _formatted(source, format, options, sse_events, ndjson_lines)


def _threaded_body(
    source: OrderedResultStream | Iterable[Any], format: str, options: dict[str, Any]
) -> tuple[_ThreadedBody, str]:
    """:func:`_body` served from a thread of its own (see :class:`_ThreadedBody`).

    Read without heartbeats (NDJSON, or ``heartbeat=None``), a stream's body
    still comes back to its thread every :data:`IDLE_SLICE` seconds (with
    an empty chunk, which the thread keeps to itself), so the thread notices
    a client that left then, not when the next outcome comes.
    """

    def made(public: Callable[..., Generator[bytes, None, None]]) -> Callable[..., Any]:
        def build(source: Any, **options: Any) -> Generator[bytes, None, None]:
            _check_source(source, asynchronous=False)
            arguments = {"heartbeat": None, "retry": None, **_with_defaults(public, options)}
            body = _made(source, public is sse_events, idle=IDLE_SLICE, **arguments)
            return _run_blocking(body)

        return build

    body, content_type = _formatted(source, format, options, made(sse_events), made(ndjson_lines))
    return _ThreadedBody(body), content_type


def _async_body(
    source: AsyncOrderedResultStream | AsyncIterable[Any], format: str, options: dict[str, Any]
) -> tuple[AsyncGenerator[bytes, None], str]:
    """:func:`_body` for an asyncio source."""
    return _formatted(source, format, options, async_sse_events, async_ndjson_lines)


def _formatted(
    source: Any,
    format: str,
    options: dict[str, Any],
    sse: Callable[..., _T],
    ndjson: Callable[..., _T],
) -> tuple[_T, str]:
    """``sse(source, **options)`` or ``ndjson(...)`` for ``format``, and its content type."""
    if format == "sse":
        return sse(source, **options), SSE_CONTENT_TYPE
    if format == "ndjson":
        sse_only = sorted({"heartbeat", "retry"} & options.keys())
        if sse_only:
            raise ValueError(
                f"{' and '.join(sse_only)} apply to format='sse' only: NDJSON has no "
                "comment lines and no reconnection delay"
            )
        return ndjson(source, **options), NDJSON_CONTENT_TYPE
    raise ValueError(
        f"format must be 'sse' (server-sent events, for a browser's EventSource) or "
        f"'ndjson' (newline-delimited JSON, for fetch() or scripts), got {format!r}"
    )


class _ThreadedBody:
    """A blocking body served to an event loop: it runs in a thread of its own.

    Django under ASGI, and Starlette for a blocking source, serve a body
    this way: Django would otherwise read it to its end before sending
    anything, and Starlette's shared thread pool (40 threads, which also run
    every ``def`` endpoint) would have a thread held by each waiting body.

    The thread computes a chunk only when the loop asks for one, so the
    stream is never read ahead of the client (its window stays the
    backpressure). ``close()`` (Django calls it when the response ends, the
    client gone or not) stops the thread and closes the body in it.
    """

    def __init__(self, body: Generator[bytes, None, None]) -> None:
        self._body = body
        self._chunks: asyncio.Queue[tuple[str, Any]] | None = None
        self._wanted = threading.Semaphore(0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        # Dropped without close(): the thread must not wait forever.
        weakref.finalize(self, _release, self._stop, self._wanted)

    def __aiter__(self) -> _ThreadedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            with self._lock:
                if self._stop.is_set():
                    raise StopAsyncIteration
                self._started = True
            self._chunks = asyncio.Queue()
            args = (self._body, asyncio.get_running_loop(), self._chunks, self._wanted, self._stop)
            threading.Thread(
                target=_pump, args=args, name="celery-ordered-response", daemon=True
            ).start()
        if self._stop.is_set():
            raise StopAsyncIteration
        while True:
            self._wanted.release()
            kind, value = await self._chunks.get()
            if kind != "chunk":
                break
            if value:
                return bytes(value)
            # Empty: the body came back to its thread while it waited (see
            # _threaded_body), and the thread saw no stop; ask again.
        self._stop.set()
        if kind == "error":
            raise value
        raise StopAsyncIteration

    def close(self) -> None:
        """Stop the body; safe from any thread, and more than once."""
        with self._lock:
            started = self._started
            self._stop.set()
        if started:
            self._wanted.release()  # the thread wakes, sees the stop, closes the body
        else:
            self._body.close()


def _release(stop: threading.Event, wanted: threading.Semaphore) -> None:
    stop.set()
    wanted.release()


def _pump(
    body: Generator[bytes, None, None],
    loop: asyncio.AbstractEventLoop,
    chunks: asyncio.Queue[tuple[str, Any]],
    wanted: threading.Semaphore,
    stop: threading.Event,
) -> None:
    def send(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()

    try:
        while True:
            wanted.acquire()
            if stop.is_set():
                return
            try:
                chunk = next(body)
            except StopIteration:
                send("end", None)
                return
            except BaseException as exc:
                send("error", exc)
                return
            send("chunk", chunk)
            if stop.is_set():  # the loop is gone: nobody will ask for more
                return
    finally:
        body.close()  # in this thread, where the body ran: a disconnect is handled here
