"""The Django example's page in a real browser: headless Chromium, Django's threaded
server, real workers.

The page (examples/django_project, ``/``) starts a job with a CSRF-checked
``POST`` and follows it over server-sent events; the tests click its button
and read the rows it adds to the DOM. Django is configured for this process
from the example project's settings, pointed at the tests' Redis, as in
tests/test_django.py.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

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
from tests.support.django_project import configured_project
from tests.support.django_project import project_worker as start_project_worker
from tests.support.workers import Worker

pytestmark = pytest.mark.topology


#: Serves a WSGI application; answers its base URL.
Serve = Callable[[Any], str]


@pytest.fixture(scope="module")
def project(redis_url: str) -> Iterator[Any]:
    """Django set up with the example project's settings; yields its Celery app."""
    with configured_project(redis_url, "django-browser") as celery_app:
        yield celery_app


@pytest.fixture(scope="module")
def project_worker(project: Any, redis_url: str) -> Iterator[Worker]:
    """``celery -A project worker`` as the example's README starts it (plus the tests'
    tasks), on its queue."""
    with start_project_worker(project, redis_url, "--include", "tests.apps.tasks") as worker:
        yield worker


@pytest.fixture
def serve(project: Any) -> Iterator[Serve]:
    """Serve a WSGI application (the project's, or one wrapping it) on a free localhost
    port, from Django's threaded development server in a thread: a thread per request,
    as an event stream holds its request for as long as it runs."""
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    servers: list[ThreadedWSGIServer] = []

    def serve(application: Any) -> str:
        server = ThreadedWSGIServer(("127.0.0.1", 0), WSGIRequestHandler)
        server.set_app(application)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def site(serve: Serve) -> str:
    """The base URL of the example project, as its ``project.wsgi`` serves it."""
    from django.core.wsgi import get_wsgi_application

    return serve(get_wsgi_application())


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium (see tests/support/browsers.py)."""
    with headless_chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def expected_rows(items: int, batch: int) -> list[tuple[str, str]]:
    """The rows of the example's job, top to bottom: each marker after its batch,
    items 13, 26... failing at their places."""
    expected: list[tuple[str, str]] = []
    for item in range(items):
        if item and item % 13 == 0:
            expected.append(("failure", f"ValueError: item {item} is unlucky"))
        else:
            expected.append(("result", str(item)))
        if item % batch == batch - 1 or item == items - 1:
            first = item - item % batch
            expected.append(("marker", f"batch {item // batch} done: items {first}-{item}"))
    return expected


@pytest.mark.usefixtures("project_worker")
def test_the_page_shows_every_outcome_in_submission_order(site: str, browser: Any) -> None:
    # When a job of 30 items in batches of 7 is started from the page
    start_job(browser, site, items=30, batch=7)
    wait_until_done(browser)

    # Then the rows are the job's outcomes in the order put: each marker right
    # after its batch (the last batch is short), items 13 and 26 failed at their places
    expected = expected_rows(30, 7)
    assert rows(browser) == expected
    assert positions(browser) == list(range(len(expected)))
    assert browser.find_element(By.ID, "status").text.endswith(f"done, {len(expected)} rows")


def urlconf(job: Callable[[int, int], Iterator[Any]]) -> ModuleType:
    """A URLconf: the example's URLs, but its jobs are ``job``'s (passed to the view
    as an extra option of its path, as Django does it)."""
    from django.urls import include, path
    from jobs import views

    module = ModuleType("gated_urls")
    module.urlpatterns = [  # type: ignore[attr-defined]
        path("jobs/", views.start_job, {"job": job}, name="start-job"),
        path("", include("jobs.urls")),
    ]
    return module


@pytest.mark.usefixtures("project_worker")
def test_rows_appear_while_the_job_is_still_running(
    site: str, browser: Any, redis_url: str, redis_client: redis.Redis, gate_key: str
) -> None:
    from django.test import override_settings
    from jobs.tasks import process

    # Given a job whose fourth entry waits until the test opens its gate
    key = gate_key

    def gated_job(items: int, batch: int) -> Iterator[Any]:
        yield process.s(0, 0.0)
        yield process.s(1, 0.2)
        yield {"marker": "before the gate"}
        yield gate.s(redis_url, key, {"item": 2, "seconds": 0.0, "worker": 0}, DEADLINE)
        yield process.s(3, 0.0)
        yield {"marker": "after the gate"}

    with override_settings(ROOT_URLCONF=urlconf(gated_job)):
        start_job(browser, site)

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
    assert positions(browser) == list(range(6))


@pytest.mark.usefixtures("project_worker")
def test_a_dropped_connection_resumes_where_it_broke(serve: Serve, browser: Any) -> None:
    from django.core.wsgi import get_wsgi_application

    # Given a server whose first event stream breaks after 4 events
    cutter = CutFirstEventStream(get_wsgi_application(), events=4)

    # When a job runs to its end
    start_job(browser, serve(cutter), items=8, batch=4)
    wait_until_done(browser)

    # Then the browser reconnected by itself, saying which event it had last,
    # and the page shows every outcome exactly once, in order
    assert cutter.last_event_ids == [None, "3"]
    assert rows(browser) == expected_rows(8, 4)
    assert positions(browser) == list(range(10))


def status(url: str, data: bytes | None = None) -> int:
    """The HTTP status of a GET (or, with ``data``, a form POST) to ``url``."""
    try:
        with urllib.request.urlopen(url, data, timeout=DEADLINE) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_job_nobody_started_is_not_found(site: str) -> None:
    for name in (f"job-{uuid.uuid4().hex}", "not%20a%20stream%20name"):
        assert status(f"{site}jobs/{name}/events") == 404
        assert status(f"{site}jobs/{name}/results.ndjson") == 404


def test_starting_a_job_without_the_pages_csrf_token_is_forbidden(site: str) -> None:
    assert status(f"{site}jobs/", b"items=3&batch=3") == 403
