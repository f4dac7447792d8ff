"""The Django example's page in a real browser: headless Chromium, Django's threaded
server, real workers.

The page (examples/job_page.html, served at ``/`` by examples/django_project)
starts a job with a CSRF-checked ``POST`` and follows it over server-sent
events; the tests click its button and read the rows and the progress bar it
shows. Django is configured for this process
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

from tests.support.browsers import (
    DEADLINE,
    CutFirstEventStream,
    check_a_job_resumed_after_a_dropped_connection,
    check_the_page_follows_a_gated_job,
    check_the_page_shows_a_whole_job,
    gated_job,
    headless_chromium,
    start_job,
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


def django_marker(batch: int, first: int, last: int) -> str:
    """The marker after a batch of the Django example's job (jobs/work.py)."""
    return f"batch {batch} done: items {first}-{last}"


@pytest.mark.usefixtures("project_worker")
def test_the_page_shows_every_outcome_in_submission_order(site: str, browser: Any) -> None:
    # A job of 30 items in batches of 7: each marker right after its batch
    # (the last batch is short), items 13 and 26 failed at their places
    check_the_page_shows_a_whole_job(browser, site, items=30, batch=7, marker=django_marker)


def urlconf(job: Callable[[int, int], Iterator[Any]]) -> ModuleType:
    """A URLconf: the example's URLs, but its jobs are ``job``'s (passed to the view
    as an extra option of its path, as Django does it)."""
    from django.urls import include, path
    from jobs import views

    module = ModuleType("gated_urls")
    module.urlpatterns = [  # type: ignore[attr-defined]
        path("jobs", views.start_job, {"job": job}, name="start-job"),
        path("", include("jobs.urls")),
    ]
    return module


@pytest.mark.usefixtures("project_worker")
def test_rows_and_the_progress_bar_move_while_the_job_is_still_running(
    site: str,
    browser: Any,
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
    tmp_path: Path,
) -> None:
    from django.test import override_settings
    from jobs.tasks import process

    # Given a job whose fourth entry (item 2) waits until the test opens its gate
    job = gated_job(process, redis_url, gate_key)

    # When it is started from the page, it shows its rows and progress as it goes
    with override_settings(ROOT_URLCONF=urlconf(job)):
        start_job(browser, site)
        check_the_page_follows_a_gated_job(browser, redis_client, gate_key, f"{tmp_path}/django")


@pytest.mark.usefixtures("project_worker")
def test_a_dropped_connection_resumes_where_it_broke(serve: Serve, browser: Any) -> None:
    from django.core.wsgi import get_wsgi_application

    # Given a server whose first event stream breaks after 4 events
    cutter = CutFirstEventStream(get_wsgi_application(), events=4)

    # When a job runs to its end, it resumes where it broke
    check_a_job_resumed_after_a_dropped_connection(
        browser, serve(cutter), lambda: cutter.last_event_ids, django_marker
    )


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
    assert status(f"{site}jobs", b"items=3&batch=3") == 403
