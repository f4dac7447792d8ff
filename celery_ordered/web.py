"""Stream a job's outcomes to a web client, in order: server-sent events or NDJSON.

::

    from celery_ordered import OrderedResultStream
    from celery_ordered.web import RESPONSE_HEADERS, SSE_CONTENT_TYPE, sse_events

    body = sse_events(OrderedResultStream(app, name=job_name))  # an iterator of bytes
    return Response(body, content_type=SSE_CONTENT_TYPE, headers=RESPONSE_HEADERS)

These generators know no web framework; ``celery_ordered.contrib.flask`` and
``celery_ordered.contrib.django`` wrap them into a response in one call.

Each outcome is one JSON object (UTF-8, on one line) carrying its
``position``: its sequence number in the stream, or its index for any other
iterable. A value::

    {"position": 0, "value": ...}

a task that failed, at its position; the stream goes on after it::

    {"position": 3, "error": {"type": "ValueError", "message": "..."}}

(``"traceback"``, the worker's stack trace, only with ``tracebacks=True``),
and, once everything was sent, the last object::

    {"end": true, "total": 12}

where ``total`` is the number of positions (the last one plus 1). In
server-sent events each object is the ``data:`` of an event named
``result``, ``failure`` or ``end``, with the position as its ``id:`` (so a
reconnecting ``EventSource`` sends it back as ``Last-Event-ID``); comment
lines keep an idle connection open. In NDJSON each object is a line.

When the client goes away, the server closes the generator: it stops
consuming at once and, by default, leaves the stream as it is, so that a
reconnecting client resumes it (``on_disconnect="close"`` instead closes
the stream to further puts, which stops its producer). Neither deletes the
stream: its keys expire ``ordered_stream_ttl`` seconds after their last use,
or call :meth:`~celery_ordered.OrderedResultStream.delete` once the job is
over.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Literal

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
from .stream import OrderedResultStream

__all__ = [
    "DEFAULT_HEARTBEAT",
    "NDJSON_CONTENT_TYPE",
    "RESPONSE_HEADERS",
    "SSE_CONTENT_TYPE",
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

logger = logging.getLogger(__name__)


# -- reading outcomes ----------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One outcome read from the source: a value, or the error at its position."""

    position: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _End:
    total: int


_HEARTBEAT = object()  # nothing arrived for a heartbeat's time

#: Errors about the whole stream, not one position: they would come back on
#: every read, so they end the response instead of becoming a failure event.
_FATAL = (RedisUnavailable, StreamStateLost, ConfigurationError, ConsumerFenced)


def _read_stream(
    stream: OrderedResultStream,
    wait: float | None,
    on_disconnect: OnDisconnect,
    takeover: bool = False,
) -> Generator[object, None, None]:
    try:
        if takeover:
            # A client resuming (Last-Event-ID): its old response is gone, but
            # may still hold the consumer lease until the server notices.
            stream.take_over()
        while True:
            try:
                value = stream.get(timeout=wait)
            except StreamEmpty:
                yield _HEARTBEAT
                continue
            except StreamExhausted:
                yield _End(stream.position)
                return
            except ProducerFailed as exc:
                # The job was cut short: say so after the last outcome, then
                # end the body, so the client stops rather than reconnects.
                yield _Item(stream.position, error=exc)
                yield _End(stream.position)
                return
            except _FATAL:
                raise  # the stream cannot go on: the response ends unfinished
            except Exception as exc:  # a failed task (or undecodable outcome), at its place
                seq = getattr(exc, "seq", None)
                position = seq if isinstance(seq, int) else stream.position - 1
                yield _Item(position, error=exc)
            else:
                yield _Item(stream.position - 1, value)
    except GeneratorExit:
        # Closed before the end: the client left. What it was handed and did
        # not acknowledge stays in the stream, for a reconnecting client.
        if on_disconnect == "close":
            try:
                stream.close()
            except RedisUnavailable:
                logger.warning("stream %r: could not close it after the client left", stream.name)
        raise
    finally:
        # Hand the stream on at once (a reconnecting client, another page)
        # rather than after the consumer lease lapses.
        with contextlib.suppress(OrderedStreamError):
            stream.release()


def _read_iterable(iterable: Iterable[Any]) -> Generator[object, None, None]:
    iterator = iter(iterable)
    position = 0
    try:
        while True:
            try:
                value = next(iterator)
            except StopIteration:
                yield _End(position)
                return
            except _FATAL:
                raise
            except Exception as exc:  # an item that failed; the iterator may go on
                yield _Item(position, error=exc)
            else:
                yield _Item(position, value)
            position += 1
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()  # like ``yield from``: a closed body closes its source


