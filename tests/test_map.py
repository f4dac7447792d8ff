"""stream.map: lazy, ordered, and with chunksize > 1 many items per message."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from celery_ordered import UnsendableError
from tests.apps.tasks import (
    CustomError,
    check_positive,
    echo,
    inverse_or_fail,
    mark_request,
    request_seen,
    tagged_echo,
)
from tests.support.streams import outcomes
from tests.support.waiting import wait_until


@pytest.mark.parametrize("chunksize", [1, 7, 50])
def test_map_yields_every_item_in_order(worker: Any, make_stream: Any, chunksize: int) -> None:
    stream = make_stream(window=4)
    assert list(stream.map(echo, range(300), chunksize=chunksize)) == list(range(300))
    assert stream.stats().closed


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_failing_item_fails_only_its_own_place(
    worker: Any, make_stream: Any, chunksize: int
) -> None:
    stream = make_stream(window=3)
    seen = outcomes(stream.map(inverse_or_fail, [4, 2, 0, 1, -2, 0, 5], chunksize=chunksize))
    assert [type(x) for x in seen] == [float, float, CustomError, float, float, CustomError, float]
    assert seen[0] == 0.25
    assert seen[4] == -0.5
    error = seen[2]
    assert "no inverse of 0" in str(error)
    assert "inverse_or_fail" in error.stack_trace
    assert error.stream == stream.name


def test_a_chunk_runs_a_task_as_a_direct_call_of_it_would(worker: Any, make_stream: Any) -> None:
    # Given a bound task that reports its request, mapped in chunks of 3
    stream = make_stream(window=4)
    seen = list(stream.map(request_seen, range(5), chunksize=3))
    # Then each item saw what a direct call shows a task: its own arguments,
    # called directly, itself as Celery's current task, no task id
    assert seen == [[i, [i], True, True, None] for i in range(5)]


def test_an_item_of_a_chunk_sees_nothing_an_earlier_item_left_on_its_request(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=4)
    assert list(stream.map(mark_request, range(4), chunksize=4)) == [False] * 4


def test_a_chunk_calls_a_task_whose_class_has_its_own_call_through_it_for_each_item(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=4)
    assert list(stream.map(tagged_echo, range(5), chunksize=3)) == [["tagged", i] for i in range(5)]


def test_a_task_failing_on_one_item_of_a_chunk_fails_only_that_item(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=4)
    seen = outcomes(stream.map(check_positive, [1, -2, 3, -4], chunksize=4))
    assert [type(x) for x in seen] == [int, ValueError, int, ValueError]
    assert seen[0::2] == [1, 3]
    assert "-2 is negative" in str(seen[1])
    assert "check_positive" in seen[1].stack_trace


def test_chunked_map_over_an_endless_generator_keeps_the_window(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=3)
    results = stream.map(echo, itertools.count(), chunksize=10)
    first = list(itertools.islice(results, 95))
    assert first == list(range(95))
    stats = stream.stats()
    # The window counts chunks: at most 3 are ahead of the consumer.
    assert stats.claimed - stats.delivered <= 3
    assert not stats.closed


def test_a_chunk_shows_its_size_not_its_items_in_messages_and_worker_logs(
    app: Any, start_worker: Any, make_stream: Any
) -> None:
    # Given a worker that logs each task's return value (INFO), and a hook on
    # the messages this process sends, as a monitor such as Flower sees them
    from celery import signals

    worker = start_worker(concurrency=1, loglevel="INFO")
    sent: list[str] = []

    def seen_sent(headers: dict[str, Any] | None = None, **_: Any) -> None:
        if headers and headers.get("task") == "celery_ordered.chunk":
            sent.append(headers["argsrepr"])

    signals.before_task_publish.connect(seen_sent, weak=False)
    try:
        # When a map sends 25 items in chunks of 10
        stream = make_stream(window=4, task_options={"queue": worker.queue})
        assert list(stream.map(echo, range(25), chunksize=10)) == list(range(25))
    finally:
        signals.before_task_publish.disconnect(seen_sent)
    # Then each chunk's message and log line give its size: a chunk's items
    # are not walked to build a text of them (that cost more than the chunk's work)
    assert sent == [f"('task:{echo.name}', <{n} items>)" for n in (10, 10, 5)]
    # (a worker logs a task's success just after it published the outcome)
    log = wait_until(
        lambda: (text := worker.output()).count(" outcomes>") >= 3 and text,
        "the worker's three success lines",
    )
    assert [
        line.rsplit(": ", 1)[1]
        for line in log.splitlines()
        if "celery_ordered.chunk[" in line and "succeeded in" in line
    ] == [
        "<10 outcomes>",
        "<10 outcomes>",
        "<5 outcomes>",
    ]


def test_map_refuses_what_workers_cannot_run(make_stream: Any) -> None:
    import os

    stream = make_stream()
    with pytest.raises(UnsendableError, match="ordered_function_modules"):
        stream.map(os.getcwd, [1], chunksize=5)
    with pytest.raises(ValueError, match="chunksize"):
        stream.map(echo, [1], chunksize=0)
    assert stream.stats().claimed == 0


@pytest.mark.parametrize("chunksize", [1, 5])
def test_map_of_a_non_callable_is_refused_at_the_call_and_the_stream_goes_on(
    worker: Any, make_stream: Any, chunksize: int
) -> None:
    stream = make_stream(window=4)
    stream.put(echo, "before")
    with pytest.raises(TypeError, match="not callable: pass the task"):
        stream.map(5, [1, 2], chunksize=chunksize)
    # Nothing was put or closed: the stream takes more work, and ends normally
    assert stream.stats().claimed == 1
    stream.put(echo, "after")
    stream.close()
    assert list(stream) == ["before", "after"]


def test_a_starmap_item_that_is_not_a_tuple_is_refused_at_its_place(
    worker: Any, make_stream: Any
) -> None:
    stream = make_stream(window=4)
    seen = outcomes(stream.starmap(echo, [("a",), 7, ("b",)]))
    assert seen[0] == "a"
    assert seen[2] == "b"
    assert isinstance(seen[1], TypeError)
    assert "starmap() got the item 7, which is not a tuple of arguments" in str(seen[1])


def test_module_level_imap_runs_on_a_private_stream_and_removes_it(
    app: Any, worker: Any, redis_client: Any
) -> None:
    import celery_ordered

    before = set(redis_client.scan_iter(match="co:{*}:window"))
    results = celery_ordered.imap(inverse_or_fail, [1, 2, 0, 4], app=app, chunksize=2, window=2)
    seen = outcomes(results)
    assert seen[:2] == [1.0, 0.5]
    assert isinstance(seen[2], CustomError)
    assert seen[3] == 0.25
    # The iteration ended: the private stream is gone.
    assert set(redis_client.scan_iter(match="co:{*}:window")) == before


def test_a_send_that_fails_inside_a_batch_fails_only_its_own_place(
    worker: Any, make_stream: Any, app: Any
) -> None:
    # Given a map whose blocks go out in one batch, and one item whose message
    # kombu refuses to build (an unknown compression) in the middle of a block
    from celery_ordered import DispatchError
    from celery_ordered.maps import OrderedMap

    stream = make_stream(window=8)
    items = [echo.s(1), echo.s(2).set(compression="no-such-codec"), echo.s(3), echo.s(4)]
    # When the map runs them (ready-made signatures, as map(chunksize=N) sends its chunks)
    seen = outcomes(OrderedMap(stream, None, iter(items), timeout=30))
    # Then the refused send raises at its place, and the rest of its batch went out
    assert [type(x) for x in seen] == [int, DispatchError, int, int]
    assert seen[0] == 1
    assert seen[2:] == [3, 4]
    assert "no-such-codec" in str(seen[1])
    assert seen[1].seq == 1
    assert stream.stats().claimed == 4
