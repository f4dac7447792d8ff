"""A Flask page that runs a Celery job and shows its outcomes live, in order.

Press "Start a job": the server puts the job's tasks (uneven work) into a
named stream, with a "batch k done" marker after each batch, from a producer
thread. The page follows the stream over server-sent events and adds a row
per outcome as soon as it, and everything before it, is done. Items 13, 26...
fail on purpose: each error shows at its place and the job goes on.

Zero setup (a private Redis and local worker processes), from the
repository root, then open http://127.0.0.1:5000:

    python -m examples.flask_app.app

On a Redis of your own, with workers you start (``BROKER_URL`` picks another
broker; default: that Redis):

    export REDIS_URL=redis://127.0.0.1:6379/0
    celery -A examples.flask_app.app:celery_app worker --loglevel=INFO    # terminal 1
    python -m examples.flask_app.app                                      # terminal 2

For scripts: ``curl -X POST localhost:5000/jobs -d tasks=20`` starts a job
and answers its URLs; ``curl -N localhost:5000/jobs/NAME/results.ndjson``
streams it as NDJSON. Follow a job from one place at a time: a stream has one
consumer position.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery import Celery
from flask import Flask, abort, render_template, request, url_for

from celery_ordered import (
    OrderedResultStream,
    StreamClosedError,
    StreamFull,
    StreamNotFound,
    ordered_task,
)
from celery_ordered.contrib.flask import stream_response

REDIS_URL = os.environ.get("REDIS_URL")
BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)

celery_app = Celery("flask_app", broker=BROKER_URL)
celery_app.conf.ordered_redis_url = REDIS_URL
celery_app.conf.ordered_stream_ttl = 3600  # a job's stream is gone an hour after its last use

#: How many tasks a job runs ahead of the page that follows it.
WINDOW = 16
#: A job nobody follows for this long is abandoned: its producer stops.
ABANDON_AFTER = 600.0

logger = logging.getLogger(__name__)

Job = Callable[[int, int], Iterable[Any]]


@ordered_task(name="flask_app.process")
def process(item: int, seconds: float) -> dict[str, Any]:
    """One item of work: uneven, so later items often finish first."""
    time.sleep(seconds)
    if item and item % 13 == 0:
        raise ValueError(f"item {item} is unlucky")
    return {"item": item, "seconds": seconds, "worker": os.getpid()}


def demo_job(tasks: int, batch: int) -> Iterator[Any]:
    """What a job puts, in order: its tasks, and a marker after each batch."""
    for item in range(tasks):
        yield process.s(item, random.choice([0.01, 0.05, 0.1, 0.4]))
        if item % batch == batch - 1 or item == tasks - 1:
            yield {"marker": f"batch {item // batch} done"}


def produce(stream: OrderedResultStream, work: Iterable[Any]) -> None:
    """Put everything ``work`` yields, then close the stream (a producer thread)."""
    try:
        with stream:  # closes the stream when the work is all put
            for entry in work:
                stream.put(entry, timeout=ABANDON_AFTER)  # a task, or a marker
    except StreamFull:
        logger.warning("nobody followed job %s for %.0fs: abandoned", stream.name, ABANDON_AFTER)
        stream.delete()
    except StreamClosedError:
        pass  # closed from elsewhere: nothing more to put


def form_int(field: str, default: int) -> int:
    """An integer field of the posted form (400 if it is not one)."""
    raw = request.form.get(field, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        abort(400, f"{field} must be a whole number, got {raw!r}")


def create_app(job: Job = demo_job) -> Flask:
    """The web app; ``job(tasks, batch)`` says what a job puts."""
    app = Flask(__name__)

    def job_stream(name: str) -> OrderedResultStream:
        # create=False: a name nobody started (or long expired) is a 404, in
        # whichever server process the request lands.
        try:
            return OrderedResultStream(celery_app, name, create=False)
        except (StreamNotFound, ValueError):  # ValueError: not a valid stream name
            abort(404, f"no job named {name!r}")

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.post("/jobs")
    def start_job() -> tuple[dict[str, str], int]:
        tasks, batch = form_int("tasks", 40), form_int("batch", 10)
        if not (1 <= tasks <= 10_000 and batch >= 1):
            abort(400, "tasks must be 1 to 10000, and batch at least 1")
        name = f"job-{uuid.uuid4().hex}"
        stream = OrderedResultStream(celery_app, name, window=WINDOW)
        threading.Thread(
            target=produce, args=(stream, job(tasks, batch)), name=name, daemon=True
        ).start()
        urls = {
            "events": url_for("job_events", name=name),
            "results": url_for("job_results", name=name),
        }
        return {"name": name, **urls}, 201

    @app.get("/jobs/<name>/events")
    def job_events(name: str) -> Any:
        # Server-sent events; a reconnecting EventSource resumes after the
        # last event it got (its Last-Event-ID). It reconnects after 5 s,
        # when this response has noticed (at a heartbeat) that it was left.
        return stream_response(job_stream(name), heartbeat=2.0, retry=5.0)

    @app.get("/jobs/<name>/results.ndjson")
    def job_results(name: str) -> Any:
        return stream_response(job_stream(name), "ndjson")

    return app


app = create_app()


def main() -> None:
    """Serve the app; with no REDIS_URL, on a private Redis and local workers."""
    if REDIS_URL:
        app.run(threaded=True)
        return
    from celery_ordered import local_cluster

    print("No REDIS_URL: starting a private Redis and local Celery workers...")
    with local_cluster(app=celery_app):
        app.run(threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
