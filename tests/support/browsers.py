"""Driving the web examples' page in headless Chromium, shared by their browser tests.

The examples (flask_app, django_project, fastapi_app) serve one page,
examples/job_page.html: a form whose ``#start-button`` starts a job, a
``#status`` line whose ``data-state`` is ``idle``, ``running``, ``done`` or
``failed``, a ``#bar`` (a ``<progress>``: ``value`` of ``max``, with
``data-total`` once the total is known) with its ``#counts`` text and a
``#waiting`` line (``data-position``: the position the stream waits on), and
one ``#rows li`` per outcome with ``data-kind``, ``data-position`` and, for a
task's row (a result or a failure), ``data-item``: its number in the job.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.apps.tasks import gate
from tests.support.tools import require_tool

#: Longest wait for the page to reach a state, in seconds (a deadline, not a pause).
DEADLINE = 90


@contextmanager
def headless_chromium(profile: Path) -> Iterator[Any]:
    """Headless Debian Chromium, driven through the system's chromedriver.

    ``profile`` is the browser's (new, private) user data directory. Skips the
    test when chromium or chromedriver is missing (fails under CO_REQUIRE_TOOLS=1).
    """
    chromium = require_tool("chromium", "the browser end-to-end tests drive Chromium")
    chromedriver = require_tool("chromedriver", "Selenium drives Chromium through it")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-proxy-server", "--window-size=1000,1000", f"--user-data-dir={profile}",
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
    kinds = [row.get_attribute("data-kind") for row in found]
    return [
        (kind, row.get_attribute("data-item") if kind == "result" else row.text)
        for kind, row in zip(kinds, found, strict=True)
    ]


def numbers(driver: Any) -> list[int | None]:
    """The number the list shows on each row: a task's item number; None for a marker."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "return [...document.querySelectorAll('#rows li')].map("
        "  (li) => getComputedStyle(li).listStyleType === 'none' ? null : li.value)"
    )


def positions(driver: Any) -> list[int]:
    """The stream position of each row, top to bottom."""
    found = driver.find_elements(By.CSS_SELECTOR, "#rows li")
    return [int(row.get_attribute("data-position")) for row in found]


def web_job_marker(batch: int, first: int, last: int) -> str:
    """The marker after batch ``batch`` (items ``first`` to ``last``) of examples/web_job.py."""
    return f"batch {batch} done"


