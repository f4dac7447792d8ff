"""The soak: 100,000 items through one stream, with real workers and a real Redis.

Marked ``slow`` (CI runs it: ``.ci/run`` runs the whole suite). One consumer
process maps a plain function over 100,000 numbers in chunks, checks every
result arrives once and in order, and notes as it goes its own resident
memory and the memory the stream's keys take in Redis (``MEMORY USAGE`` of
every key a ``SCAN`` finds). The test asserts both stay flat: what a stream
holds is bounded by its window, however many items go through it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("worker")]

#: The consumer: ``map`` over the numbers, in chunks; prints a JSON line of
#: its memory (KiB, from /proc) and the stream's memory in Redis (bytes) at
#: each checkpoint, then ``{"done": count}``.
SOAK = textwrap.dedent(
    """
    import json, sys
    import redis
    from celery_ordered import OrderedResultStream
    from tests.apps import faults
    from tests.apps.celeryapp import app

    name, redis_url = sys.argv[1], sys.argv[2]
    window, count, chunksize = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    client = redis.Redis.from_url(redis_url)

    def memory():
        status = dict(
            line.split(":", 1) for line in open("/proc/self/status").read().splitlines()
        )
        return {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}

    def stream_bytes():
        keys = list(client.scan_iter(match="co:{%s}:*" % name, count=1000))
        return sum(client.memory_usage(key, samples=0) or 0 for key in keys)

    stream = OrderedResultStream(app, name, window=window)
    checkpoints = {count * k // 20 for k in range(1, 21)}
    done = 0
    for n, square in enumerate(stream.map(faults.square, range(count), chunksize=chunksize)):
        if square != n * n:
            sys.exit(f"item {n}: {square!r} where {n * n} was due")
        done = n + 1
        if done in checkpoints:
            print(json.dumps({"items": done, "redis": stream_bytes(), **memory()}), flush=True)
    print(json.dumps({"done": done, "claimed": stream.stats().claimed}), flush=True)
    """
)


def test_a_hundred_thousand_items_in_order_none_lost_memory_flat(
    make_stream: Any, redis_url: str
) -> None:
    # Given a stream with a window of 16 chunks of 5 items (20,000 chunks: 1,250 windows)
    window, count, chunksize = 16, 100_000, 5
    stream = make_stream(window=window)  # deleted after the test
    # When a consumer process maps over 100,000 numbers through it
    ran = subprocess.run(
        [sys.executable, "-c", SOAK, stream.name, redis_url,
         str(window), str(count), str(chunksize)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    *points, last = (json.loads(line) for line in ran.stdout.splitlines())
    # Then every item came back once, in order (the consumer checked each),
    # and the stream ends with every chunk claimed
    assert last == {"done": count, "claimed": count // chunksize}
    assert [p["items"] for p in points] == [count * k // 20 for k in range(1, 21)]
    # And the consumer's memory is flat: after a tenth of the items (warmed
    # up), neither what it holds nor its peak grows
    warm, end = points[1], points[-1]
    assert end["VmRSS"] - warm["VmRSS"] < 1024, points  # KiB
    assert end["VmHWM"] - warm["VmHWM"] < 1024, points
    # And so is the stream in Redis: at most about a window of chunks, at
    # every checkpoint (a chunk and its dispatch record are well under 1 KiB;
    # the keys' own overhead is a few KiB), where 20,000 chunks kept would
    # take megabytes
    bound = window * 1024 + 16 * 1024
    assert max(p["redis"] for p in points) <= bound, points
    assert end["redis"] <= 2 * max(warm["redis"], 16 * 1024), points
