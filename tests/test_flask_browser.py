"""The Flask example in a real browser: headless Chromium, a real server, real workers.

The page (examples/flask_app) starts a job and follows it over server-sent
events; the tests click its button and read the rows it adds to the DOM.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from tests.apps.tasks import gate
from tests.support.browsers import (
    DEADLINE,
    CutFirstEventStream,
    headless_chromium,
    positions,
    rows,
    start_job,
    state,
    wait_until_done,
)
from tests.support.workers import Worker
from tests.support.workers import example_worker as start_example_worker

pytestmark = pytest.mark.topology


@pytest.fixture(scope="module")
def example(redis_url: str) -> Iterator[Any]:
    """The example module, its Celery app pointed at the tests' Redis and a queue of its own."""
    from celery import current_app

    previous_app = current_app._get_current_object()
    from examples.flask_app import app as example

    conf = example.celery_app.conf
    saved = {key: conf.get(key) for key in ("broker_url", "ordered_redis_url")}
    saved["task_default_queue"] = conf.task_default_queue
    conf.update(
        broker_url=os.environ["CO_TEST_BROKER_URL"],
        ordered_redis_url=redis_url,
        task_default_queue=f"flask-example-{uuid.uuid4().hex[:8]}",
    )
    yield example
    conf.update(saved)
    previous_app.set_current()  # importing the example made its Celery app the current one


@pytest.fixture(scope="module")
def example_worker(example: Any, redis_url: str) -> Iterator[Worker]:
    """The worker the example's docstring starts (plus the tests' tasks), on its queue."""
    env = {**os.environ, "REDIS_URL": redis_url, "BROKER_URL": os.environ["CO_TEST_BROKER_URL"]}
    with start_example_worker(
        "examples.flask_app.app:celery_app", example.celery_app, example.process,
        "--include", "tests.apps.tasks", env=env,
    ) as worker:  # fmt: skip
        yield worker


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


@pytest.mark.usefixtures("example_worker")
def test_the_page_shows_every_outcome_in_submission_order(
    example: Any, serve: Callable[[Flask], str], browser: Any
) -> None:
    # When a job of 20 tasks in batches of 5 is started from the page
    start_job(browser, serve(example.create_app()), tasks=20, batch=5)
    wait_until_done(browser)

    # Then the rows are the job's outcomes in the order put: each marker
    # right after its batch, item 13's error at its own place
    expected: list[tuple[str, str]] = []
    for item in range(20):
        if item == 13:
            expected.append(("failure", "ValueError: item 13 is unlucky"))
        else:
            expected.append(("result", str(item)))
        if item % 5 == 4:
            expected.append(("marker", f"batch {item // 5} done"))
    assert rows(browser) == expected
    assert positions(browser) == list(range(len(expected)))
    status = browser.find_element(By.ID, "status").text
    assert status.endswith(f"done, {len(expected)} rows")


@pytest.mark.usefixtures("example_worker")
def test_rows_appear_while_the_job_is_still_running(
    example: Any,
    serve: Callable[[Flask], str],
    browser: Any,
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    # Given a job whose fourth entry waits until the test opens its gate
    key = gate_key

    def gated_job(tasks: int, batch: int) -> Iterator[Any]:
        yield example.process.s(0, 0.0)
        yield example.process.s(1, 0.2)
        yield {"marker": "before the gate"}
        yield gate.s(redis_url, key, {"item": 2, "seconds": 0.0, "worker": 0})
        yield example.process.s(3, 0.0)
        yield {"marker": "after the gate"}

    start_job(browser, serve(example.create_app(job=gated_job)), tasks=1, batch=1)

    # When the first three rows are on the page
    WebDriverWait(browser, DEADLINE).until(lambda d: len(rows(d)) >= 3)

    # Then they arrived while the job could not have finished: the gate is shut
    assert redis_client.llen(key) == 0
    assert rows(browser) == [
        ("result", "0"),
        ("result", "1"),
        ("marker", "before the gate"),
    ]
    assert state(browser) == "running"

    # And once the gate opens, the rest follows in order
    redis_client.rpush(key, 1)
    wait_until_done(browser)
    assert rows(browser) == [
        ("result", "0"),
        ("result", "1"),
        ("marker", "before the gate"),
        ("result", "2"),
        ("result", "3"),
        ("marker", "after the gate"),
    ]


@pytest.mark.usefixtures("example_worker")
def test_a_dropped_connection_resumes_where_it_broke(
    example: Any, serve: Callable[[Flask], str], browser: Any
) -> None:
    # Given a server whose first event stream breaks after 4 events
    flask_app = example.create_app()
    cutter = CutFirstEventStream(flask_app.wsgi_app, events=4)
    flask_app.wsgi_app = cutter

    # When a job runs to its end
    start_job(browser, serve(flask_app), tasks=8, batch=4)
    wait_until_done(browser)

    # Then the browser reconnected by itself, saying which event it had last,
    # and the page shows every outcome exactly once, in order
    assert cutter.last_event_ids == [None, "3"]
    assert rows(browser) == [
        *(("result", str(item)) for item in range(4)),
        ("marker", "batch 0 done"),
        *(("result", str(item)) for item in range(4, 8)),
        ("marker", "batch 1 done"),
    ]
    assert positions(browser) == list(range(10))


def test_a_job_nobody_started_is_not_found(example: Any) -> None:
    client = example.create_app().test_client()
    for name in (f"job-{uuid.uuid4().hex}", "not a stream name"):
        assert client.get(f"/jobs/{name}/events").status_code == 404
        assert client.get(f"/jobs/{name}/results.ndjson").status_code == 404