def expected_rows(
    items: int, batch: int, marker: Callable[[int, int, int], str] = web_job_marker
) -> list[tuple[str, str]]:
    """The rows of an example's job, top to bottom: each marker (``marker(batch, first
    item, last item)``) after its batch, items 13, 26... failing at their places."""
    expected: list[tuple[str, str]] = []
    for item in range(items):
        if item and item % 13 == 0:
            expected.append(("failure", f"ValueError: item {item} is unlucky"))
        else:
            expected.append(("result", str(item)))
        if item % batch == batch - 1 or item == items - 1:
            expected.append(("marker", marker(item // batch, item - item % batch, item)))
    return expected


def item_numbers(expected_rows: list[tuple[str, str]]) -> list[int | None]:
    """The numbers the rows of a job show (see :func:`numbers`): its tasks count from
    0, its markers take a position but no number."""
    count = itertools.count()
    return [None if kind == "marker" else next(count) for kind, _ in expected_rows]


def state(driver: Any) -> str:
    """The status line's state: idle, running, done or failed."""
    return str(driver.find_element(By.ID, "status").get_attribute("data-state"))


def start_job(driver: Any, url: str, **fields: int) -> None:
    """Open the page at ``url``, fill in the form's ``fields`` and press its button."""
    driver.get(url)
    for name, value in fields.items():
        field = driver.find_element(By.NAME, name)
        field.clear()
        field.send_keys(str(value))
    driver.find_element(By.ID, "start-button").click()


def wait_until_done(driver: Any) -> None:
    """Wait (up to DEADLINE) until the job ends; it must have ended well."""
    WebDriverWait(driver, DEADLINE).until(lambda d: state(d) in ("done", "failed"))
    assert state(driver) == "done", driver.find_element(By.ID, "status").text


@dataclass(frozen=True)
class Bar:
    """What the progress bar shows."""

    value: int
    max: int
    #: The stream's total once known, else None.
    total: int | None
    #: Its text: "3 of 6 outcomes".
    counts: str
    #: The waiting line's position, None while it is hidden; and its text.
    waiting_position: int | None
    waiting: str


def bar(driver: Any) -> Bar:
    """The progress bar as the page shows it now."""
    found = driver.execute_script(
        "const bar = document.getElementById('bar');"
        "const waiting = document.getElementById('waiting');"
        "return [bar.value, bar.max, bar.dataset.total,"
        "  document.getElementById('counts').textContent,"
        "  waiting.hidden ? null : waiting.dataset.position, waiting.textContent];"
    )
    value, max_, total, counts, position, waiting = found
    return Bar(
        int(value), int(max_), int(total) if total else None, counts,
        None if position is None else int(position), waiting,
    )  # fmt: skip


def gated_job(process: Any, redis_url: str, key: str) -> Callable[[int, int], Iterator[Any]]:
    """A job for an example's ``job=`` option: 6 entries whose fourth (item 2) waits
    until the test pushes to ``key``; ``process`` is the example's task."""

    def job(items: int, batch: int) -> Iterator[Any]:
        yield process.s(0, 0.0)
        yield process.s(1, 0.2)
        yield {"marker": "before the gate"}
        yield gate.s(redis_url, key, {"item": 2, "seconds": 0.0, "worker": 0}, DEADLINE)
        yield process.s(3, 0.0)
        yield {"marker": "after the gate"}

    return job


def check_the_page_shows_a_whole_job(
    driver: Any,
    url: str,
    items: int,
    batch: int,
    marker: Callable[[int, int, int], str] = web_job_marker,
) -> None:
    """Start a job of ``items`` in batches of ``batch`` from the page at ``url``; once it
    is done, its rows must be the job's outcomes in the order put, numbered by item
    (see :func:`expected_rows`)."""
    start_job(driver, url, items=items, batch=batch)
    wait_until_done(driver)
    expected = expected_rows(items, batch, marker)
    assert rows(driver) == expected
    assert positions(driver) == list(range(len(expected)))
    assert numbers(driver) == item_numbers(expected)
    assert driver.find_element(By.ID, "status").text.endswith(f"done, {len(expected)} rows")


def check_a_job_resumed_after_a_dropped_connection(
    driver: Any,
    url: str,
    last_event_ids: Callable[[], list[str | None]],
    marker: Callable[[int, int, int], str] = web_job_marker,
) -> None:
    """Run a job of 8 in batches of 4 from the page at ``url``, whose server drops the
    first event stream after 4 events (:class:`CutFirstEventStream`): the browser must
    have reconnected by itself, saying which event it had last (``last_event_ids()``:
    those of the event stream requests, None for none), and the page must show every
    outcome exactly once, in order."""
    start_job(driver, url, items=8, batch=4)
    wait_until_done(driver)
    assert last_event_ids() == [None, "3"]
    assert rows(driver) == expected_rows(8, 4, marker)
    assert positions(driver) == list(range(10))


#: The rows of :func:`gated_job`.
GATED_ROWS = [
    ("result", "0"),
    ("result", "1"),
    ("marker", "before the gate"),
    ("result", "2"),
    ("result", "3"),
    ("marker", "after the gate"),
]


def check_the_page_follows_a_gated_job(
    driver: Any, redis_client: Any, key: str, screenshots: str
) -> None:
    """The page of a started :func:`gated_job` shows rows and progress while the gate
    at ``key`` is shut, and the rest once it opens. Screenshots of both moments:
    ``screenshots`` + ``-mid-job.png`` and ``-end.png``."""
    # When the first three rows are on the page
    WebDriverWait(driver, DEADLINE).until(lambda d: len(rows(d)) >= 3)

    # Then they arrived while the job could not have finished: the gate is shut
    assert redis_client.llen(key) == 0
    assert rows(driver) == GATED_ROWS[:3]
    assert state(driver) == "running"

    # And the bar stands at 3 of 6 delivered, and the page says what the
    # stream waits on: item 2, at position 3
    WebDriverWait(driver, DEADLINE).until(
        lambda d: (b := bar(d)).waiting_position == 3 and b.total == 6
    )
    mid = bar(driver)
    driver.save_screenshot(f"{screenshots}-mid-job.png")
    assert (mid.value, mid.max, mid.counts) == (3, 6, "3 of 6 outcomes")
    assert "item 2 (stream position 3): its task was sent" in mid.waiting, mid.waiting
    assert redis_client.llen(key) == 0

    # And once the gate opens, the rest follows in order, and the bar grows
    # to 6 of 6, waiting on nothing
    redis_client.rpush(key, 1)
    wait_until_done(driver)
    end = bar(driver)
    driver.save_screenshot(f"{screenshots}-end.png")
    assert rows(driver) == GATED_ROWS
    assert positions(driver) == list(range(6))
    assert numbers(driver) == [0, 1, None, 2, 3, None]
    assert (end.value, end.max, end.total, end.counts) == (6, 6, 6, "6 of 6 outcomes")
    assert end.waiting_position is None


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
        """``body``, up to its ``events``-th event."""
        sent = 0
        try:
            for chunk in body:
                yield chunk
                sent += chunk.startswith(b"id: ")
                if sent == self.events:
                    return
        finally:
            body.close()
