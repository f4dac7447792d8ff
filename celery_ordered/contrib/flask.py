"""Flask integration: a job's outcomes, in order, as a streaming ``flask.Response``.

::

    from celery_ordered.contrib.flask import stream_response

    @app.get("/jobs/<name>/events")
    def job_events(name):
        return stream_response(OrderedResultStream(celery_app, name))

The formats are described in :mod:`celery_ordered.web`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

try:
    import flask
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "celery_ordered.contrib.flask needs Flask: pip install 'celery-ordered[flask]'"
    ) from exc

from ..stream import OrderedResultStream
from ..web import RESPONSE_HEADERS, _body, _last_event_id

__all__ = ["stream_response"]


def stream_response(
    source: OrderedResultStream | Iterable[Any],
    format: str = "sse",
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **options: Any,
) -> flask.Response:
    """A streaming ``flask.Response`` of ``source``'s outcomes, in order.

    ::

        @app.get("/jobs/<name>/events")
        def job_events(name):
            return stream_response(OrderedResultStream(celery_app, name))

        @app.get("/jobs/<name>/results.ndjson")
        def job_results(name):
            return stream_response(OrderedResultStream(celery_app, name), "ndjson")

    ``format`` is ``"sse"`` (server-sent events, for a browser's
    ``EventSource``) or ``"ndjson"`` (newline-delimited JSON). ``options``
    are those of :func:`celery_ordered.web.sse_events` (``after``,
    ``heartbeat``, ``retry``, ``progress``, ``default``, ``tracebacks``,
    ``on_disconnect``); for server-sent events, ``after`` defaults to the
    request's ``Last-Event-ID``, so a reconnecting browser resumes where it
    was. The response carries ``Cache-Control: no-cache`` and
    ``X-Accel-Buffering: no``, plus ``headers``. Inside a request the body
    runs with the request context (``flask.stream_with_context``), so a
    ``default=`` function or a generator source may use ``flask.g``.
    """
    has_request = flask.has_request_context()
    if format == "sse" and "after" not in options and has_request:
        options["after"] = _last_event_id(flask.request.headers.get("Last-Event-ID"))
    body, content_type = _body(source, format, options)
    content: Iterator[bytes] = flask.stream_with_context(body) if has_request else body
    return flask.Response(
        content,
        status=status,
        content_type=content_type,
        headers={**RESPONSE_HEADERS, **(headers or {})},
    )
