"""Django: the example project's view and command, and the helper under WSGI and ASGI.

Django is configured once for this process, from the example project's
settings (examples/django_project), pointed at the tests' Redis; nothing
else in the test suite uses Django. Real workers run every task.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.http import HttpRequest, HttpResponse
from django.urls import path

from celery_ordered import OrderedResultStream, StreamClosedError
from celery_ordered.contrib.django import stream_response
from tests.apps.tasks import echo, gate
from tests.support import ROOT
from tests.support.django_project import EXAMPLE, configured_project
from tests.support.django_project import project_worker as start_project_worker
from tests.support.waiting import wait_until
from tests.support.workers import Worker

OPEN = b": open\n\n"
KEEP_ALIVE = b": keep-alive\n\n"


def stream_view(request: HttpRequest, name: str) -> HttpResponse:
    """Stream the tests' stream ``name`` (this module is the URLconf of some tests)."""
    from tests.apps.celeryapp import app

    stream = OrderedResultStream(app, name)
    on_disconnect = request.GET.get("on_disconnect", "keep")
    if request.GET.get("format") == "ndjson":  # no heartbeats
        return stream_response(request, stream, format="ndjson", on_disconnect=on_disconnect)
    return stream_response(request, stream, heartbeat=0.05, on_disconnect=on_disconnect)


urlpatterns = [path("stream/<str:name>", stream_view)]


@pytest.fixture(scope="module")
def project(redis_url: str) -> Iterator[Any]:
    """Django set up with the example project's settings; yields its Celery app."""
    from django.test.utils import setup_test_environment, teardown_test_environment

    with configured_project(redis_url, "django-example") as celery_app:
        setup_test_environment()
        try:
            yield celery_app
        finally:
            teardown_test_environment()


@pytest.fixture(scope="module")
def project_worker(project: Any, redis_url: str) -> Iterator[Worker]:
    """``celery -A project worker``, as the example's README starts it, on its queue."""
    with start_project_worker(project, redis_url) as worker:
        yield worker


def expected_job(items: int, batch: int) -> list[dict[str, Any]]:
    """What the example's job streams, position by position (without worker pids)."""
    expected: list[dict[str, Any]] = []
    for item in range(items):
        if item and item % 13 == 0:
            error = {"type": "ValueError", "message": f"item {item} is unlucky"}
            expected.append({"position": len(expected), "error": error})
        else:
            expected.append({"position": len(expected), "item": item})
        if item % batch == batch - 1 or item == items - 1:
            first = item - item % batch
            marker = {"marker": f"batch {item // batch} done: items {first}-{item}"}
            expected.append({"position": len(expected), "value": marker})
    return expected


def without_details(outcome: dict[str, Any]) -> dict[str, Any]:
    """An outcome with a task's result reduced to its item (pids and times vary)."""
    value = outcome.get("value")
    if isinstance(value, dict) and "item" in value:
        return {"position": outcome["position"], "item": value["item"]}
    return outcome


@pytest.mark.usefixtures("project_worker")
def test_the_example_view_streams_a_job_as_ndjson_in_order() -> None:
    from django.test import Client

    response = Client().get("/jobs/run", {"items": 14, "batch": 7})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "application/x-ndjson"
    assert response["Cache-Control"] == "no-cache"
    assert response["X-Accel-Buffering"] == "no"
    lines = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert [without_details(line) for line in lines[:-1]] == expected_job(14, 7)
    assert lines[-1] == {"end": True, "total": 16}


@pytest.mark.usefixtures("project_worker")
def test_the_example_view_streams_server_sent_events_too() -> None:
    from django.test import Client

    response = Client().get("/jobs/run", {"items": 5, "batch": 5, "format": "sse"})

    assert response["Content-Type"] == "text/event-stream; charset=utf-8"
    body = b"".join(response.streaming_content).decode()
    events = [block for block in body.split("\n\n") if block and not block.startswith(":")]
    assert [block.split("\n")[:2] for block in events] == [
        *([f"id: {n}", "event: result"] for n in range(6)),
        ["event: end", 'data: {"end":true,"total":6}'],
    ]


@pytest.mark.usefixtures("project")
@pytest.mark.parametrize(
    ("query", "words"),
    [("items=0", b"items must be 1 to 10000"), ("batch=x", b"whole numbers"),
     ("format=xml", b"format must be ndjson or sse")],
)  # fmt: skip
def test_the_example_view_refuses_bad_queries(query: str, words: bytes) -> None:
    from django.test import Client

    response = Client().get(f"/jobs/run?{query}")

    assert response.status_code == 400
    assert words in response.content


