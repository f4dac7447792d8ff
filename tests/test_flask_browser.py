"""The Flask example in a real browser: headless Chromium, a real server, real workers.

The page (examples/flask_app) starts a job and follows it over server-sent
events; the tests click its button and read the rows it adds to the DOM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from celery_ordered import OrderedResultStream
from tests.conftest import ROOT, require_tool
from tests.tasks import gate

pytestmark = pytest.mark.topology

#: Longest wait for the page to reach a state, in seconds (a deadline, not a pause).
DEADLINE = 90


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
def example_worker(example: Any, redis_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """The worker the example's docstring starts (plus the tests' tasks), on its queue."""
    log = Path(tempfile.mkstemp(prefix="co-flask-worker-", suffix=".log")[1])
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "C_FORCE_ROOT": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "examples.flask_app.app:celery_app", "worker",
         "-Q", example.celery_app.conf.task_default_queue, "--include", "tests.tasks",
         "--concurrency=3", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        stream = OrderedResultStream(example.celery_app)
        try:
            stream.put(example.process, 0, 0.0)
            assert stream.get(timeout=60)["item"] == 0
        except Exception as exc:
            raise RuntimeError(f"the example's worker did not answer:\n{log.read_text()}") from exc
        finally:
            stream.delete()
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.unlink()


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
    """Headless Debian Chromium, driven through the system's chromedriver."""
    chromium = require_tool("chromium", "the browser end-to-end tests drive Chromium")
    chromedriver = require_tool("chromedriver", "Selenium drives Chromium through it")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-proxy-server", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never downloads anything.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: Any) -> list[tuple[str, str]]:
    """The page's rows: (kind, item number) for results, (kind, text) otherwise."""
    found = driver.find_elements(By.CSS_SELECTOR, "#rows li")
    return [
        (row.get_attribute("data-kind"), row.get_attribute("data-item") or row.text)
        for row in found
    ]


def positions(driver: Any) -> list[int]:
    found = driver.find_elements(By.CSS_SELECTOR, "#rows li")
    return [int(row.get_attribute("data-position")) for row in found]


def state(driver: Any) -> str:
    return str(driver.find_element(By.ID, "status").get_attribute("data-state"))


def start_job(driver: Any, url: str, tasks: int, batch: int) -> None:
    driver.get(url)
    for name, value in (("tasks", tasks), ("batch", batch)):
        field = driver.find_element(By.NAME, name)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "start-button").click()


def wait_until_done(driver: Any) -> None:
    WebDriverWait(driver, DEADLINE).until(lambda d: state(d) in ("done", "failed"))
    assert state(driver) == "done", driver.find_element(By.ID, "status").text


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
) -> None:
    # Given a job whose fourth entry waits until the test opens its gate
    key = f"test-gate-{uuid.uuid4().hex}"

    def gated_job(tasks: int, batch: int) -> Iterator[Any]:
        yield example.process.s(0, 0.0)
        yield example.process.s(1, 0.2)
        yield {"marker": "before the gate"}
        yield gate.s(redis_url, key, {"item": 2, "seconds": 0.0, "worker": 0})
        yield example.process.s(3, 0.0)
        yield {"marker": "after the gate"}

    try:
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
    finally:
        redis_client.rpush(key, 1)  # never leave a worker waiting
        redis_client.expire(key, 60)


class CutFirstEventStream:
    """WSGI middleware: ends the first event stream after ``events`` events, as a dropped
    connection would; records the ``Last-Event-ID`` of every event-stream request."""

    def __init__(self, wsgi_app: Any, events: int) -> None:
        self.wsgi_app = wsgi_app
        self.events = events
        self.last_event_ids: list[str | None] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = self.wsgi_app(environ, start_response)
        if not environ["PATH_INFO"].endswith("/events"):
            return body
        self.last_event_ids.append(environ.get("HTTP_LAST_EVENT_ID"))
        return self.cut(body) if len(self.last_event_ids) == 1 else body

    def cut(self, body: Any) -> Iterator[bytes]:
        sent = 0
        try:
            for chunk in body:
                yield chunk
                sent += chunk.startswith(b"id: ")
                if sent == self.events:
                    return
        finally:
            body.close()


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
