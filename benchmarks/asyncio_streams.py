"""Many streams followed on one event loop, against one thread per stream.

Run from the repository root (see benchmarks/README.md)::

    python benchmarks/asyncio_streams.py [--quick] [--tasks N] [--streams 1,10,100]
                                         [--redis-url URL | --private-redis]

For each number of streams, in the same run and on the same worker (prefork,
2 processes, a queue of its own), two consumer processes follow that many
streams, each in a fresh process:

- ``asyncio``: one event loop, one ``AsyncOrderedResultStream`` per stream,
  each consumed by ``async for`` in a task of its own;
- ``threads``: one ``OrderedResultStream`` per stream, each consumed by a
  thread of its own (``for outcome in stream``).

The consumers only consume: this process produces into every stream (an
asyncio producer per stream), so the consumer process holds nothing but its
consumers. Each task (``ordered_stamp``) returns ``time.time()`` as it
finishes; the consumer takes ``time.time()`` minus that as each outcome is
handed out: the latency from the worker's publish to the hand-out. Memory:
the consumer process's peak RSS growth while it follows the streams (VmHWM
after a reset, minus the RSS once warmed up) and tracemalloc's peak (Python
allocations only: no thread stacks), the latter from a second consumer
process of its own, since tracing every allocation slows the first figures
(an event loop's most). Threads: the most the consumer process ran at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    DEFAULT_REDIS,
    PROCESSES,
    TIMEOUT,
    WINDOW,
    BenchError,
    broker_url,
    check_worker,
    chosen_redis,
    clean,
    percentile,
    progress,
    start_worker,
    version,
)

#: Numbers of concurrent streams measured, each against as many threads.
STREAMS = (1, 10, 100)
#: Tasks per row, split evenly among its streams.
TASKS = 2000
QUICK_TASKS = 500
MODES = ("asyncio", "threads")


# -- the consumer process ---------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Make VmHWM the current RSS (Linux 4.0+); False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class Samples:
    """Latencies in seconds, and the most threads seen, across the consumers."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.threads = threading.active_count()
        self._lock = threading.Lock()

    def add(self, stamp: float) -> None:
        now = time.time()
        with self._lock:
            self.latencies.append(now - stamp)
            self.threads = max(self.threads, threading.active_count())


def follow_with_asyncio(
    app: Any, names: list[str], samples: Samples, ready: Callable[[], None]
) -> None:
    from celery_ordered import AsyncOrderedResultStream

    async def main() -> None:
        streams = [AsyncOrderedResultStream(app, name, create=False) for name in names]
        await asyncio.gather(*(stream.open() for stream in streams))

        async def follow(stream: AsyncOrderedResultStream) -> None:
            async for stamp in stream:
                samples.add(stamp)

        following = [asyncio.create_task(follow(stream)) for stream in streams]
        await asyncio.sleep(0)  # every consumer starts: its first read is on its way
        ready()
        await asyncio.wait_for(asyncio.gather(*following), TIMEOUT)

    asyncio.run(main())


def follow_with_threads(
    app: Any, names: list[str], samples: Samples, ready: Callable[[], None]
) -> None:
    from celery_ordered import OrderedResultStream

    streams = [OrderedResultStream(app, name, create=False) for name in names]
    errors: list[BaseException] = []

    def follow(stream: OrderedResultStream) -> None:
        try:
            for stamp in stream:
                samples.add(stamp)
        except BaseException as exc:  # reported by the process
            errors.append(exc)

    threads = [threading.Thread(target=follow, args=(stream,), daemon=True) for stream in streams]
    for thread in threads:
        thread.start()
    ready()
    for thread in threads:
        thread.join(TIMEOUT)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise BenchError(f"a consumer thread did not finish within {TIMEOUT}s")


