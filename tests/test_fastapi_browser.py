"""The FastAPI example in a real browser: headless Chromium, uvicorn, real workers.

The page (examples/job_page.html, served by examples/fastapi_app under
uvicorn, a subprocess) starts a job, which an asyncio task puts into an
``AsyncOrderedResultStream``, and follows it over server-sent events read
with ``await``; the tests click its button and read the rows and the
progress bar it shows.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.browsers import (
    DEADLINE,
    check_a_job_resumed_after_a_dropped_connection,
    check_the_page_follows_a_gated_job,
    check_the_page_shows_a_whole_job,
    headless_chromium,
    start_job,
)
from tests.support.fastapi_example import served
from tests.support.web_examples import environment, running_example

pytestmark = pytest.mark.topology


@pytest.fixture(scope="module")
def example(redis_url: str) -> Iterator[Any]:
    """The example, on the tests' Redis and a queue of its own, with its worker running."""
    with running_example("fastapi_app", redis_url) as example:
        yield example


@pytest.fixture(scope="module")
def env(example: Any, redis_url: str) -> dict[str, str]:
    """The environment of the example's server: the tests' Redis, and the example's queue."""
    return environment(example, redis_url)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium (see tests/support/browsers.py)."""
    with headless_chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def test_the_page_shows_every_outcome_in_submission_order(
    env: dict[str, str], browser: Any
) -> None:
    # A job of 30 items in batches of 7: each marker right after its batch
    # (the last batch is short), items 13 and 26 failed at their places
    with served("example", env) as site:
        check_the_page_shows_a_whole_job(browser, site, items=30, batch=7)


def test_rows_and_the_progress_bar_move_while_the_job_is_still_running(
    env: dict[str, str], browser: Any, redis_client: redis.Redis, gate_key: str, tmp_path: Path
) -> None:
    # Given the example whose job's fourth entry (item 2) waits for the test's gate
    with served("gated", {**env, "CO_GATE_KEY": gate_key}) as site:
        # When it is started from the page, it shows its rows and progress as it goes
        start_job(browser, site)
        check_the_page_follows_a_gated_job(browser, redis_client, gate_key, f"{tmp_path}/fastapi")


def test_a_dropped_connection_resumes_where_it_broke(
    env: dict[str, str], browser: Any, redis_client: redis.Redis
) -> None:
    # Given a server whose first event stream breaks after 4 events, and
    # records the Last-Event-ID of each event stream request
    record = f"test-last-event-ids-{uuid.uuid4().hex}"

    def last_event_ids() -> list[str | None]:
        return [None if i == b"-" else i.decode() for i in redis_client.lrange(record, 0, -1)]

    # When a job runs to its end, it resumes where it broke
    try:
        with served("cut", {**env, "CO_LAST_EVENT_IDS": record}) as site:
            check_a_job_resumed_after_a_dropped_connection(browser, site, last_event_ids)
    finally:
        redis_client.delete(record)


def status(url: str) -> int:
    """The HTTP status of a GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_job_nobody_started_is_not_found(env: dict[str, str]) -> None:
    with served("example", env) as site:
        for name in (f"job-{uuid.uuid4().hex}", "not%20a%20stream%20name"):
            assert status(f"{site}jobs/{name}/events") == 404
            assert status(f"{site}jobs/{name}/results.ndjson") == 404
