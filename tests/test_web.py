"""Streaming a job to the web: server-sent events and NDJSON through Flask.

Real Redis and real worker processes; Flask's test client reads the body one
chunk (one event) at a time, as a browser receives it.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask, Response
from flask.testing import FlaskClient

from celery_ordered import OrderedResultStream, RedisServer, StreamClosedError, StreamStateLost
from celery_ordered.contrib.flask import stream_response
from celery_ordered.web import NDJSON_CONTENT_TYPE, SSE_CONTENT_TYPE, ndjson_lines, sse_events
from tests.apps.tasks import (
    check_positive,
    echo,
    fail,
    fail_redis_error,
    fail_two_args,
    gate,
    sleep_echo,
)
from tests.support import ROOT
from tests.support.gates import gated_stream

pytestmark = pytest.mark.usefixtures("worker")

OPEN = b": open\n\n"


def parse_event(chunk: bytes) -> dict[str, Any]:
    """One server-sent event (or comment) as the EventSource algorithm reads it."""
    text = chunk.decode("utf-8")
    assert text.endswith("\n\n"), f"an event ends with a blank line: {text!r}"
    event: dict[str, Any] = {}
    for line in text[:-2].split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "":
            event.setdefault("comments", []).append(value)
        elif field == "data":
            event["data"] = json.loads(value)
        else:
            event[field] = value
    return event


@pytest.fixture
def serve() -> Callable[[Callable[[], Response]], FlaskClient]:
    """A Flask app whose one route, /stream, returns what the test's view makes."""

    def serve(view: Callable[[], Response]) -> FlaskClient:
        flask_app = Flask(__name__)
        flask_app.add_url_rule("/stream", "stream", view)
        return flask_app.test_client()

    return serve


def chunks(response: Any) -> Iterator[bytes]:
    """The body as the server flushes it, chunk by chunk."""
    return iter(response.response)


def test_sse_events_are_framed_with_positions_in_submission_order(
    make_stream: Callable[..., OrderedResultStream], serve: Callable[..., FlaskClient]
) -> None:
    # Given a closed stream: tasks that finish in reverse order, a marker and a failure
    stream = make_stream(window=10)
    stream.put(sleep_echo, "slow", 0.3)
    stream.put(sleep_echo, {"n": 1}, 0.0)
    stream.put("batch 0 done")
    stream.put(fail, "boom")
    stream.put(echo, [1, 2.5, None, True])
    stream.close()
    client = serve(lambda: stream_response(stream))

    # When it is streamed as server-sent events
    response = client.get("/stream")

    # Then every outcome is one event, at its position, in the order put
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.data.decode() == (
        ": open\n\n"
        'id: 0\nevent: result\ndata: {"position":0,"value":"slow"}\n\n'
        'id: 1\nevent: result\ndata: {"position":1,"value":{"n":1}}\n\n'
        'id: 2\nevent: result\ndata: {"position":2,"value":"batch 0 done"}\n\n'
        'id: 3\nevent: failure\ndata: {"position":3,"error":'
        '{"type":"CustomError","message":"boom"}}\n\n'
        'id: 4\nevent: result\ndata: {"position":4,"value":[1,2.5,null,true]}\n\n'
        'event: end\ndata: {"end":true,"total":5}\n\n'
    )


def test_ndjson_lines_carry_values_errors_and_the_end(
    make_stream: Callable[..., OrderedResultStream], serve: Callable[..., FlaskClient]
) -> None:
    stream = make_stream()
    stream.put(sleep_echo, "first", 0.2)
    stream.put(fail_two_args, 7)  # its class cannot be rebuilt here: TaskFailed
    stream.put("marker")
    stream.close()
    client = serve(lambda: stream_response(stream, "ndjson"))

    response = client.get("/stream")

    assert response.headers["Content-Type"] == NDJSON_CONTENT_TYPE
    assert response.headers["X-Accel-Buffering"] == "no"
    lines = response.data.split(b"\n")
    assert lines[-1] == b"", "every line ends with a newline"
    assert [json.loads(line) for line in lines[:-1]] == [
        {"position": 0, "value": "first"},
        {"position": 1, "error": {"type": "NeedsTwoArgs", "message": "7: detail"}},
        {"position": 2, "value": "marker"},
        {"end": True, "total": 3},
    ]