def warm_up(app: Any, mode: str, name: str) -> None:
    """One outcome through a stream of ``mode``: every module and client in place."""
    from benchmarks.bench_app import QUEUE, ordered_stamp
    from celery_ordered import AsyncOrderedResultStream, OrderedResultStream

    if mode == "threads":
        stream = OrderedResultStream(app, name, window=WINDOW, task_options={"queue": QUEUE})
        stream.put(ordered_stamp, 0)
        stream.get(timeout=TIMEOUT)
        stream.delete()
        return

    async def main() -> None:
        stream = AsyncOrderedResultStream(app, name, window=WINDOW, task_options={"queue": QUEUE})
        await stream.put(ordered_stamp, 0)
        await stream.get(timeout=TIMEOUT)
        await stream.delete()

    asyncio.run(main())


def consumer_process(mode: str, names: list[str], traced: bool) -> None:
    """Follow ``names``; print "ready" once following, then one JSON line of results.

    ``traced``: with tracemalloc on, for its peak only; it slows every
    allocation, and the event loop's many small ones most, so the other
    figures come from a run without it.
    """
    from benchmarks.bench_app import app

    warm_up(app, mode, f"{names[0]}-warm")
    baseline = _status_kib("VmRSS")
    peak_resets = _reset_peak_rss()
    if traced:
        tracemalloc.start()
    samples = Samples()

    def ready() -> None:
        print("ready", flush=True)

    began, cpu = time.perf_counter(), time.process_time()
    follow = follow_with_asyncio if mode == "asyncio" else follow_with_threads
    follow(app, names, samples, ready)
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    _, traced_peak = tracemalloc.get_traced_memory()
    peak = _status_kib("VmHWM") if peak_resets else _status_kib("VmRSS")
    print(
        json.dumps(
            {
                "latencies": samples.latencies,
                "threads": samples.threads,
                "rss_growth_kib": peak - baseline,
                "peak_is_hwm": peak_resets,
                "traced_peak": traced_peak,
                "seconds": elapsed,
                "cpu_seconds": cpu,
            }
        ),
        flush=True,
    )


# -- the run ----------------------------------------------------------------------------------


async def produce(app: Any, names: list[str], per_stream: int, queue: str) -> None:
    """Put ``per_stream`` stamping tasks into each stream, then close it."""
    from benchmarks.bench_app import ordered_stamp
    from celery_ordered import AsyncOrderedResultStream

    async def one(name: str) -> None:
        stream = AsyncOrderedResultStream(app, name, window=WINDOW, task_options={"queue": queue})
        async with stream:
            for n in range(per_stream):
                await stream.put(ordered_stamp, n, timeout=TIMEOUT)

    await asyncio.wait_for(asyncio.gather(*(one(name) for name in names)), TIMEOUT)


def measure(
    mode: str, streams: int, per_stream: int, run_id: str, worker: Any, *, traced: bool = False
) -> dict[str, Any]:
    """``streams`` streams followed by a fresh consumer process of ``mode``."""
    from benchmarks.bench_app import QUEUE, app
    from celery_ordered import OrderedResultStream

    names = [f"co-bench-{run_id}-{mode}-{streams}-{traced:d}-{i}" for i in range(streams)]
    for name in names:  # created here, so the consumers attach by name
        OrderedResultStream(app, name, window=WINDOW)
    trace = ["--trace"] if traced else []
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.asyncio_streams", *trace, "--consume", mode, *names],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise BenchError(f"the {mode} consumer of {streams} streams did not start")
        asyncio.run(produce(app, names, per_stream, QUEUE))
        out, _ = child.communicate(timeout=TIMEOUT)
        check_worker(worker)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise BenchError(f"the {mode} consumer of {streams} streams exited with {child.returncode}")
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if len(row["latencies"]) != streams * per_stream:
        raise BenchError(f"{mode}: {len(row['latencies'])} outcomes, not {streams * per_stream}")
    return row


