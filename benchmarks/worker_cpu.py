"""A worker's CPU per task on a full queue: plain Celery, late acks, an ordered task, a stream's.

Run from the repository root (see benchmarks/README.md)::

    python benchmarks/worker_cpu.py [--tasks N] [--repeats N] [--redis-url URL]

The same trivial task body (an INCR on the machine's Redis) four ways, on
one prefork worker with 2 processes:

- ``plain``: a plain Celery task (``ignore_result``), acknowledged as it starts;
- ``acks_late``: the same, acknowledged after it ran (as ordered tasks are);
- ``ordered``: an ``@ordered_task`` sent with ``apply_async``, no stream: it
  runs as a plain Celery task;
- ``stream``: the same ordered task put into a stream: it also publishes its
  outcome into the stream (one script call) and its message carries the
  stream's headers, which the worker's heartbeat notes.

Each run first queues all its messages on a queue no worker reads, then
renames that list to the worker's queue in one command, so the worker meets a
full queue and never waits for a producer: what it spends per task is its own
work, not the producer's pace (a starved worker spends more per task, waking
up for each message). The table gives the worker's CPU (main and pool
processes, user and system) per task, split between its main process and
its pool processes, and its rate, medians and ranges over the repeats, the
ways taking turns within each repeat. The main process (Celery's consumer:
it fetches each message, hands it to a pool process and acknowledges it) is
one process, so its CPU per task bounds the worker's rate whatever the pool
does; a stream's publish runs in the pool processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    BenchError,
    broker_url,
    chosen_redis,
    clean,
    progress,
    start_worker,
)
from benchmarks.run import Context  # noqa: E402
from tests.support.processes import group_cpu, process_cpu  # noqa: E402

WAYS = ("plain", "acks_late", "ordered", "stream")


def _queue_messages(ctx: Context, way: str, hold: str, n: int, counter: str, done: str) -> Any:
    """Send the run's ``n`` messages to ``hold``; the stream for ``stream`` (else None)."""
    args = (counter, done, n)
    if way == "stream":
        from celery_ordered import OrderedResultStream

        stream = OrderedResultStream(
            ctx.app, ctx.name("stream"), window=n, task_options={"queue": hold}
        )
        for _ in range(n):
            stream.put(ctx.tasks.ordered_count, *args)
        return stream
    task = {
        "plain": ctx.tasks.count,
        "acks_late": ctx.tasks.count_late,
        "ordered": ctx.tasks.ordered_count,
    }[way]
    for _ in range(n):
        task.apply_async(args, queue=hold, ignore_result=True)
    return None


def one_run(ctx: Context, way: str, n: int) -> tuple[float, float, float]:
    """Of one way on a full queue: tasks per second, and the worker's CPU
    microseconds per task, in all and in its main process."""
    counter, done, hold = ctx.name("counter"), ctx.name("done"), ctx.name("hold")
    stream = _queue_messages(ctx, way, hold, n, counter, done)
    try:
        if ctx.redis.llen(hold) != n:
            raise BenchError(f"{way}: {ctx.redis.llen(hold)} messages queued, not {n}")
        pid = ctx.worker.proc.pid
        cpu, main, began = group_cpu(pid), process_cpu(pid), time.perf_counter()
        ctx.redis.rename(hold, ctx.queue)  # the worker meets a full queue at once
        ctx.blpop(done)
        elapsed, used = time.perf_counter() - began, group_cpu(pid) - cpu
        used_main = process_cpu(pid) - main
        if stream is not None and [stream.get(timeout=60) for _ in range(n)] != [n] * n:
            raise BenchError("the stream's outcomes are not the tasks' return values")
    finally:
        if stream is not None:
            stream.delete()
        ctx.redis.delete(counter, done, hold)
    return n / elapsed, used * 1e6 / n, used_main * 1e6 / n


def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    queue = f"co-bench-{run_id}"
    results: dict[str, Any] = {way: {"rates": [], "cpu": [], "main": []} for way in WAYS}
    with chosen_redis(args) as (redis_url, _):
        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_BROKER_URL"] = broker_url(redis_url)
        os.environ["BENCH_QUEUE"] = queue
        worker = start_worker("benchmarks.bench_app", queue)
        try:
            ctx = Context(redis_url, queue, worker, run_id)
            ctx.wait_ready()
            for way in WAYS:  # warm-up: the pool's connections, imports, caches
                one_run(ctx, way, 100)
            for repeat in range(args.repeats):
                for way in WAYS:
                    rate, cpu, main = one_run(ctx, way, args.tasks)
                    results[way]["rates"].append(rate)
                    results[way]["cpu"].append(cpu)
                    results[way]["main"].append(main)
                progress(f"run {repeat + 1} of {args.repeats} done")
        finally:
            worker.stop()
            clean(redis.Redis.from_url(redis_url), queue, run_id)
    return results


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"one prefork worker, 2 processes; {args.tasks:,} tasks on a full queue x "
        f"{args.repeats} runs (medians, ranges)\n",
        "| way | worker CPU us/task | range | main process | pool processes | tasks/s | range |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for way in WAYS:
        cpu, main, rates = results[way]["cpu"], results[way]["main"], results[way]["rates"]
        pool = [c - m for c, m in zip(cpu, main, strict=True)]
        lines.append(
            f"| {way} | {statistics.median(cpu):,.0f} | {min(cpu):,.0f}-{max(cpu):,.0f} | "
            f"{statistics.median(main):,.0f} | {statistics.median(pool):,.0f} | "
            f"{statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--redis-url", default=None, help="the broker's Redis")
    parser.add_argument("--private-redis", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    print(render(run(args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
