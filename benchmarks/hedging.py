"""Hedging: a stream's stragglers with and without backup copies, against group().get().

Run from the repository root::

    python benchmarks/hedging.py [--tasks N] [--repeats N] [--redis-url URL | --private-redis]

1,000 tasks (``--tasks``) of 1 to 5 ms each, 1% of whose *runs* are 50 times
slower (a straggling process, not a heavy input: a second run of the same
task is most likely fast again). Three rows, measured in turn in each repeat
on the same worker (prefork, 2 processes, Celery's default prefetch): plain
Celery's ``group(...).apply_async().get()``, an ordered stream, and an ordered
stream with ``hedge=True`` (a backup copy of the task the consumer waits for
once it has run 4 times the stream's typical run time). It prints the median
total time of each and how many backups were sent; progress goes to stderr.
The worker imports this module as its app (``benchmarks.hedging``).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from celery import Celery, group  # noqa: E402

from benchmarks import harness  # noqa: E402
from celery_ordered import OrderedResultStream, OrderedTask  # noqa: E402
from celery_ordered.redis.urls import socket_url  # noqa: E402

#: The tasks: each runs LOW_MS..HIGH_MS; SLOW_SHARE of runs are SLOWDOWN times slower.
LOW_MS, HIGH_MS, SLOW_SHARE, SLOWDOWN = 1.0, 5.0, 0.01, 50.0

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

# The worker's app, and the one the run sends with: configured from the
# environment the run sets for itself and its worker.
app = Celery("hedging", set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER_URL", REDIS_URL),
    result_backend=socket_url(REDIS_URL, kombu=True),
    ordered_redis_url=REDIS_URL,
    task_default_queue=os.environ.get("BENCH_QUEUE", "co-bench-hedging"),
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(base=OrderedTask, name="benchmarks.hedging.jittery")
def jittery(value: int) -> int:
    """Return ``value`` after 1-5 ms of work; 1% of runs take 50 times longer."""
    seconds = random.uniform(LOW_MS, HIGH_MS) / 1000
    if random.random() < SLOW_SHARE:
        seconds *= SLOWDOWN
    time.sleep(seconds)
    return value


class Run:
    """The worker, the Redis and the names of one run."""

    def __init__(self, redis_url: str, queue: str, worker: Any, run_id: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.queue = queue
        self.worker = worker
        self.run_id = run_id
        self._count = 0

    def name(self, what: str) -> str:
        """A stream name or task id unique to this run."""
        self._count += 1
        return f"co-bench-{self.run_id}-{what}-{self._count}"

    def group_get(self, n: int) -> tuple[float, int]:
        """Seconds for ``group(...).apply_async().get()`` of ``n`` tasks; no backups."""
        signatures = [jittery.s(i).set(task_id=self.name("task")) for i in range(n)]
        began = time.perf_counter()
        result = group(signatures).apply_async(queue=self.queue)
        values = result.get(timeout=harness.TIMEOUT)
        elapsed = time.perf_counter() - began
        self.redis.delete(*(f"celery-task-meta-{r.id}" for r in result.results))
        if values != list(range(n)):
            raise harness.BenchError("group().get() gave wrong values")
        return elapsed, 0

    def stream(self, n: int, hedge: bool) -> tuple[float, int]:
        """Seconds to put ``n`` tasks and take their outcomes in order; backups sent."""
        stream = OrderedResultStream(
            app, self.name("stream"), window=harness.WINDOW, task_options={"queue": self.queue},
            hedge=hedge,
        )  # fmt: skip
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                with stream:
                    for i in range(n):
                        stream.put(jittery, i)
            except BaseException as exc:
                errors.append(exc)

        began = time.perf_counter()
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        values = [stream.get(timeout=harness.TIMEOUT) for _ in range(n)]
        elapsed = time.perf_counter() - began
        producer.join(harness.TIMEOUT)
        backups = stream.stats().hedged
        stream.delete()
        if errors:
            raise harness.BenchError(f"the producer failed: {errors[0]!r}") from errors[0]
        if values != list(range(n)):
            raise harness.BenchError("the stream gave wrong values")
        return elapsed, backups


ROWS = (
    ("group().get()", lambda run, n: run.group_get(n)),
    ("ordered stream", lambda run, n: run.stream(n, hedge=False)),
    ("ordered stream, hedge=True", lambda run, n: run.stream(n, hedge=True)),
)


def measure(args: argparse.Namespace) -> None:
    """Start the worker, run every row ``args.repeats`` times in turn, print the table."""
    with harness.chosen_redis(args) as (redis_url, where):
        run_id = uuid.uuid4().hex[:8]
        queue = f"co-bench-{run_id}"
        env = {"BENCH_REDIS_URL": redis_url, "BENCH_BROKER_URL": harness.broker_url(redis_url),
               "BENCH_QUEUE": queue}  # fmt: skip
        os.environ.update(env)
        app.conf.update(
            broker_url=env["BENCH_BROKER_URL"],
            result_backend=socket_url(redis_url, kombu=True),
            ordered_redis_url=redis_url,
            task_default_queue=queue,
        )
        harness.progress(f"Redis: {where}; starting the worker")
        worker = harness.start_worker("benchmarks.hedging", queue, extra_env=env)
        run = Run(redis_url, queue, worker, run_id)
        times: dict[str, list[float]] = {label: [] for label, _ in ROWS}
        backups: dict[str, list[int]] = {label: [] for label, _ in ROWS}
        try:
            run.group_get(2 * harness.PROCESSES)  # the worker is up: it ran a group
            harness.check_worker(worker)
            for repeat in range(args.repeats):
                for label, row in ROWS:
                    harness.progress(f"repeat {repeat + 1}/{args.repeats}: {label}")
                    elapsed, sent = row(run, args.tasks)
                    times[label].append(elapsed)
                    backups[label].append(sent)
                    harness.check_worker(worker)
        finally:
            worker.stop()
            run.redis.delete(queue)
    baseline = statistics.median(times[ROWS[0][0]])
    versions = (
        f"celery-ordered {harness.version('celery-ordered')}, Celery {harness.version('celery')}"
    )
    print(f"{versions}, Python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(
        f"{args.tasks} tasks of {LOW_MS:g}-{HIGH_MS:g} ms, {SLOW_SHARE:.0%} of runs "
        f"{SLOWDOWN:g}x slower; {harness.PROCESSES} worker processes (prefork, default prefetch), "
        f"window {harness.WINDOW}; median of {args.repeats}"
    )
    print(f"{'row':<28} {'total s':>8} {'vs group().get()':>17} {'backups sent':>13}")
    for label, _ in ROWS:
        median = statistics.median(times[label])
        print(
            f"{label:<28} {median:>8.2f} {median / baseline:>16.2f}x "
            f"{statistics.median(backups[label]):>13g}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per row (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per row (default 3)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help="Redis to use (default: the machine's, database 14)")
    where.add_argument(
        "--private-redis", action="store_true", help="always start a private redis-server"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a run failed."""
    try:
        measure(parse_args(argv))
    except harness.BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