@pytest.mark.usefixtures("project_worker")
def test_run_ordered_job_reports_batches_in_order_with_a_progress_bar() -> None:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("run_ordered_job", items=14, batch=7, stdout=out)

    lines = out.getvalue().splitlines()
    said = [line for line in lines if not line.startswith("[")]
    assert said == [
        "batch 0 done: items 0-6",
        "position 14: ValueError: item 13 is unlucky",
        "batch 1 done: items 7-13",
        "14 items, 1 failed, every outcome in order",
    ]
    bars = [line for line in lines if line.startswith("[")]
    assert bars[-1].startswith("[" + "#" * 30 + "] 16/16 outcomes")
    counts = [int(bar.split("] ")[1].split("/")[0]) for bar in bars]
    assert counts == sorted(counts), "the bar only moves forward"
    assert len(bars) >= 5, "a line at each 10% step, off a terminal"


@pytest.mark.usefixtures("project")
def test_run_ordered_job_refuses_an_empty_job() -> None:
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="at least 1"):
        call_command("run_ordered_job", items=0, stdout=io.StringIO())


def test_run_ordered_job_runs_with_zero_setup() -> None:
    env = {
        key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "BROKER_URL")
    }
    run = subprocess.run(
        [sys.executable, "manage.py", "run_ordered_job", "--local", "--items", "6", "--batch", "3"],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stdout.splitlines() if not line.startswith("[")]
    assert said == [
        "batch 0 done: items 0-2",
        "batch 1 done: items 3-5",
        "6 items, 0 failed, every outcome in order",
    ]


# -- the helper, under WSGI (Client) and ASGI (AsyncClient) ---------------------------


def held_stream(make_stream: Callable[..., OrderedResultStream], redis_url: str, key: str) -> Any:
    """A closed stream whose position 2 waits for the test to open gate ``key``."""
    stream = make_stream()
    stream.put(echo, "a")
    stream.put(echo, "b")
    stream.put(gate, redis_url, key, "c")
    stream.put(echo, "d")
    stream.close()
    return stream


def left_at_position_1(
    make_stream: Callable[..., OrderedResultStream], redis_url: str, key: str
) -> Any:
    """An open stream: "a", then position 1, which waits for the test to open gate ``key``."""
    stream = make_stream()
    stream.put(echo, "a")
    stream.put(gate, redis_url, key, "b")
    return stream


def closed_by_the_body_thread(
    stream: OrderedResultStream, redis_client: redis.Redis, key: str
) -> None:
    """The client left with ``on_disconnect=close``: the body's own thread closes
    the stream soon after, while position 1 is still held."""
    assert redis_client.llen(key) == 0
    wait_until(lambda: stream.stats().closed, "the stream closed by the body's thread", 10)


def data(chunk: bytes) -> dict[str, Any]:
    line = next(line for line in chunk.decode().split("\n") if line.startswith("data: "))
    result: dict[str, Any] = json.loads(line.removeprefix("data: "))
    return result