def test_tracebacks_are_sent_only_when_asked_for(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    stream = make_stream()
    stream.put(fail, "secret path /srv/app")
    stream.close()

    hidden = [json.loads(line) for line in ndjson_lines(stream)]
    assert hidden[0] == {
        "position": 0,
        "error": {"type": "CustomError", "message": "secret path /srv/app"},
    }

    again = make_stream()
    again.put(fail, "boom")
    again.close()
    shown = [json.loads(line) for line in ndjson_lines(again, tracebacks=True)]
    traceback = shown[0]["error"]["traceback"]
    assert traceback.startswith("Traceback (most recent call last):")
    assert "raise CustomError(message)" in traceback
    assert traceback.rstrip().endswith("CustomError: boom")


@pytest.fixture
def gated_body(
    make_stream: Callable[..., OrderedResultStream],
    serve: Callable[..., FlaskClient],
    redis_url: str,
    gate_key: str,
) -> Callable[..., Iterator[bytes]]:
    """The body of ``stream_response(stream, **options)`` on a closed stream of "a",
    "b", "c", "d" whose position 2 ("c") waits until the test opens the gate at
    ``gate_key``, chunk by chunk, past its opening comment."""

    def body(**options: Any) -> Iterator[bytes]:
        stream = gated_stream(make_stream, redis_url, gate_key, "abcd", held=2)
        chunked = chunks(serve(lambda: stream_response(stream, **options)).get("/stream"))
        assert next(chunked) == OPEN
        return chunked

    return body


def test_events_stream_while_the_head_of_line_is_still_running(
    gated_body: Callable[..., Iterator[bytes]], redis_client: redis.Redis, gate_key: str
) -> None:
    # When a job whose position 2 waits for the test's gate is read while the
    # gate is still shut
    body = gated_body(heartbeat=0.05)
    first = [parse_event(next(body)) for _ in range(2)]

    # Then positions 0 and 1 have arrived, and keep-alive comments follow
    # while position 2 cannot have finished
    assert [(e["id"], e["data"]["value"]) for e in first] == [("0", "a"), ("1", "b")]
    assert next(body) == b": keep-alive\n\n"
    assert next(body) == b": keep-alive\n\n"
    assert redis_client.llen(gate_key) == 0, "the gate was never opened"

    # And once the gate opens the rest comes, in order
    redis_client.rpush(gate_key, 1)
    rest = [parse_event(chunk) for chunk in body if chunk != b": keep-alive\n\n"]
    assert [(e.get("id"), e["event"]) for e in rest] == [
        ("2", "result"),
        ("3", "result"),
        (None, "end"),
    ]
    assert [e["data"].get("value") for e in rest[:2]] == ["c", "d"]


def test_a_client_that_leaves_and_returns_resumes_after_its_last_event_id(
    make_stream: Callable[..., OrderedResultStream],
    serve: Callable[..., FlaskClient],
    app: Any,
    redis_url: str,
    redis_client: redis.Redis,
    gate_key: str,
) -> None:
    # Given a stream still being produced, its position 3 held by a gate
    stream = gated_stream(make_stream, redis_url, gate_key, "abcde", held=3, close=False)
    client = serve(lambda: stream_response(OrderedResultStream(app, stream.name)))

    # When a client reads positions 0-2, then goes away
    response = client.get("/stream")
    body = chunks(response)
    assert next(body) == OPEN
    seen = [parse_event(next(body))["data"]["value"] for _ in range(3)]
    assert seen == ["a", "b", "c"]
    response.close()

    # Then the stream is left as it was: its producer goes on
    assert stream.stats().closed is False
    stream.put(echo, "f")
    stream.close()
    redis_client.rpush(gate_key, 1)

    # And a reconnecting EventSource, sending the last id it got, receives
    # the rest exactly once, in order
    resumed = client.get("/stream", headers={"Last-Event-ID": "2"})
    events = [parse_event(chunk) for chunk in chunks(resumed)][1:]
    assert [(e.get("id"), e["data"].get("value")) for e in events] == [
        ("3", "d"),
        ("4", "e"),
        ("5", "f"),
        (None, None),
    ]
    assert events[-1]["data"] == {"end": True, "total": 6}


def test_a_last_event_id_that_is_not_a_position_is_ignored(
    make_stream: Callable[..., OrderedResultStream], serve: Callable[..., FlaskClient]
) -> None:
    stream = make_stream()
    stream.put(echo, "a")
    stream.put(echo, "b")
    stream.close()
    client = serve(lambda: stream_response(stream))

    response = client.get("/stream", headers={"Last-Event-ID": "1; DROP TABLE"})

    ids = [parse_event(chunk).get("id") for chunk in chunks(response)][1:]
    assert ids == ["0", "1", None]


def test_on_disconnect_close_stops_the_producer(
    make_stream: Callable[..., OrderedResultStream],
    serve: Callable[..., FlaskClient],
    redis_url: str,
    gate_key: str,
) -> None:
    # Given a job that is still running
    stream = make_stream()
    stream.put(echo, "a")
    stream.put(gate, redis_url, gate_key, "b")
    client = serve(lambda: stream_response(stream, on_disconnect="close"))
    response = client.get("/stream")
    body = chunks(response)
    assert next(body) == OPEN
    assert parse_event(next(body))["data"] == {"position": 0, "value": "a"}

    # When the client goes away
    response.close()

    # Then the stream is closed to further puts: its producer stops
    assert stream.stats().closed is True
    with pytest.raises(StreamClosedError):
        stream.put(echo, "c")


def test_values_json_cannot_encode_fail_at_their_position_unless_default_is_given(
    make_stream: Callable[..., OrderedResultStream], caplog: pytest.LogCaptureFixture
) -> None:
    # Given outcomes the stream carries (kombu's json) but plain JSON does not
    stream = make_stream()
    stream.put(datetime.datetime(2024, 5, 6, 7, 8, 9))
    stream.put(echo, float("nan"))
    stream.put(echo, "fine")
    stream.close()

    lines = [json.loads(line) for line in ndjson_lines(stream)]

    # Then each is a failure at its place, saying what to do, and the stream goes on
    assert [line.get("position") for line in lines] == [0, 1, 2, None]
    assert lines[0]["error"]["type"] == "TypeError"
    assert "position 0 (a datetime) cannot be sent as JSON" in lines[0]["error"]["message"]
    assert "default=" in lines[0]["error"]["message"]
    assert lines[1]["error"]["type"] == "ValueError"
    assert "(a float) cannot be sent as JSON" in lines[1]["error"]["message"]
    assert "NaN and infinities are not JSON" in lines[1]["error"]["message"]  # not default=
    assert lines[2] == {"position": 2, "value": "fine"}
    assert "position 0 (a datetime) cannot be sent as JSON" in caplog.text

    # And default= encodes what it can
    again = make_stream()
    again.put(datetime.date(2024, 5, 6))
    again.close()
    encoded = [json.loads(line) for line in ndjson_lines(again, default=str)]
    assert encoded[0] == {"position": 0, "value": "2024-05-06"}


def test_text_is_utf8_in_both_formats(make_stream: Callable[..., OrderedResultStream]) -> None:
    text = "naïve café ✓ 日本語 😀"
    stream = make_stream()
    stream.put(echo, text)
    stream.put(echo, "lone \ud800 surrogate")
    stream.put(echo, "line\nbreak\r\u2028")
    stream.close()

    raw = b"".join(sse_events(stream))

    assert text.encode("utf-8") in raw  # sent as UTF-8, not as \\u escapes
    events = [parse_event(chunk + b"\n\n") for chunk in raw.split(b"\n\n")[1:-1]]
    assert [e["data"].get("value") for e in events] == [
        text,
        "lone \ud800 surrogate",
        "line\nbreak\r\u2028",
        None,
    ]


def test_any_iterable_streams_with_positions_counted_from_zero(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    # A map's failed item is a failure at its position, and the map goes on
    stream = make_stream()
    lines = [json.loads(line) for line in ndjson_lines(stream.map(check_positive, [1, -2, 3]))]
    assert lines == [
        {"position": 0, "value": 1},
        {"position": 1, "error": {"type": "ValueError", "message": "-2 is negative"}},
        {"position": 2, "value": 3},
        {"end": True, "total": 3},
    ]

    # A generator source is closed when its body is: it can clean up
    closed = []

    def outcomes() -> Iterator[Any]:
        try:
            yield from make_stream().map(check_positive, [1, 2, 3, 4])
        finally:
            closed.append(True)

    body = sse_events(outcomes(), after=0)
    assert next(body) == OPEN
    assert parse_event(next(body))["data"] == {"position": 1, "value": 2}  # 0 was skipped
    assert closed == []
    body.close()
    assert closed == [True]


def test_retry_sets_the_browsers_reconnection_delay(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    stream = make_stream()
    stream.close()
    assert list(sse_events(stream, retry=2.5)) == [
        b": open\nretry: 2500\n\n",
        b'event: end\ndata: {"end":true,"total":0}\n\n',
    ]


def progress_of(event: dict[str, Any]) -> dict[str, Any]:
    """A progress event's data, after checking it carries no id (an id would move the
    browser's Last-Event-ID off the last outcome)."""
    assert event["event"] == "progress"
    assert "id" not in event, "a progress event must not carry an id"
    data: dict[str, Any] = event["data"]
    assert data.pop("progress") is True
    return data


def test_progress_events_say_how_far_the_job_is_and_what_it_waits_on(
    gated_body: Callable[..., Iterator[bytes]], redis_client: redis.Redis, gate_key: str
) -> None:
    # When a job whose position 2 waits for the test's gate is read up to the gate
    body = gated_body(progress=0.05)
    events = [parse_event(next(body)) for _ in range(2)]
    while len([e for e in events if e["event"] == "result"]) < 2:
        events.append(parse_event(next(body)))
    results = [(e["id"], e["data"]["value"]) for e in events if e["event"] == "result"]
    assert results == [("0", "a"), ("1", "b")]

    # Then, while position 2 cannot have finished, progress events say that
    # the stream waits on its outcome, 2 of the 4 delivered
    waits = []
    while len(waits) < 2:
        event = parse_event(next(body))
        if event["event"] == "progress" and event["data"]["waiting"] is not None:
            waits.append(progress_of(event))
    assert redis_client.llen(gate_key) == 0, "the gate was never opened"
    for report in waits:
        assert report["delivered"] == 2
        assert (report["claimed"], report["total"]) == (4, 4)
        waiting = report["waiting"]
        assert (waiting["position"], waiting["on"]) == (2, "outcome")
        # why, as stats() and the stall warning say it: held by a worker, or queued
        assert waiting["diagnosis"].startswith("number 2 is "), waiting["diagnosis"]
        assert waiting["seconds"] >= 0
    assert waits[1]["waiting"]["seconds"] >= waits[0]["waiting"]["seconds"]

    # And once the gate opens, the rest comes in order, then a last report of
    # all 4 delivered, then the end
    redis_client.rpush(gate_key, 1)
    rest = [parse_event(chunk) for chunk in body]
    assert [(e.get("id"), e["data"]["value"]) for e in rest if e["event"] == "result"] == [
        ("2", "c"),
        ("3", "d"),
    ]
    *_, last, end = rest
    assert end == {"event": "end", "data": {"end": True, "total": 4}}
    final = progress_of(last)
    assert final.pop("rate") > 0
    assert final == {"delivered": 4, "claimed": 4, "total": 4, "waiting": None}


def test_a_stream_still_open_reports_it_waits_for_its_producer_and_no_total(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    # Given an open stream whose one outcome was delivered
    stream = make_stream()
    stream.put(echo, "a")
    body = ndjson_lines(stream, progress=0.05)
    assert json.loads(next(body)) == {"position": 0, "value": "a"}

    # When the body waits for more
    reports = [json.loads(next(body)) for _ in range(3)]

    # Then it reports what it knows: 1 delivered of 1 put so far, no total
    # yet, and the next position not put: it waits for the producer
    waiting = next(r for r in reports if r["waiting"] is not None)
    assert waiting["progress"] is True
    assert (waiting["delivered"], waiting["claimed"], waiting["total"]) == (1, 1, None)
    assert waiting["waiting"] == {
        "position": 1, "on": "producer", "seconds": None, "diagnosis": None,
    }  # fmt: skip

    # And once the producer puts the rest and closes, the total is known
    stream.put(echo, "b")
    stream.close()
    rest = [json.loads(line) for line in body]
    assert [r["value"] for r in rest if "value" in r] == ["b"]
    assert rest[-2]["total"] == 2
    assert rest[-1] == {"end": True, "total": 2}


def test_progress_events_are_throttled_to_one_per_interval(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    stream = make_stream()
    for n in range(5):
        stream.put(echo, n)
    stream.close()
    stream.join(timeout=30)

    # With an hour between reports: the first one, after the first outcome,
    # and the last one, before the end; none in between
    events = [parse_event(chunk) for chunk in sse_events(stream, progress=3600)][1:]
    kinds = [e["event"] for e in events]
    assert kinds == ["result", "progress", *["result"] * 4, "progress", "end"]
    first, last = progress_of(events[1]), progress_of(events[6])
    assert (first["delivered"], first["total"], first["waiting"]) == (1, 5, None)
    assert (last["delivered"], last["total"]) == (5, 5)

    # And without progress=, there are none
    again = make_stream()
    again.put("x")
    again.close()
    assert [parse_event(c).get("event") for c in sse_events(again)] == [None, "result", "end"]


def test_progress_of_any_iterable_counts_its_items(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    stream = make_stream()
    source = stream.map(check_positive, [1, -2, 3])
    lines = [json.loads(line) for line in ndjson_lines(source, progress=3600)]
    assert [line.get("position") for line in lines if "progress" not in line] == [0, 1, 2, None]
    reports = [line for line in lines if "progress" in line]
    assert [(r["delivered"], r["claimed"], r["total"]) for r in reports] == [
        (1, None, None),
        (3, 3, 3),
    ]
    assert lines[-2:] == [reports[-1], {"end": True, "total": 3}]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda s: stream_response(s, "xml"), ValueError, "'sse' (server-sent events"),
        (lambda s: stream_response(s, "ndjson", heartbeat=5), ValueError, "format='sse' only"),
        (lambda s: stream_response(s, heartbeat=0), ValueError, "seconds > 0"),
        (lambda s: stream_response(s, retry=-1), ValueError, "seconds > 0"),
        (lambda s: stream_response(s, progress=0), ValueError, "progress must be"),
        (lambda s: stream_response(s, "ndjson", progress=True), ValueError, "seconds > 0"),
        (lambda s: stream_response(s, heartbeat=float("inf")), ValueError, "finite"),
        (lambda s: stream_response(s, after=-1), ValueError, "int >= 0"),
        (lambda s: stream_response(s, on_disconnect="delete"), ValueError, "'keep'"),
        (lambda s: stream_response(s, default="str"), TypeError, "callable"),
        (lambda s: stream_response(s, tracebacks="yes"), TypeError, "True or False"),
        (lambda s: stream_response(s, colour="red"), TypeError, "colour"),
        (lambda s: stream_response(42), TypeError, "OrderedResultStream or an iterable"),
        (lambda s: sse_events("abc"), TypeError, "got str"),
    ],
)
def test_bad_arguments_fail_at_the_call(
    make_stream: Callable[..., OrderedResultStream],
    call: Callable[[OrderedResultStream], Any],
    error: type[Exception],
    words: str,
) -> None:
    stream = make_stream()
    with Flask(__name__).test_request_context("/"), pytest.raises(error, match=re.escape(words)):
        call(stream)
    assert stream.stats().closed is False, "a refused call leaves the stream alone"


def test_importing_the_flask_helper_without_flask_names_the_fix() -> None:
    code = "import sys; sys.modules['flask'] = None; import celery_ordered.contrib.flask"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "pip install 'celery-ordered[flask]'" in run.stderr


def test_sse_content_type_constant_matches_what_flask_sends(
    make_stream: Callable[..., OrderedResultStream], serve: Callable[..., FlaskClient]
) -> None:
    stream = make_stream()
    stream.close()
    response = serve(lambda: stream_response(stream, headers={"X-Job": "7"})).get("/stream")
    assert response.headers["Content-Type"] == SSE_CONTENT_TYPE
    assert response.headers["X-Job"] == "7"


def test_a_stream_that_went_back_in_time_ends_the_body_instead_of_looping(
    make_stream: Callable[..., OrderedResultStream], app: Any
) -> None:
    stream = make_stream()
    for i in range(3):
        stream.put(echo, i)
    body = ndjson_lines(stream)
    assert json.loads(next(body)) == {"position": 0, "value": 0}
    OrderedResultStream(app, stream.name).delete()  # the state is gone under the consumer
    # Every read would fail the same way: the body ends with the error, it
    # does not send failure after failure.
    at_most_ten = itertools.islice(body, 10)
    with pytest.raises(StreamStateLost, match="was deleted"):
        list(at_most_ten)


def test_a_redis_that_refuses_every_read_ends_the_body_instead_of_flooding_it(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a body reading a stream on a Redis of its own (markers: no worker)
    with RedisServer() as server:
        stream = OrderedResultStream(app, redis_url=server.url, window=100)
        for i in range(10):
            stream.put({"marker": i})
        body = ndjson_lines(OrderedResultStream(app, stream.name, redis_url=server.url))
        assert json.loads(next(body)) == {"position": 0, "value": {"marker": 0}}
        # When that Redis refuses every write from now on (out of memory; a
        # replica after a failover says READONLY the same way)
        redis.Redis.from_url(server.url).config_set("maxmemory", 1)
        try:
            # Then the body ends with Redis's error: no failure at the position
            # already sent, again and again, as fast as Redis answers
            at_most_ten = itertools.islice(body, 10)
            with (
                caplog.at_level(logging.WARNING, logger="celery_ordered"),
                pytest.raises(redis.ResponseError, match="OOM"),
            ):
                list(at_most_ten)
        finally:
            body.close()
        # and the body, as it ended, could not hand the stream on: said, not raised
        assert "could not hand it on" in caplog.text


def test_a_task_that_raised_a_redis_error_is_a_failure_at_its_place_and_the_body_goes_on(
    make_stream: Callable[..., OrderedResultStream],
) -> None:
    # Given a job whose second task failed on its own Redis (a cache, say)
    stream = make_stream()
    stream.put(echo, "a")
    stream.put(fail_redis_error, "cache:6379 is down")
    stream.put(echo, "c")
    stream.close()
    # Then that failure is an event at its place, as any task's, not the end
    # of the response (as an error of the stream's own Redis would be)
    lines = [json.loads(line) for line in ndjson_lines(stream)]
    assert lines == [
        {"position": 0, "value": "a"},
        {"position": 1, "error": {"type": "ConnectionError", "message": "cache:6379 is down"}},
        {"position": 2, "value": "c"},
        {"end": True, "total": 3},
    ]


def test_a_response_taken_over_by_a_reconnecting_client_ends_quietly(
    make_stream: Callable[..., OrderedResultStream], app: Any
) -> None:
    # Given an open stream, and the response a client followed up to position 0
    stream = make_stream()
    for value in "abc":
        stream.put(value)
    old = sse_events(OrderedResultStream(app, stream.name, prefetch=1))  # reads one at a time
    assert next(old) == OPEN
    assert parse_event(next(old))["data"] == {"position": 0, "value": "a"}
    # When the client reconnects (Last-Event-ID: 0): the new response takes over
    new = sse_events(OrderedResultStream(app, stream.name), after=0)
    assert next(new) == OPEN
    assert [parse_event(next(new))["data"]["value"] for _ in range(2)] == ["b", "c"]
    # Then the old response ends without an error (a server would log one as
    # a failed request, for every reconnect) and without an "end" event
    assert list(old) == []
    new.close()
