"""FastAPI and Starlette integration: a job's outcomes, in order, as a streaming response.

::

    from celery_ordered import AsyncOrderedResultStream
    from celery_ordered.contrib.fastapi import stream_response

    @app.get("/jobs/{name}/events")
    async def job_events(name: str, request: Request):
        stream = AsyncOrderedResultStream(celery_app, name, create=False)
        return stream_response(request, stream)

The body is read on the event loop, with ``await``, from an
:class:`~celery_ordered.AsyncOrderedResultStream` (or any async iterable);
a blocking source (an :class:`~celery_ordered.OrderedResultStream`, a plain
iterable) runs in a thread of its own instead (not in Starlette's shared
thread pool, where each waiting body would hold one of its 40 threads, and
every ``def`` endpoint would wait for them). The formats are described in
:mod:`celery_ordered.web`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "celery_ordered.contrib.fastapi needs Starlette (FastAPI's base): "
        "pip install 'celery-ordered[fastapi]'"
    ) from exc

from ..web import (
    RESPONSE_HEADERS,
    Source,
    _async_body,
    _is_async,
    _last_event_id,
    _threaded_body,
)

__all__ = ["stream_response"]


def stream_response(
    request: Request,
    source: Source,
    format: str = "sse",
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **options: Any,
) -> StreamingResponse:
    """A ``StreamingResponse`` of ``source``'s outcomes, in order.

    ::

        @app.get("/jobs/{name}/events")
        async def job_events(name: str, request: Request):
            stream = AsyncOrderedResultStream(celery_app, name, create=False)
            return stream_response(request, stream, progress=0.5)

        @app.get("/jobs/{name}/results.ndjson")
        async def job_results(name: str, request: Request):
            stream = AsyncOrderedResultStream(celery_app, name, create=False)
            return stream_response(request, stream, "ndjson")

    ``request`` is the endpoint's request: a reconnecting browser's
    ``Last-Event-ID`` is the default ``after`` of server-sent events, so it
    resumes where it was. The rest is as for the Flask and Django helpers:
    ``format`` ``"sse"`` or ``"ndjson"``, the options of
    :func:`celery_ordered.web.sse_events`, and the streaming headers
    (``Cache-Control: no-cache``, ``X-Accel-Buffering: no``) plus ``headers``.

    When the client leaves, the server cancels the body: the stream then
    acknowledges exactly what was sent and hands the stream on, and the
    response closes the body at once (not when it is garbage collected).
    """
    if not isinstance(request, Request):
        raise TypeError(
            "stream_response(request, source, ...) takes the endpoint's request first "
            f"(a starlette.requests.Request), got {type(request).__name__}"
        )
    if format == "sse":  # a reconnecting EventSource resumes after the last event it got
        options.setdefault("after", _last_event_id(request.headers.get("last-event-id")))
    body: Any
    if _is_async(source):
        body, content_type = _async_body(source, format, options)  # type: ignore[arg-type]
    else:
        body, content_type = _threaded_body(source, format, options)  # type: ignore[arg-type]
    return _ClosingResponse(
        body,
        status_code=status,
        media_type=content_type,
        headers={**RESPONSE_HEADERS, **(headers or {})},
    )


class _ClosingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body when it ends, however it ends.

    Starlette leaves a body the client walked away from to the garbage
    collector; closing it here hands the stream on at once.
    """

    def __init__(self, content: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                # A blocking body: its own thread closes it; one never started is
                # closed in a pool thread, as closing it may wait on Redis.
                await run_in_threadpool(self._content.close)