def render(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "celery-ordered: many streams on one event loop against one thread per stream",
        f"machine: nproc={os.cpu_count()}, versions: python {sys.version.split()[0]}, "
        f"celery {version('celery')}, redis-py {version('redis')}, "
        f"redis-server {machine['redis_server']}",
        f"redis: {machine['redis_url']} ({machine['redis_source']}); worker: prefork, "
        f"concurrency={PROCESSES}; window={WINDOW}; a fresh consumer process per row",
        "latency: task end (its time.time()) -> the consumer hands the outcome out;",
        "CPU: the consumer process's CPU time while it follows the streams, per outcome",
        "",
        f"   {'streams':>7} {'consumers':<22} {'outcomes':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/outcome':>14} {'RSS growth MiB':>15} {'tracemalloc MiB':>16} {'threads':>8}",
    ]
    labels = {"asyncio": "asyncio, 1 event loop", "threads": "threads, 1 per stream"}
    for row in rows:
        latencies = row["latencies"]
        p50, p99 = (percentile(latencies, q) * 1000 for q in (0.5, 0.99))
        lines.append(
            f"   {row['streams']:>7} {labels[row['mode']]:<22} {len(latencies):>8} "
            f"{p50:>8.2f} {p99:>8.2f} {row['cpu_seconds'] / len(latencies) * 1e6:>14.0f} "
            f"{row['rss_growth_kib'] / 1024:>15.1f} {row['traced_peak'] / 2**20:>16.2f} "
            f"{row['threads']:>8}"
        )
    if not all(row["peak_is_hwm"] for row in rows):
        lines.append("   (RSS growth at the end, not the peak: /proc/self/clear_refs refused)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    run_id = uuid.uuid4().hex[:8]
    queue = f"co-bench-{run_id}"
    with chosen_redis(args) as (redis_url, redis_source):
        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_BROKER_URL"] = broker_url(redis_url)
        os.environ["BENCH_QUEUE"] = queue
        client = redis.Redis.from_url(redis_url)
        machine = {
            "redis_url": redis_url,
            "redis_source": redis_source,
            "redis_server": client.info("server").get("redis_version", "?"),
        }
        progress(f"starting the worker on queue {queue} ({redis_url})")
        worker = start_worker("benchmarks.bench_app", queue)
        rows: list[dict[str, Any]] = []
        try:
            _wait_ready(worker, run_id)
            for streams in args.streams:
                per_stream = max(1, args.tasks // streams)
                for mode in MODES:
                    progress(f"{streams} stream(s), {mode}: {streams * per_stream} tasks")
                    row = measure(mode, streams, per_stream, run_id, worker)
                    traced = measure(mode, streams, per_stream, run_id, worker, traced=True)
                    row["traced_peak"] = traced["traced_peak"]
                    rows.append({"mode": mode, "streams": streams, **row})
        finally:
            worker.stop()
            clean(client, queue, run_id)
    return render(rows, machine)


def _wait_ready(worker: Any, run_id: str) -> None:
    """Return once the worker has run a stream's task."""
    from benchmarks.bench_app import QUEUE, app, ordered_noop
    from celery_ordered import OrderedResultStream

    stream = OrderedResultStream(app, f"co-bench-{run_id}-ready", task_options={"queue": QUEUE})
    stream.put(ordered_noop, 7)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(Exception):
            if stream.get(timeout=1) == 7:
                break
        check_worker(worker)
        if time.monotonic() > deadline:
            raise BenchError("the worker ran no task within 60 s")
    stream.delete()
    progress("worker ready")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Many streams on one event loop against one thread per stream."
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TASKS} tasks per row")
    parser.add_argument("--tasks", type=int, help=f"tasks per row (default {TASKS})")
    parser.add_argument(
        "--streams",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        default=list(STREAMS),
        help="comma-separated numbers of streams (default 1,10,100)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help=f"Redis to use (default {DEFAULT_REDIS} if it answers)")
    where.add_argument(
        "--private-redis", action="store_true", help="always start a private redis-server"
    )
    parser.add_argument("--consume", nargs="+", metavar=("MODE", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (QUICK_TASKS if args.quick else TASKS)
    if args.tasks < 1 or min(args.streams, default=1) < 1:
        parser.error("--tasks and --streams must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.consume:  # the consumer process of one row
        mode, *names = args.consume
        consumer_process(mode, names, args.trace)
        return 0
    began = time.perf_counter()
    print(run(args))
    print(f"\nrun took {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