def _read(
    source: OrderedResultStream | Iterable[Any],
    after: int | None,
    wait: float | None,
    on_disconnect: OnDisconnect,
) -> Generator[object, None, None]:
    """Outcomes past ``after``, heartbeat tokens, then the end (closing the source if cut short)."""
    reader: Generator[object, None, None]
    if isinstance(source, OrderedResultStream):
        reader = _read_stream(source, wait, on_disconnect, takeover=after is not None)
    else:
        reader = _read_iterable(source)
    try:
        for entry in reader:
            if isinstance(entry, _Item) and after is not None and entry.position <= after:
                continue  # the client has it already
            yield entry
    finally:
        reader.close()


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
        message = (
            f"the value at position {item.position} (a {type(item.value).__name__}) cannot "
            f"be sent as JSON: {exc}. Pass default= (such as default=str) to encode such "
            "values, or return JSON-ready values from the task"
        )
        logger.error("%s", message)
        error = {"type": type(exc).__name__, "message": message}
        return "failure", _dumps({"position": item.position, "error": error}, None)


def _sse_body(
    entries: Generator[object, None, None], retry: float | None, **encode: Any
) -> Generator[bytes, None, None]:
    # The first chunk goes out at once: the client sees the response open
    # even while the head of the line is still running.
    yield b": open\n" + (b"retry: %d\n" % round(retry * 1000) if retry is not None else b"") + b"\n"
    try:
        for entry in entries:
            if isinstance(entry, _Item):
                event, data = _encode(entry, **encode)
                yield b"id: %d\nevent: %s\ndata: %s\n\n" % (entry.position, event.encode(), data)
            elif isinstance(entry, _End):
                yield b"event: end\ndata: %s\n\n" % _dumps(
                    {"end": True, "total": entry.total}, None
                )
            else:
                yield b": keep-alive\n\n"
    finally:
        entries.close()


def _ndjson_body(
    entries: Generator[object, None, None], **encode: Any
) -> Generator[bytes, None, None]:
    try:
        for entry in entries:
            if isinstance(entry, _Item):
                yield _encode(entry, **encode)[1] + b"\n"
            elif isinstance(entry, _End):
                yield _dumps({"end": True, "total": entry.total}, None) + b"\n"
    finally:
        entries.close()


# -- the public generators -------------------------------------------------------


def _check_source(source: Any) -> None:
    if isinstance(source, OrderedResultStream):
        return
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
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


def _check_seconds(name: str, value: Any, meaning: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be None ({meaning}) or seconds > 0, got {value!r}")


def sse_events(
    source: OrderedResultStream | Iterable[Any],
    *,
    after: int | None = None,
    heartbeat: float | None = DEFAULT_HEARTBEAT,
    retry: float | None = None,
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
    call ``EventSource.close()``, or it reconnects). The failure event is not
    named ``error``: ``EventSource`` fires ``error`` for its own connection
    errors. Each event's ``data:`` is a JSON object described at the top of
    this module.

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
    _check_source(source)
    _check_common(after, default, tracebacks, on_disconnect)
    _check_seconds("heartbeat", heartbeat, "no heartbeats")
    _check_seconds("retry", retry, "the browser's default")
    entries = _read(source, after, heartbeat, on_disconnect)
    return _sse_body(entries, retry, default=default, tracebacks=tracebacks)


def ndjson_lines(
    source: OrderedResultStream | Iterable[Any],
    *,
    after: int | None = None,
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
    without it was cut short. NDJSON has no comment lines, so there are no
    heartbeats: a connection idle for longer than a proxy's timeout is
    closed by the proxy. The arguments are those of :func:`sse_events`.
    """
    _check_source(source)
    _check_common(after, default, tracebacks, on_disconnect)
    entries = _read(source, after, None, on_disconnect)
    return _ndjson_body(entries, default=default, tracebacks=tracebacks)


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
    if format == "sse":
        return sse_events(source, **options), SSE_CONTENT_TYPE
    if format == "ndjson":
        sse_only = sorted({"heartbeat", "retry"} & options.keys())
        if sse_only:
            raise ValueError(
                f"{' and '.join(sse_only)} apply to format='sse' only: NDJSON has no "
                "comment lines and no reconnection delay"
            )
        return ndjson_lines(source, **options), NDJSON_CONTENT_TYPE
    raise ValueError(
        f"format must be 'sse' (server-sent events, for a browser's EventSource) or "
        f"'ndjson' (newline-delimited JSON, for fetch() or scripts), got {format!r}"
    )
