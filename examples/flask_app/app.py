"""A Flask page that runs a Celery job and shows its outcomes live, in order.

Press "Start a job": the server puts the job's tasks (uneven work, from
``examples/web_job.py``) into a named stream, with a "batch k done" marker
after each batch, from a producer thread. The page (``examples/job_page.html``,
shared with the other web examples) follows the stream over server-sent
events: it adds a row per outcome as soon as it, and everything before it,
is done, and shows a progress bar with the rate and what the job waits on
when it waits. Items 13, 26... fail on purpose: each error shows at its
place and the job goes on.

Zero setup (a private Redis and local worker processes), from the
repository root, then open http://127.0.0.1:5000:

    python -m examples.flask_app.app

On a Redis of your own, with workers you start (``BROKER_URL`` picks another
broker; default: that Redis):

    export REDIS_URL=redis://127.0.0.1:6379/0
    celery -A examples.flask_app.app:celery_app worker --loglevel=INFO    # terminal 1
    python -m examples.flask_app.app                                      # terminal 2

For scripts: ``curl -X POST localhost:5000/jobs -d items=20`` starts a job
and answers its URLs; ``curl -N localhost:5000/jobs/NAME/results.ndjson``
streams it as NDJSON. Follow a job from one place at a time: a stream has one
consumer position.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery
from flask import Flask, abort, request, url_for

from celery_ordered import OrderedResultStream, StreamClosedError, StreamFull, StreamNotFound
from celery_ordered.contrib.flask import stream_response
from examples.web_job import ABANDON_AFTER, PAGE, WINDOW, Job, demo_job

REDIS_URL = os.environ.get("REDIS_URL")
BROKER_URL = os.environ.get("BROKER_URL", REDIS_URL)

celery_app = Celery("flask_app", broker=BROKER_URL)
celery_app.conf.ordered_redis_url = REDIS_URL
celery_app.conf.ordered_stream_ttl = 3600  # a job's stream is gone an hour after its last use

logger = logging.getLogger(__name__)


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
    """The web app; ``job(items, batch)`` says what a job puts."""
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
        return PAGE.read_text(encoding="utf-8")

    @app.post("/jobs")
    def start_job() -> tuple[dict[str, str], int]:
        items, batch = form_int("items", 40), form_int("batch", 10)
        if not (1 <= items <= 10_000 and batch >= 1):
            abort(400, "items must be 1 to 10000, and batch at least 1")
        name = f"job-{uuid.uuid4().hex}"
        stream = OrderedResultStream(celery_app, name, window=WINDOW)
        threading.Thread(
            target=produce, args=(stream, job(items, batch)), name=name, daemon=True
        ).start()
        urls = {
            "events": url_for("job_events", name=name),
            "results": url_for("job_results", name=name),
        }
        return {"name": name, **urls}, 201

    @app.get("/jobs/<name>/events")
    def job_events(name: str) -> Any:
        # Server-sent events, with a progress event at most every 0.25 s; a
        # reconnecting EventSource resumes after the last outcome it got (its
        # Last-Event-ID). It reconnects after 5 s, when this response has
        # noticed (at a heartbeat) that it was left.
        return stream_response(job_stream(name), heartbeat=2.0, retry=5.0, progress=0.25)

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