@pytest.mark.usefixtures("project", "worker")
def test_wsgi_response_streams_while_the_head_of_line_runs(
    make_stream: Callable[..., OrderedResultStream],
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    from django.test import Client, override_settings

    stream = held_stream(make_stream, redis_url, gate_key)
    with override_settings(ROOT_URLCONF=__name__):
        response = Client().get(f"/stream/{stream.name}")
        body = iter(response.streaming_content)

        assert next(body) == OPEN
        assert [data(next(body))["value"] for _ in range(2)] == ["a", "b"]
        assert next(body) == KEEP_ALIVE  # position 2 is still held
        assert redis_client.llen(gate_key) == 0

        redis_client.rpush(gate_key, 1)
        rest = [data(chunk) for chunk in body if chunk != KEEP_ALIVE]
    assert rest == [
        {"position": 2, "value": "c"},
        {"position": 3, "value": "d"},
        {"end": True, "total": 4},
    ]


@pytest.mark.usefixtures("project", "worker")
def test_wsgi_response_resumes_after_last_event_id_and_closes_on_disconnect(
    make_stream: Callable[..., OrderedResultStream], redis_url: str, gate_key: str
) -> None:
    from django.test import Client, override_settings

    stream = make_stream()
    stream.put(echo, "a")
    stream.put(echo, "b")
    stream.put(gate, redis_url, gate_key, "c")
    with override_settings(ROOT_URLCONF=__name__):
        url = f"/stream/{stream.name}?on_disconnect=close"
        response = Client().get(url, headers={"Last-Event-ID": "0"})
        body = iter(response.streaming_content)
        assert next(body) == OPEN
        assert data(next(body)) == {"position": 1, "value": "b"}  # 0 was skipped

        response.close()  # the client leaves

    assert stream.stats().closed is True
    with pytest.raises(StreamClosedError):
        stream.put(echo, "d")


@pytest.mark.usefixtures("project", "worker")
def test_asgi_response_streams_from_a_thread_and_closes_on_disconnect(
    make_stream: Callable[..., OrderedResultStream],
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    from django.test import AsyncClient, override_settings

    stream = left_at_position_1(make_stream, redis_url, gate_key)

    async def follow() -> list[bytes]:
        response = await AsyncClient().get(f"/stream/{stream.name}?on_disconnect=close")
        assert response["Content-Type"] == "text/event-stream; charset=utf-8"
        body = response.streaming_content
        got = [await anext(body), await anext(body), await anext(body)]
        await body.aclose()  # the client leaves while position 1 is held
        return got

    with override_settings(ROOT_URLCONF=__name__):
        got = asyncio.run(follow())

    assert got[0] == OPEN
    assert data(got[1]) == {"position": 0, "value": "a"}
    assert got[2] == KEEP_ALIVE  # the event loop was free while the body waited
    closed_by_the_body_thread(stream, redis_client, gate_key)


@pytest.mark.usefixtures("project", "worker")
def test_an_asgi_ndjson_response_notices_its_client_left_while_the_head_runs(
    make_stream: Callable[..., OrderedResultStream],
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    # NDJSON has no heartbeats: the body's thread still comes back every
    # IDLE_SLICE while it waits, so it sees the client leave then, not when
    # the next outcome comes (here: never, the gate stays shut).
    from django.test import AsyncClient, override_settings

    stream = left_at_position_1(make_stream, redis_url, gate_key)

    async def follow() -> list[bytes]:
        path = f"/stream/{stream.name}?format=ndjson&on_disconnect=close"
        response = await AsyncClient().get(path)
        assert response["Content-Type"] == "application/x-ndjson"
        body = response.streaming_content
        got = [await anext(body)]
        # The server asks for the next line: the body's thread reads the
        # stream, acknowledging position 0 and waiting for position 1.
        waiting = asyncio.ensure_future(anext(body))
        while stream.stats().delivered < 1:
            await asyncio.sleep(0.01)  # yields to the loop; the event is Redis's count
        waiting.cancel()  # the client leaves while position 1 is held
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await body.aclose()
        return got

    with override_settings(ROOT_URLCONF=__name__):
        got = asyncio.run(follow())

    assert [json.loads(line) for line in got] == [{"position": 0, "value": "a"}]
    closed_by_the_body_thread(stream, redis_client, gate_key)


@pytest.mark.usefixtures("project", "worker")
def test_asgi_response_delivers_everything_in_order(
    make_stream: Callable[..., OrderedResultStream],
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    from django.test import AsyncClient, override_settings

    stream = held_stream(make_stream, redis_url, gate_key)

    async def follow() -> list[dict[str, Any]]:
        response = await AsyncClient().get(f"/stream/{stream.name}")
        received = []
        async for chunk in response.streaming_content:
            if chunk.startswith(b"id: 1\n"):
                redis_client.rpush(gate_key, 1)  # open the gate once 0 and 1 arrived
            if chunk.startswith((b"id:", b"event:")):
                received.append(data(chunk))
        return received

    with override_settings(ROOT_URLCONF=__name__):
        received = asyncio.run(follow())

    assert [item.get("value") for item in received] == ["a", "b", "c", "d", None]
    assert received[-1] == {"end": True, "total": 4}


@pytest.mark.usefixtures("project")
def test_stream_response_wants_the_request_first(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    stream = make_stream()
    with pytest.raises(TypeError, match="takes the view's request first"):
        stream_response(stream, "ndjson")  # type: ignore[arg-type]


def test_importing_the_django_helper_without_django_names_the_fix() -> None:
    code = "import sys; sys.modules['django'] = None; import celery_ordered.contrib.django"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "pip install 'celery-ordered[django]'" in run.stderr
