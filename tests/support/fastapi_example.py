"""The FastAPI example (examples/fastapi_app) served by uvicorn in a subprocess, for tests.

:func:`served` runs ``python -m uvicorn --factory`` on one of this module's
app factories, as the example's README runs uvicorn, on a free port. The
factories read what the test chose from the environment the server gets:
``REDIS_URL``, ``BROKER_URL`` and ``QUEUE`` (read by the example itself),
and for :func:`gated` and :func:`cut` the Redis keys of the test's gate and
of its record of ``Last-Event-ID`` headers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import redis
from starlette.requests import Request

from tests.support import ROOT, SESSION
from tests.support.browsers import gated_job
from tests.support.processes import as_from_a_terminal
from tests.support.waiting import wait_until

#: Seconds the server may take to stop on Ctrl-C before it is killed.
STOP_TIMEOUT = 30.0


def _example(**options: Any) -> Any:
    """The example's app: ``create_app(**options)``."""
    from examples.fastapi_app.app import create_app

    return create_app(**options)


def example() -> Any:
    """The example as it is."""
    return _example()


def gated() -> Any:
    """The example whose jobs are the browser tests' ``gated_job``, held at ``CO_GATE_KEY``."""
    from examples.web_job import process

    job = gated_job(process, os.environ["REDIS_URL"], os.environ["CO_GATE_KEY"])
    return _example(job=job)


def cut() -> Any:
    """The example behind :class:`CutFirstEventStream`: its first event stream ends
    after 4 events; the ``Last-Event-ID`` of each event stream request is pushed to
    the Redis list ``CO_LAST_EVENT_IDS`` (``"-"`` for none)."""
    return CutFirstEventStream(_example(), 4, os.environ["CO_LAST_EVENT_IDS"])


#: Threads of Starlette's shared pool in :func:`blocking`: few, so that a
#: handful of bodies would fill it if they ran there.
POOL_THREADS = 3


def blocking() -> Any:
    """The example plus ``GET /blocking/NAME/events``: a job's events from a blocking
    :class:`~celery_ordered.OrderedResultStream` (heartbeat 60 s), and ``GET /ping``,
    a ``def`` endpoint (run in Starlette's shared thread pool, here of
    :data:`POOL_THREADS` threads)."""
    import anyio.to_thread

    from celery_ordered import OrderedResultStream
    from celery_ordered.contrib.fastapi import stream_response
    from examples.fastapi_app.app import celery_app

    app = _example()

    @app.get("/blocking/{name}/events")
    async def blocking_events(name: str, request: Request) -> Any:
        anyio.to_thread.current_default_thread_limiter().total_tokens = POOL_THREADS
        stream = OrderedResultStream(celery_app, name, create=False)
        return stream_response(request, stream, heartbeat=60)

    @app.get("/ping")
    def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


class _Cut(Exception):
    """The connection was "dropped": the rest of the response goes nowhere."""


class CutFirstEventStream:
    """ASGI middleware: ends the first event stream after ``events`` events, as a
    dropped connection would (the app's write of the last one fails after the
    client got it: the app's body is closed there), and records the
    ``Last-Event-ID`` of every event-stream request in the Redis list ``record``."""

    def __init__(self, app: Any, events: int, record: str) -> None:
        self.app = app
        self.events = events
        self.record = record
        self.streams = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/events"):
            await self.app(scope, receive, send)
            return
        last_event_id = dict(scope["headers"]).get(b"last-event-id", b"-").decode()
        with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
            client.rpush(self.record, last_event_id)
            client.expire(self.record, 600)
        self.streams += 1
        if self.streams > 1:
            await self.app(scope, receive, send)
            return
        sent = 0

        async def cut_send(message: Any) -> None:
            nonlocal sent
            await send(message)
            if message["type"] == "http.response.body":
                sent += message.get("body", b"").startswith(b"id: ")
                if sent == self.events:
                    # The client has this event; the connection drops after it.
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    raise _Cut

        with contextlib.suppress(_Cut):
            await self.app(scope, receive, cut_send)


@contextlib.contextmanager
def served(factory: str, env: Mapping[str, str]) -> Iterator[str]:
    """``uvicorn --factory`` on this module's ``factory``, on a free localhost port;
    yields its base URL once it listens, and stops it as Ctrl-C would."""
    directory = Path(tempfile.mkdtemp(prefix=f"co-uvicorn-{SESSION}-"))
    log = directory / "uvicorn.log"
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:{factory}",
        "--host", "127.0.0.1", "--port", "0", "--log-level", "info",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**env, "TMPDIR": str(directory)},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=as_from_a_terminal,
        )  # fmt: skip
    try:

        def listening() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"uvicorn exited:\n{log.read_text()}")
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
            return found and found.group(1) + "/"

        yield wait_until(listening, "uvicorn listening")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"uvicorn did not stop on Ctrl-C:\n{log.read_text()}") from None
        finally:
            text = log.read_text()
            for entry in directory.iterdir():
                entry.unlink()
            directory.rmdir()
        assert "Traceback" not in text, text
