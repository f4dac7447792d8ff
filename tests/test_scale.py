"""Many streams at once, and one stream served by several worker nodes."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from click.testing import CliRunner

from celery_ordered.cli import main as standalone
from tests.apps import faults
from tests.apps.tasks import echo


def test_a_hundred_concurrent_streams_stay_isolated_and_ordered(
    worker: Any, make_stream: Any, redis_url: str
) -> None:
    # Given 100 streams, fed at once by 4 producer threads, 10 tasks each
    tag = uuid.uuid4().hex[:6]
    # (a window of 10 holds a whole stream: the consumer drains one at a time)
    streams = [make_stream(name=f"test-many-{tag}-{i:03}", window=10) for i in range(100)]

    def produce(part: list[Any]) -> None:
        for round_ in range(10):
            for stream in part:
                stream.put(echo, [stream.name, round_])
        for stream in part:
            stream.close()

    producers = [threading.Thread(target=produce, args=(streams[i::4],)) for i in range(4)]
    for producer in producers:
        producer.start()
    # Then `ls` shows all of them while they run
    listing = CliRunner().invoke(standalone, ["ordered", "--redis-url", redis_url, "ls"])
    assert listing.exit_code == 0, listing.output
    assert sum(f"test-many-{tag}-" in line for line in listing.output.splitlines()) == 100
    # And each stream holds its own results only, in its own order
    for stream in streams:
        assert list(stream) == [[stream.name, r] for r in range(10)]
    for producer in producers:
        producer.join()


def test_workers_on_two_nodes_serve_one_stream_routed_to_their_queue(
    start_worker: Any, make_stream: Any
) -> None:
    # Given two worker nodes (different node names) consuming one chosen queue
    queue = f"routed-{uuid.uuid4().hex[:6]}"
    first = start_worker(concurrency=1, queue=queue)
    second = start_worker(concurrency=1, queue=queue)
    assert first.pid != second.pid
    # When a stream routes its tasks to that queue
    stream = make_stream(window=8, task_options={"queue": queue})
    results = list(stream.map(faults.where, range(60)))
    # Then both nodes took part, and the results are in order
    assert [x for x, _ in results] == list(range(60))
    nodes = {node for _, node in results}
    assert len(nodes) == 2, nodes
