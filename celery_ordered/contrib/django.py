"""Django integration: a job's outcomes, in order, as a ``StreamingHttpResponse``.

::

    from celery_ordered.contrib.django import stream_response

    def job_events(request, name):
        return stream_response(request, OrderedResultStream(celery_app, name))

Under WSGI the response body is a plain iterator. Under ASGI, Django would
read a plain iterator to its end before sending anything, so the body runs
in a thread of its own instead and the event loop never blocks on Redis.
The formats are described in :mod:`celery_ordered.web`.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Generator, Iterable, Mapping
from typing import Any

try:
    from django.core.handlers.asgi import ASGIRequest
    from django.http import HttpRequest, StreamingHttpResponse
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "celery_ordered.contrib.django needs Django: pip install 'celery-ordered[django]'"
    ) from exc

from ..stream import OrderedResultStream
from ..web import RESPONSE_HEADERS, _body, _last_event_id

__all__ = ["stream_response"]


def stream_response(
    request: HttpRequest,
    source: OrderedResultStream | Iterable[Any],
    format: str = "sse",
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **options: Any,
) -> StreamingHttpResponse:
    """A ``StreamingHttpResponse`` of ``source``'s outcomes, in order.

    ::

        def job_events(request, name):
            return stream_response(request, OrderedResultStream(celery_app, name))

        def job_results(request, name):
            return stream_response(request, OrderedResultStream(celery_app, name), "ndjson")

    ``format`` is ``"sse"`` (server-sent events, for a browser's
    ``EventSource``) or ``"ndjson"`` (newline-delimited JSON). ``options``
    are those of :func:`celery_ordered.web.sse_events` (``after``,
    ``heartbeat``, ``retry``, ``progress``, ``default``, ``tracebacks``,
    ``on_disconnect``); for server-sent events, ``after`` defaults to the
    request's ``Last-Event-ID``, so a reconnecting browser resumes where it
    was. The response carries ``Cache-Control: no-cache`` and
    ``X-Accel-Buffering: no``, plus ``headers``. ``request`` is the view's
    request: it tells WSGI from ASGI, and carries ``Last-Event-ID``.
    """
    if not isinstance(request, HttpRequest):
        raise TypeError(
            "stream_response(request, source, ...) takes the view's request first, got "
            f"{type(request).__name__}"
        )
    if format == "sse" and "after" not in options:
        options["after"] = _last_event_id(request.headers.get("Last-Event-ID"))
    body, content_type = _body(source, format, options)
    content: Generator[bytes, None, None] | _ThreadedBody = body
    if isinstance(request, ASGIRequest):
        content = _ThreadedBody(body)
    return StreamingHttpResponse(
        content,
        status=status,
        content_type=content_type,
        headers={**RESPONSE_HEADERS, **(headers or {})},
    )


class _ThreadedBody:
    """A blocking body served to an event loop: it runs in a thread of its own.

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
        self._wanted.release()
        kind, value = await self._chunks.get()
        if kind == "chunk":
            return bytes(value)
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
