"""The Flask example in a real browser: headless Chromium, a real server, real workers.

The page (examples/job_page.html, served by examples/flask_app) starts a job
and follows it over server-sent events; the tests click its button and read
the rows and the progress bar it shows.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.serving import make_server

from examples.web_job import process
from tests.support.browsers import (
    CutFirstEventStream,
    check_a_job_resumed_after_a_dropped_connection,
    check_the_page_follows_a_gated_job,
    check_the_page_shows_a_whole_job,
    gated_job,
    headless_chromium,
    start_job,
)
from tests.support.web_examples import running_example

pytestmark = pytest.mark.topology


@pytest.fixture(scope="module")
def example(redis_url: str) -> Iterator[Any]:
    """The example, on the tests' Redis and a queue of its own, with its worker running."""
    with running_example("flask_app", redis_url) as example:
        yield example


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], str]]:
    """Serve a Flask app on a free localhost port from a real server thread."""
    servers: list[Any] = []

    def serve(flask_app: Flask) -> str:
        server = make_server("127.0.0.1", 0, flask_app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium (see tests/support/browsers.py)."""
    with headless_chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def test_the_page_shows_every_outcome_in_submission_order(
    example: Any, serve: Callable[[Flask], str], browser: Any
) -> None:
    # A job of 20 items in batches of 5: each marker right after its batch,
    # item 13's error at its own place
    check_the_page_shows_a_whole_job(browser, serve(example.create_app()), items=20, batch=5)


def test_rows_and_the_progress_bar_move_while_the_job_is_still_running(
    example: Any,
    serve: Callable[[Flask], str],
    browser: Any,
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
    tmp_path: Path,
) -> None:
    # Given a job whose fourth entry (item 2) waits until the test opens its gate
    job = gated_job(process, redis_url, gate_key)

    # When it is started from the page, it shows its rows and progress as it goes
    start_job(browser, serve(example.create_app(job=job)), items=1, batch=1)
    check_the_page_follows_a_gated_job(browser, redis_client, gate_key, f"{tmp_path}/flask")


def test_a_dropped_connection_resumes_where_it_broke(
    example: Any, serve: Callable[[Flask], str], browser: Any
) -> None:
    # Given a server whose first event stream breaks after 4 events
    flask_app = example.create_app()
    cutter = CutFirstEventStream(flask_app.wsgi_app, events=4)
    flask_app.wsgi_app = cutter

    # When a job runs to its end, it resumes where it broke
    check_a_job_resumed_after_a_dropped_connection(
        browser, serve(flask_app), lambda: cutter.last_event_ids
    )


def test_a_job_nobody_started_is_not_found(example: Any) -> None:
    client = example.create_app().test_client()
    for name in (f"job-{uuid.uuid4().hex}", "not a stream name"):
        assert client.get(f"/jobs/{name}/events").status_code == 404
        assert client.get(f"/jobs/{name}/results.ndjson").status_code == 404
