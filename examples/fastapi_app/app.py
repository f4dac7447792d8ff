"""A FastAPI page that runs a Celery job and shows its outcomes live, in order, on asyncio.

Press "Start a job": the server puts the job's tasks (uneven work, from
``examples/web_job.py``) into a named ``AsyncOrderedResultStream``, with a
"batch k done" marker after each batch, from an asyncio task: ``await
stream.put(...)`` waits for window space without holding the event loop.
The page (``examples/job_page.html``, shared with the other web examples)
follows the stream over server-sent events: a row per outcome as soon as it,
and everything before it, is done, and a progress bar with the rate and what
the job waits on when it waits. Items 13, 26... fail on purpose: each error
shows at its place and the job goes on. The events are read with ``await``
too: one event loop follows every open page, with no thread per page.

Zero setup (a private Redis and local worker processes), from the
repository root, then open http://127.0.0.1:8000:

    python -m examples.fastapi_app.app

On a Redis of your own, with workers you start (``BROKER_URL`` picks another
broker, default: that Redis; ``QUEUE`` the queue, default ``celery``):

    export REDIS_URL=redis://127.0.0.1:6379/0
    celery -A examples.fastapi_app.app:celery_app worker --loglevel=INFO    # terminal 1
    uvicorn examples.fastapi_app.app:app                                    # terminal 2

For scripts: ``curl -X POST localhost:8000/jobs -d items=20`` starts a job
and answers its URLs; ``curl -N localhost:8000/jobs/NAME/results.ndjson``
streams it as NDJSON. Follow a job from one place at a time: a stream has one
consumer position.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import parse_qs

from celery import Celery
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from celery_ordered import (
    AsyncOrderedResultStream,
    StreamClosedError,
    StreamFull,
    StreamNotFound,
)
from celery_ordered.contrib.fastapi import stream_response
from examples.web_job import ABANDON_AFTER, PAGE, WINDOW, Job, demo_job

REDIS_URL = os.environ.get("REDIS_URL")
BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)

celery_app = Celery("fastapi_app", broker=BROKER_URL)
celery_app.conf.task_default_queue = os.environ.get("QUEUE", "celery")
celery_app.conf.ordered_redis_url = REDIS_URL
celery_app.conf.ordered_stream_ttl = 3600  # a job's stream is gone an hour after its last use

logger = logging.getLogger(__name__)


async def produce(stream: AsyncOrderedResultStream, work: Iterable[Any]) -> None:
    """Put everything ``work`` yields, then close the stream (an asyncio task)."""
    try:
        async with stream:  # closes the stream when the work is all put
            for entry in work:
                await stream.put(entry, timeout=ABANDON_AFTER)  # a task, or a marker
    except StreamFull:
        logger.warning("nobody followed job %s for %.0fs: abandoned", stream.name, ABANDON_AFTER)
        await stream.delete()
    except StreamClosedError:
        pass  # closed from elsewhere: nothing more to put


async def form_int(request: Request, field: str, default: int) -> int:
    """An integer field of the posted form (400 if it is not one).

    The page posts its form URL-encoded; FastAPI's ``Form()`` would need the
    python-multipart package for that, so the body is parsed here.
    """
    fields = parse_qs((await request.body()).decode("utf-8", "replace"))
    raw = (fields.get(field) or [""])[0].strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise HTTPException(400, f"{field} must be a whole number, got {raw!r}") from None


@contextlib.asynccontextmanager
async def needs_redis(_: FastAPI) -> AsyncIterator[None]:
    """Refuse to start without a Redis for the streams, rather than fail every job."""
    if not celery_app.conf.ordered_redis_url:
        raise RuntimeError(
            "No REDIS_URL: run `python -m examples.fastapi_app.app` for the zero-setup "
            "default (a private Redis and local workers), or export REDIS_URL and start "
            "a worker (celery -A examples.fastapi_app.app:celery_app worker)"
        )
    yield


def create_app(job: Job = demo_job) -> FastAPI:
    """The web app; ``job(items, batch)`` says what a job puts."""
    app = FastAPI(title="celery-ordered: a job, live and in order", lifespan=needs_redis)
    # The running producers: asyncio keeps only a weak reference to a task.
    producers: set[asyncio.Task[None]] = set()

    async def job_stream(name: str) -> AsyncOrderedResultStream:
        # create=False: a name nobody started (or long expired) is a 404, in
        # whichever server process the request lands.
        try:
            stream = AsyncOrderedResultStream(celery_app, name, create=False)
            await stream.open()
        except (StreamNotFound, ValueError):  # ValueError: not a valid stream name
            raise HTTPException(404, f"no job named {name!r}") from None
        return stream

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.post("/jobs", status_code=201)
    async def start_job(request: Request) -> dict[str, str]:
        items, batch = await form_int(request, "items", 40), await form_int(request, "batch", 10)
        if not (1 <= items <= 10_000 and batch >= 1):
            raise HTTPException(400, "items must be 1 to 10000, and batch at least 1")
        name = f"job-{uuid.uuid4().hex}"
        stream = AsyncOrderedResultStream(celery_app, name, window=WINDOW)
        await stream.open()  # the stream exists before its URLs are answered
        producer = asyncio.create_task(produce(stream, job(items, batch)), name=name)
        producers.add(producer)
        producer.add_done_callback(producers.discard)
        return {
            "name": name,
            "events": app.url_path_for("job_events", name=name),
            "results": app.url_path_for("job_results", name=name),
        }

    @app.get("/jobs/{name}/events")
    async def job_events(name: str, request: Request) -> StreamingResponse:
        # Server-sent events, with a progress event at most every 0.25 s; a
        # reconnecting EventSource resumes after the last outcome it got (its
        # Last-Event-ID). A client that leaves cancels the response at once:
        # the stream acknowledges what it was sent and is handed on.
        stream = await job_stream(name)
        return stream_response(request, stream, heartbeat=2.0, retry=5.0, progress=0.25)

    @app.get("/jobs/{name}/results.ndjson")
    async def job_results(name: str, request: Request) -> StreamingResponse:
        return stream_response(request, await job_stream(name), "ndjson")

    return app


app = create_app()


def main() -> None:
    """Serve the app with uvicorn; with no REDIS_URL, on a private Redis and local workers."""
    import uvicorn

    if REDIS_URL:
        uvicorn.run(app, host="127.0.0.1", port=8000)
        return
    from celery_ordered import local_cluster

    print("No REDIS_URL: starting a private Redis and local Celery workers...")
    with local_cluster(app=celery_app):
        uvicorn.run(app, host="127.0.0.1", port=8000)


if __name__ == "__main__":
    main()
