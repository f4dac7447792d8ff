"""Driving the web examples' pages in headless Chromium, shared by their browser tests.

The pages (examples/flask_app, examples/django_project) share a DOM: a form
whose ``#start-button`` starts a job, a ``#status`` line whose
``data-state`` is ``idle``, ``running``, ``done`` or ``failed``, and one
``#rows li`` per outcome with ``data-kind``, ``data-position`` and, for a
task's result, ``data-item``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

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
        "--no-proxy-server", f"--user-data-dir={profile}",
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
    """The stream position of each row, top to bottom."""
    found = driver.find_elements(By.CSS_SELECTOR, "#rows li")
    return [int(row.get_attribute("data-position")) for row in found]


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
