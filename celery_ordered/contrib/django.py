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
from ..web import RESPONSE_HEADERS, _body, _last_event_id, _threaded_body, _ThreadedBody

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
    content: Generator[bytes, None, None] | _ThreadedBody
    if isinstance(request, ASGIRequest):
        content, content_type = _threaded_body(source, format, options)
    else:
        content, content_type = _body(source, format, options)
    return StreamingHttpResponse(
        content,
        status=status,
        content_type=content_type,
        headers={**RESPONSE_HEADERS, **(headers or {})},
    )
