"""The jobs app's views: a page that follows a job live, and the streams behind it.

``/`` is the page (``examples/job_page.html``, shared with the other web
examples): its "Start a job" button posts to ``/jobs``, which starts a job in
a producer thread and answers its URLs; the page then follows
``/jobs/NAME/events`` (server-sent events) and adds a row per outcome, in
order, as it comes, under a progress bar. ``/jobs/NAME/results.ndjson`` serves the same job as
NDJSON, for scripts. ``/jobs/run`` runs a job inside one request instead.
"""

import uuid
from pathlib import Path

from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    JsonResponse,
    QueryDict,
)
from django.urls import reverse
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_POST, require_safe
from project.celery import app as celery_app

from celery_ordered import OrderedResultStream, StreamNotFound
from celery_ordered.contrib.django import stream_response

from . import work

#: The page, shared by the web examples (examples/job_page.html).
PAGE = Path(__file__).resolve().parents[2] / "job_page.html"


def job_size(params: QueryDict) -> tuple[int, int]:
    """``items`` and ``batch`` of a query or form; ValueError, saying why, if not sensible."""
    try:
        items = int(params.get("items", 40))
        batch = int(params.get("batch", 10))
    except ValueError:
        raise ValueError("items and batch must be whole numbers") from None
    if not (1 <= items <= 10_000 and batch >= 1):
        raise ValueError("items must be 1 to 10000, and batch at least 1")
    return items, batch


def job_stream(name: str) -> OrderedResultStream:
    """The stream of job ``name``; 404 if nobody started it (or it expired)."""
    # create=False: a name nobody started is a 404, in whichever server
    # process the request lands, rather than a new, empty stream.
    try:
        return OrderedResultStream(celery_app, name, create=False)
    except (StreamNotFound, ValueError):  # ValueError: not a valid stream name
        raise Http404(f"no job named {name!r}") from None


@require_safe
@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    """``GET /``: the page, with its "Start a job" form.

    It sets the ``csrftoken`` cookie, whose token the page sends back in the
    ``X-CSRFToken`` header of its ``POST``.
    """
    return HttpResponse(PAGE.read_text(encoding="utf-8"))


@require_POST
def start_job(request: HttpRequest, job: work.Job = work.demo_job) -> HttpResponse:
    """``POST /jobs`` (``items``, ``batch``): start a job; answer its name and URLs.

    The job outlives the request: its producer thread puts its tasks while
    somebody follows its stream, and gives up on it when nobody did for
    ``work.ABANDON_AFTER`` seconds. Follow a job from one place at a time:
    a stream has one consumer position. ``job(items, batch)`` says what a job
    puts (a URLconf can pass another: ``path(..., {"job": my_job})``).
    """
    try:
        items, batch = job_size(request.POST)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc))
    name = f"job-{uuid.uuid4().hex}"
    work.start_job(items, batch, job=job, name=name)
    urls = {
        "events": reverse("job-events", args=[name]),
        "results": reverse("job-results", args=[name]),
    }
    return JsonResponse({"name": name, **urls}, status=201)


@require_safe
def job_events(request: HttpRequest, name: str) -> HttpResponse:
    """``GET /jobs/NAME/events``: the job's outcomes as server-sent events.

    A progress event goes at most every 0.25 s. A reconnecting
    ``EventSource`` sends the id of the last outcome it got
    (``Last-Event-ID``), and the stream resumes after it. It reconnects after
    5 s; by then this response noticed, at a heartbeat, that it was left.
    """
    return stream_response(request, job_stream(name), heartbeat=2.0, retry=5.0, progress=0.25)


@require_safe
def job_results(request: HttpRequest, name: str) -> HttpResponse:
    """``GET /jobs/NAME/results.ndjson``: the job's outcomes as NDJSON (``curl -N``)."""
    return stream_response(request, job_stream(name), "ndjson")


def run_job(request: HttpRequest) -> HttpResponse:
    """``GET /jobs/run?items=40&batch=10&format=ndjson``: run a job, stream it.

    The job lives as long as its response: when the client leaves, its stream
    is closed and the producer stops. This suits ``fetch()`` and scripts
    (``curl -N``); ``format=sse`` works too, but a browser's ``EventSource``
    reconnects by itself, which here would start a new job: the page follows
    a job that outlives the request (``start_job`` and ``job_events``).
    """
    try:
        items, batch = job_size(request.GET)
    except ValueError as exc:
        return HttpResponseBadRequest(str(exc))
    format = request.GET.get("format", "ndjson")
    if format not in ("ndjson", "sse"):
        return HttpResponseBadRequest("format must be ndjson or sse")
    stream = work.start_job(items, batch)
    return stream_response(request, stream, format, after=None, on_disconnect="close")
