"""A view that runs a job and streams its outcomes, in order, as they come."""

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from celery_ordered.contrib.django import stream_response

from .work import start_job


def run_job(request: HttpRequest) -> HttpResponse:
    """``GET /jobs/run?items=40&batch=10&format=ndjson``: run a job, stream it.

    The job lives as long as its response: when the client leaves, its stream
    is closed and the producer stops. This suits ``fetch()`` and scripts
    (``curl -N``); ``format=sse`` works too, but a browser's ``EventSource``
    reconnects by itself, which here would start a new job: give it a job
    that outlives the request (see the Flask example).
    """
    try:
        items = int(request.GET.get("items", 40))
        batch = int(request.GET.get("batch", 10))
    except ValueError:
        return HttpResponseBadRequest("items and batch must be whole numbers")
    if not (1 <= items <= 10_000 and batch >= 1):
        return HttpResponseBadRequest("items must be 1 to 10000, and batch at least 1")
    format = request.GET.get("format", "ndjson")
    if format not in ("ndjson", "sse"):
        return HttpResponseBadRequest("format must be ndjson or sse")
    stream = start_job(items, batch)
    return stream_response(request, stream, format, after=None, on_disconnect="close")
