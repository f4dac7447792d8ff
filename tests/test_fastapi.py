"""Streaming a job from asyncio: ``async_sse_events``/``async_ndjson_lines`` and FastAPI.

Real Redis and real workers; the FastAPI example runs under uvicorn, a
subprocess, and is read over real HTTP connections, one of which the test
drops while the stream waits.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from celery_ordered import AsyncOrderedResultStream, OrderedResultStream, StreamEmpty
from celery_ordered.web import async_ndjson_lines, async_sse_events, ndjson_lines, sse_events
from tests.apps.tasks import check_positive, echo, fail, sleep_echo
from tests.support import ROOT
from tests.support.fastapi_example import POOL_THREADS, served
from tests.support.gates import gated_stream
from tests.support.waiting import wait_until

pytestmark = pytest.mark.usefixtures("worker")


async def collect(body: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in body]


def a_job(make_stream: Callable[..., OrderedResultStream]) -> OrderedResultStream:
    """A closed stream: tasks that finish in reverse order, a marker and a failure."""
    stream = make_stream()
    stream.put(sleep_echo, "slow", 0.3)
    stream.put(echo, {"n": 1})
    stream.put("batch 0 done")
    stream.put(fail, "boom")
    stream.close()
    return stream


@pytest.mark.parametrize(
    ("blocking", "asynchronous"),
    [(sse_events, async_sse_events), (ndjson_lines, async_ndjson_lines)],
    ids=["sse", "ndjson"],
)
def test_the_async_bodies_are_the_blocking_ones_chunk_for_chunk(
    app: Any,
    make_stream: Callable[..., OrderedResultStream],
    blocking: Callable[..., Any],
    asynchronous: Callable[..., AsyncIterator[bytes]],
) -> None:
    # When the same job is read by the asyncio stream and by the threaded one
    name = a_job(make_stream).name
    read = collect(asynchronous(AsyncOrderedResultStream(app, name, create=False)))
    chunks = asyncio.run(read)

    # Then the chunks are the same, one per outcome, in the order put
    assert chunks == list(blocking(a_job(make_stream)))
    assert b'"position":0,"value":"slow"' in chunks[1 if blocking is sse_events else 0]


def test_an_async_iterable_streams_with_positions_and_progress(
    app: Any, make_stream: Callable[..., OrderedResultStream]
) -> None:
    name = make_stream().name

    async def read() -> list[bytes]:
        stream = AsyncOrderedResultStream(app, name, create=False)
        return await collect(
            async_ndjson_lines(stream.amap(check_positive, [1, -2, 3]), progress=60)
        )

    lines = [json.loads(line) for line in asyncio.run(read())]
    assert [line for line in lines if "progress" not in line] == [
        {"position": 0, "value": 1},
        {"position": 1, "error": {"type": "ValueError", "message": "-2 is negative"}},
        {"position": 2, "value": 3},
        {"end": True, "total": 3},
    ]
    assert [(r["delivered"], r["total"]) for r in lines if "progress" in r] == [(1, None), (3, 3)]


@pytest.fixture
def example_env(redis_url: str) -> dict[str, str]:
    """The environment of the FastAPI example's server: the tests' Redis."""
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "QUEUE": f"fastapi-unused-{uuid.uuid4().hex[:8]}",
    }


def read_lines(response: http.client.HTTPResponse, count: int) -> list[dict[str, Any]]:
    """The next ``count`` NDJSON lines of a streaming response."""
    return [json.loads(response.readline()) for _ in range(count)]


def test_a_client_that_disconnects_cancels_the_body_and_a_reconnect_resumes_without_repeats(
    app: Any,
    make_stream: Callable[..., OrderedResultStream],
    example_env: dict[str, str],
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    # Given a job whose position 3 waits until the test opens its gate
    stream = gated_stream(make_stream, redis_url, gate_key, "abcde", held=3)

    with served("example", example_env) as site:
        url = urlsplit(site)
        path = f"/jobs/{stream.name}/results.ndjson"

        # When a client reads positions 0-2 from the example, then drops its
        # connection while the server waits on position 3
        first = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        first.request("GET", path)
        response = first.getresponse()
        assert response.status == 200
        assert [line["value"] for line in read_lines(response, 3)] == ["a", "b", "c"]
        first.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        first.close()

        # Then the server cancels the body: the stream acknowledges the 3
        # outcomes handed out and is handed on at once, well before its
        # consumer lease (30 s) would lapse by itself
        probe = OrderedResultStream(app, stream.name)

        def handed_on() -> bool:
            try:
                value = probe.get(timeout=0)
            except StreamEmpty as exc:
                return "consumer lease" not in str(exc)
            raise AssertionError(f"got {value!r} again: the server did not acknowledge it")

        wait_until(handed_on, "the server hands the stream on", timeout=15)
        assert probe.position == 3
        probe.release()
        assert stream.stats().delivered == 3
        assert redis_client.llen(gate_key) == 0, "the gate was never opened"

        # And a client that comes back (without Last-Event-ID: NDJSON has
        # none) gets the rest, from position 3, exactly once
        redis_client.rpush(gate_key, 1)
        second = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        second.request("GET", path)
        rest = [json.loads(line) for line in second.getresponse().read().splitlines()]
        second.close()
    assert rest == [
        {"position": 3, "value": "d"},
        {"position": 4, "value": "e"},
        {"end": True, "total": 5},
    ]


def test_blocking_bodies_do_not_hold_the_thread_pool_of_def_endpoints(
    make_stream: Callable[..., OrderedResultStream], example_env: dict[str, str]
) -> None:
    # Given a server whose shared thread pool has POOL_THREADS threads, and
    # more blocking event streams than that, each waiting for an outcome
    # (heartbeat 60 s: a body in that pool would hold a thread that long)
    streams = [make_stream() for _ in range(POOL_THREADS + 2)]
    with served("blocking", example_env) as site:
        url = urlsplit(site)
        connections = []
        try:
            for stream in streams:
                connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                connection.request("GET", f"/blocking/{stream.name}/events")
                response = connection.getresponse()
                assert response.status == 200
                assert response.read1().startswith(b": open")  # the body runs
                connections.append(connection)
            # When a def endpoint is asked for
            ping = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
            ping.request("GET", "/ping")
            # Then it answers: the bodies wait in threads of their own
            assert json.loads(ping.getresponse().read()) == {"ok": True}
            ping.close()
        finally:
            for connection in connections:
                connection.close()


def test_the_events_endpoint_resumes_after_last_event_id(
    make_stream: Callable[..., OrderedResultStream], example_env: dict[str, str]
) -> None:
    stream = make_stream()
    for value in ("a", "b", "c"):
        stream.put(echo, value)
    stream.close()
    with served("example", example_env) as site:
        url = urlsplit(site)
        client = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        client.request("GET", f"/jobs/{stream.name}/events", headers={"Last-Event-ID": "0"})
        response = client.getresponse()
        assert response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert response.getheader("X-Accel-Buffering") == "no"
        body = response.read().decode()
        client.close()
    assert re.findall(r"^id: (\d+)$", body, re.MULTILINE) == ["1", "2"]
    assert body.endswith('event: end\ndata: {"end":true,"total":3}\n\n')


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda s, a: async_sse_events(s), TypeError, "blocking source is served by sse_events"),
        (lambda s, a: sse_events(a), TypeError, "serve it with async_sse_events"),
        (lambda s, a: async_ndjson_lines(a, colour="red"), TypeError, "colour"),
        (lambda s, a: async_sse_events(a, heartbeat=0), ValueError, "seconds > 0"),
        (lambda s, a: async_ndjson_lines(a, heartbeat=1), TypeError, "heartbeat"),
    ],
)
def test_bad_arguments_fail_at_the_call(
    app: Any,
    make_stream: Callable[..., OrderedResultStream],
    call: Callable[[OrderedResultStream, AsyncOrderedResultStream], Any],
    error: type[Exception],
    words: str,
) -> None:
    stream = make_stream()
    with pytest.raises(error, match=re.escape(words)):
        call(stream, AsyncOrderedResultStream(app, stream.name))


def test_the_fastapi_helper_takes_the_request_first() -> None:
    from celery_ordered.contrib.fastapi import stream_response

    with pytest.raises(TypeError, match="takes the endpoint's request first"):
        stream_response("not a request", [])  # type: ignore[arg-type]


def test_importing_the_fastapi_helper_without_starlette_names_the_fix() -> None:
    code = "import sys; sys.modules['starlette'] = None; import celery_ordered.contrib.fastapi"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "pip install 'celery-ordered[fastapi]'" in run.stderr
