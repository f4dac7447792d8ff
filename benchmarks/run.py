"""Benchmarks of celery-ordered against plain Celery and multiprocessing.

Run from the repository root (see benchmarks/README.md)::

    python benchmarks/run.py [--quick] [--repeats N] [--tasks N]
                             [--redis-url URL | --private-redis] [--json FILE]

It starts one Celery worker subprocess (prefork, 2 processes, a queue of its
own) and measures, in one run: throughput, delivery latency, the consumer's
peak RSS and a run of uneven task durations. It prints the machine and a
plain-text table; ``--json`` also saves the raw numbers.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from tests.support.workers import Worker

#: Uneven durations: how many tasks, how many of them slow, and the seed.
UNEVEN_TASKS = 200
UNEVEN_SLOW = 10
UNEVEN_SEED = 20240601


class Context:
    """What every benchmark needs: the app, its tasks, Redis, the worker."""

    def __init__(self, redis_url: str, queue: str, worker: Worker, run_id: str) -> None:
        from benchmarks import bench_app

        self.tasks = bench_app
        self.app = bench_app.app
        self.redis = redis.Redis.from_url(redis_url)
        self.redis_url = redis_url
        self.queue = queue
        self.worker = worker
        self.run_id = run_id
        #: CPU seconds of the producer threads of the rows that put from one.
        self.producer_cpu: list[float] = []
        self._names = 0
        self._tasks = 0

    def name(self, what: str) -> str:
        """A key or stream name unique to this run."""
        self._names += 1
        return f"co-bench-{self.run_id}-{what}-{self._names}"

    def task_id(self) -> str:
        """A task id with the run's prefix, so its result key is known to be ours."""
        self._tasks += 1
        return f"co-bench-{self.run_id}-task-{self._tasks}"

    def blpop(self, key: str, timeout: float = TIMEOUT) -> None:
        """BLPOP in slices, checking the worker between them."""
        deadline = time.monotonic() + timeout
        while self.redis.blpop([key], timeout=1) is None:
            check_worker(self.worker)
            if time.monotonic() > deadline:
                raise BenchError(f"nothing came on {key} within {timeout}s")

    def forget(self, task_ids: list[str]) -> None:
        """Delete the result-backend keys of these tasks."""
        keys = [f"celery-task-meta-{task_id}" for task_id in task_ids]
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])

    def stream(self, what: str, *, window: int | None = WINDOW) -> Any:
        """A stream on the run's queue; ``window=None``: the default (adaptive) window."""
        from celery_ordered import OrderedResultStream

        return OrderedResultStream(
            self.app, self.name(what), window=window, task_options={"queue": self.queue}
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Return once the worker has run a plain task, a result task and a stream task."""
        counter, done = self.name("ready-count"), self.name("ready")
        self.tasks.count.apply_async((counter, done, 1), ignore_result=True)
        self.blpop(done, timeout)
        self.redis.delete(counter, done)
        result = self.tasks.noop.apply_async((7,), task_id=self.task_id())
        if result.get(timeout=timeout) != 7:
            raise BenchError("the worker answered the readiness check wrongly")
        self.forget([result.id])
        stream = self.stream("ready")
        try:
            for i in range(2 * PROCESSES):
                stream.put(self.tasks.ordered_noop, i)
            got = [stream.get(timeout=timeout) for _ in range(2 * PROCESSES)]
            if got != list(range(2 * PROCESSES)):
                raise BenchError(f"the worker answered the stream check wrongly: {got}")
        finally:
            stream.delete()


# -- 1. throughput -------------------------------------------------------------


def celery_ceiling(ctx: Context, n: int) -> float:
    counter, done = ctx.name("counter"), ctx.name("done")
    began = time.perf_counter()
    for _ in range(n):
        ctx.tasks.count.apply_async((counter, done, n), ignore_result=True)
    ctx.blpop(done)
    elapsed = time.perf_counter() - began
    ctx.redis.delete(counter, done)
    return elapsed


def celery_asyncresult_get(ctx: Context, n: int) -> float:
    began = time.perf_counter()
    results = [ctx.tasks.noop.apply_async((i,), task_id=ctx.task_id()) for i in range(n)]
    values = [r.get(timeout=TIMEOUT) for r in results]
    elapsed = time.perf_counter() - began
    ctx.forget([r.id for r in results])
    if values != list(range(n)):
        raise BenchError("[r.get() ...] gave wrong values")
    return elapsed


def _celery_group(ctx: Context, n: int, join: bool) -> float:
    from celery import group

    began = time.perf_counter()
    result = group(ctx.tasks.noop.s(i).set(task_id=ctx.task_id()) for i in range(n)).apply_async()
    values = result.join(timeout=TIMEOUT) if join else result.get(timeout=TIMEOUT)
    elapsed = time.perf_counter() - began
    ctx.forget([r.id for r in result.results])
    if values != list(range(n)):
        raise BenchError("group gave wrong values")
    return elapsed


def celery_group_get(ctx: Context, n: int) -> float:
    return _celery_group(ctx, n, join=False)


def celery_group_join(ctx: Context, n: int) -> float:
    return _celery_group(ctx, n, join=True)


@contextlib.contextmanager
def producing(
    stream: Any, task: Any, args: list[Any], cpu: list[float] | None = None
) -> Iterator[list[BaseException]]:
    """A producer thread putting ``task(arg)`` for each arg, then closing the stream.

    With ``cpu``, the thread appends to it the CPU seconds it used.
    """
    errors: list[BaseException] = []

    def produce() -> None:
        began = time.thread_time()
        try:
            for arg in args:
                stream.put(task, arg)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stream.close()
            if cpu is not None:
                cpu.append(time.thread_time() - began)

    thread = threading.Thread(target=produce, name="bench-producer", daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        thread.join(TIMEOUT)
        if errors:
            raise BenchError(f"the producer failed: {errors[0]!r}") from errors[0]


def consume(stream: Any, on_value: Callable[[int, Any], None] | None = None) -> int:
    """Get every outcome of a stream (with a timeout); return how many there were."""
    from celery_ordered import StreamExhausted

    got = 0
    while True:
        try:
            value = stream.get(timeout=TIMEOUT)
        except StreamExhausted:
            return got
        if on_value is not None:
            on_value(got, value)
        got += 1


def stream_thread(ctx: Context, n: int) -> float:
    stream = ctx.stream("thread")
    try:
        values: list[int] = []
        began = time.perf_counter()
        with producing(stream, ctx.tasks.ordered_noop, list(range(n)), ctx.producer_cpu):
            consume(stream, lambda _, value: values.append(value))
        elapsed = time.perf_counter() - began
    finally:
        stream.delete()
    if values != list(range(n)):
        raise BenchError("the stream gave wrong values")
    return elapsed


def stream_map(ctx: Context, n: int) -> float:
    stream = ctx.stream("map")
    try:
        began = time.perf_counter()
        values = list(stream.map(ctx.tasks.ordered_noop, range(n), timeout=TIMEOUT))
        elapsed = time.perf_counter() - began
    finally:
        stream.delete()
    if values != list(range(n)):
        raise BenchError("stream.map gave wrong values")
    return elapsed


#: The chunked rows map this many times more items, so that they run long
#: enough to measure; they report items per second like the other rows.
CHUNK_SCALE = 25


def _stream_map_chunked(ctx: Context, n: int, chunksize: int) -> float:
    stream = ctx.stream(f"map-{chunksize}")
    items = n * CHUNK_SCALE
    try:
        began = time.perf_counter()
        values = list(stream.map(ctx.tasks.square, range(items), chunksize=chunksize,
                                 timeout=TIMEOUT))  # fmt: skip
        elapsed = time.perf_counter() - began
    finally:
        stream.delete()
    if values != [i * i for i in range(items)]:
        raise BenchError(f"stream.map(chunksize={chunksize}) gave wrong values")
    return elapsed / CHUNK_SCALE  # seconds per n items


def stream_map_10(ctx: Context, n: int) -> float:
    return _stream_map_chunked(ctx, n, 10)


def stream_map_100(ctx: Context, n: int) -> float:
    return _stream_map_chunked(ctx, n, 100)


@contextlib.contextmanager
def process_pool() -> Iterator[Any]:
    """A ``multiprocessing.Pool(PROCESSES)``, closed and joined when done."""
    pool = multiprocessing.Pool(PROCESSES)
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def _mp_pool(ctx: Context, n: int, chunksize: int) -> float:
    with process_pool() as pool:
        pool.map(ctx.tasks.square, range(PROCESSES * 2))  # processes up before timing
        began = time.perf_counter()
        values = list(pool.imap(ctx.tasks.square, range(n), chunksize=chunksize))
        elapsed = time.perf_counter() - began
    if values != [i * i for i in range(n)]:
        raise BenchError("Pool.imap gave wrong values")
    return elapsed


def mp_imap_1(ctx: Context, n: int) -> float:
    return _mp_pool(ctx, n, 1)


def mp_imap_64(ctx: Context, n: int) -> float:
    return _mp_pool(ctx, n, 64)


def futures_map(ctx: Context, n: int) -> float:
    with concurrent.futures.ProcessPoolExecutor(PROCESSES) as pool:
        list(pool.map(ctx.tasks.square, range(PROCESSES * 2)))
        began = time.perf_counter()
        values = list(pool.map(ctx.tasks.square, range(n)))
        elapsed = time.perf_counter() - began
    if values != [i * i for i in range(n)]:
        raise BenchError("ProcessPoolExecutor.map gave wrong values")
    return elapsed


THROUGHPUT: list[tuple[str, str, Callable[[Context, int], float]]] = [
    ("celery_ceiling", "celery, ignore_result=True (ceiling)", celery_ceiling),
    ("celery_asyncresult", "celery, [r.get() for r in results]", celery_asyncresult_get),
    ("celery_group_get", "celery, group().get()", celery_group_get),
    ("celery_group_join", "celery, group().join()", celery_group_join),
    ("stream_thread", f"celery-ordered, put thread + iterate (w={WINDOW})", stream_thread),
    ("stream_map", f"celery-ordered, stream.map (w={WINDOW})", stream_map),
    ("stream_map_10", f"celery-ordered, stream.map chunksize=10 (w={WINDOW})", stream_map_10),
    ("stream_map_100", f"celery-ordered, stream.map chunksize=100 (w={WINDOW})", stream_map_100),
    ("mp_imap_1", "multiprocessing Pool(2).imap, chunksize=1", mp_imap_1),
    ("mp_imap_64", "multiprocessing Pool(2).imap, chunksize=64", mp_imap_64),
    ("futures_map", "ProcessPoolExecutor(2).map, chunksize=1", futures_map),
]


def bench_throughput(ctx: Context, n: int, repeats: int) -> dict[str, Any]:
    """Every variant once per repeat, interleaved, so machine noise spreads evenly."""
    seconds: dict[str, list[float]] = {key: [] for key, _, _ in THROUGHPUT}
    for repeat in range(repeats):
        for key, _, run in THROUGHPUT:
            seconds[key].append(run(ctx, n))
            check_worker(ctx.worker)
        progress(f"throughput: repeat {repeat + 1}/{repeats} done")
    return {
        key: {"seconds": seconds[key], "rates": [n / s for s in seconds[key]]}
        for key, _, _ in THROUGHPUT
    }


# -- 2. latency ------------------------------------------------------------------


def _latency_summary(samples: list[float], total: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"samples": len(samples), "tasks": total}
    if samples:
        summary.update(
            p50_ms=percentile(samples, 0.50) * 1000,
            p90_ms=percentile(samples, 0.90) * 1000,
            p99_ms=percentile(samples, 0.99) * 1000,
            max_ms=max(samples) * 1000,
        )
    return summary


def latency_stream(ctx: Context, n: int, *, linger: float | None = None) -> dict[str, Any]:
    """Time from a task's end to the consumer's get, for outcomes the consumer awaited.

    ``linger``: the consumer's ``ordered_consumer_linger`` (None: the default).
    """
    from celery_ordered import StreamExhausted

    saved = ctx.app.conf.get("ordered_consumer_linger")
    ctx.app.conf.ordered_consumer_linger = linger
    try:
        stream = ctx.stream("latency")
    finally:
        ctx.app.conf.ordered_consumer_linger = saved
    samples: list[float] = []
    got = 0
    try:
        with producing(stream, ctx.tasks.ordered_stamp, list(range(n))):
            while True:
                asked = time.time()
                try:
                    stamp = stream.get(timeout=TIMEOUT)
                except StreamExhausted:
                    break
                now = time.time()
                got += 1
                if stamp > asked:  # it finished while the consumer waited for it
                    samples.append(now - stamp)
    finally:
        stream.delete()
    if got != n:
        raise BenchError(f"the latency stream gave {got} outcomes, not {n}")
    return _latency_summary(samples, n)


def latency_asyncresult(ctx: Context, n: int) -> dict[str, Any]:
    """The same measure for plain Celery: ``r.get()`` in order, PROCESSES tasks in flight.

    One thread (an AsyncResult is not meant to be shared between threads): it
    dispatches PROCESSES tasks, then one more after each ``get()``. With more
    in flight this one thread, not the worker, is the bottleneck: every
    outcome is ready before it is asked for, and there is nothing to sample.
    """
    in_flight: collections.deque[Any] = collections.deque()
    ids: list[str] = []
    samples: list[float] = []
    dispatched = 0
    try:
        while dispatched < n or in_flight:
            while dispatched < n and len(in_flight) < PROCESSES:
                result = ctx.tasks.stamp.apply_async((dispatched,), task_id=ctx.task_id())
                in_flight.append(result)
                ids.append(result.id)
                dispatched += 1
            result = in_flight.popleft()
            asked = time.time()
            stamp = result.get(timeout=TIMEOUT)
            now = time.time()
            if stamp > asked:
                samples.append(now - stamp)
    finally:
        ctx.forget(ids)
    return _latency_summary(samples, n)


# -- 3. consumer peak RSS ----------------------------------------------------------


def rss_consumer(ctx: Context, mode: str, n: int) -> dict[str, Any]:
    """Run one consumer in a fresh process and return its report."""
    timeout = TIMEOUT + n / 50  # generous: 50 tasks/s would be very slow
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.rss", "--mode", mode, "--tasks", str(n),
            "--window", str(WINDOW), "--name", ctx.name(f"rss-{mode}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"the {mode} consumer for {n} tasks failed:\n{proc.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def bench_rss(ctx: Context, sizes: list[int], asyncresult_sizes: list[int]) -> list[Any]:
    reports = []
    for n in sizes:
        for mode in ("stream", "asyncresult"):
            if mode == "asyncresult" and n not in asyncresult_sizes:
                continue
            reports.append(rss_consumer(ctx, mode, n))
            check_worker(ctx.worker)
            progress(f"rss: {mode} x {n} done")
    return reports


# -- 4. uneven durations ---------------------------------------------------------------


def uneven_durations() -> list[float]:
    """200 seeded durations in seconds: most 1-5 ms, 10 of them 50-100 ms."""
    rng = random.Random(UNEVEN_SEED)
    slow = set(rng.sample(range(UNEVEN_TASKS), UNEVEN_SLOW))
    return [
        rng.uniform(0.050, 0.100) if i in slow else rng.uniform(0.001, 0.005)
        for i in range(UNEVEN_TASKS)
    ]


def _uneven_on_stream(ctx: Context, durations: list[float], *, by_map: bool) -> tuple[float, float]:
    """A stream with the default window, which is what a user gets: ``put`` from
    a producer thread, or ``map`` (claims and sends in blocks)."""
    stream = ctx.stream("uneven-map" if by_map else "uneven", window=None)
    first: list[float] = []
    try:
        began = time.perf_counter()

        def on_value(index: int, value: Any) -> None:
            if index == 0:
                first.append(time.perf_counter() - began)

        if by_map:
            got = 0
            for got, value in enumerate(
                stream.map(ctx.tasks.ordered_sleep, durations, timeout=TIMEOUT), 1
            ):
                on_value(got - 1, value)
        else:
            with producing(stream, ctx.tasks.ordered_sleep, durations):
                got = consume(stream, on_value)
        total = time.perf_counter() - began
    finally:
        stream.delete()
    if got != len(durations):
        raise BenchError(f"the uneven stream gave {got} outcomes")
    return first[0], total


def uneven_stream(ctx: Context, durations: list[float]) -> tuple[float, float]:
    return _uneven_on_stream(ctx, durations, by_map=False)


def uneven_stream_map(ctx: Context, durations: list[float]) -> tuple[float, float]:
    return _uneven_on_stream(ctx, durations, by_map=True)


def uneven_group(ctx: Context, durations: list[float]) -> tuple[float, float]:
    from celery import group

    began = time.perf_counter()
    result = group(ctx.tasks.sleep.s(d).set(task_id=ctx.task_id()) for d in durations).apply_async()
    values = result.get(timeout=TIMEOUT)
    total = time.perf_counter() - began
    ctx.forget([r.id for r in result.results])
    if len(values) != len(durations):
        raise BenchError("the uneven group gave wrong values")
    return total, total  # group().get() hands over everything at once


def uneven_asyncresult(ctx: Context, durations: list[float]) -> tuple[float, float]:
    began = time.perf_counter()
    results = [ctx.tasks.sleep.apply_async((d,), task_id=ctx.task_id()) for d in durations]
    try:
        results[0].get(timeout=TIMEOUT)
        first = time.perf_counter() - began
        for result in results[1:]:
            result.get(timeout=TIMEOUT)
        total = time.perf_counter() - began
    finally:
        ctx.forget([r.id for r in results])
    return first, total


def uneven_mp(ctx: Context, durations: list[float]) -> tuple[float, float]:
    with process_pool() as pool:
        pool.map(ctx.tasks.square, range(PROCESSES * 2))
        began = time.perf_counter()
        first = 0.0
        for index, _ in enumerate(pool.imap(time.sleep, durations, chunksize=1)):
            if index == 0:
                first = time.perf_counter() - began
        total = time.perf_counter() - began
    return first, total


UNEVEN: list[tuple[str, str, Callable[[Context, list[float]], tuple[float, float]]]] = [
    ("stream", "celery-ordered, put thread + iterate (default window)", uneven_stream),
    ("stream_map", "celery-ordered, stream.map (default window)", uneven_stream_map),
    ("group_get", "celery, group().get()", uneven_group),
    ("asyncresult", "celery, [r.get() for r in results]", uneven_asyncresult),
    ("mp_imap_1", "multiprocessing Pool(2).imap, chunksize=1", uneven_mp),
]


def bench_uneven(ctx: Context, repeats: int) -> dict[str, Any]:
    durations = uneven_durations()
    runs: dict[str, list[tuple[float, float]]] = {key: [] for key, _, _ in UNEVEN}
    for _ in range(repeats):
        for key, _, run in UNEVEN:
            runs[key].append(run(ctx, durations))
            check_worker(ctx.worker)
    return {
        "tasks": len(durations),
        "sum_s": sum(durations),
        "ideal_s": sum(durations) / PROCESSES,
        "first_duration_s": durations[0],
        "variants": {
            key: {"first_s": [r[0] for r in runs[key]], "total_s": [r[1] for r in runs[key]]}
            for key in runs
        },
    }


# -- the machine and the table ---------------------------------------------------------


def machine(client: redis.Redis, redis_url: str, redis_source: str) -> dict[str, Any]:
    info = client.info("server")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "celery": version("celery"),
        "kombu": version("kombu"),
        "redis_py": version("redis"),
        "celery_ordered": version("celery-ordered"),
        "redis_server": info.get("redis_version", "?"),
        "redis_url": redis_url,
        "redis_source": redis_source,
        "loadavg_at_start": list(load),
    }


def _rate_cells(rates: list[float]) -> tuple[str, str]:
    return f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}"


def render(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    lines = [
        "celery-ordered benchmarks",
        f"machine: nproc={m['nproc']}, {m['platform']}, load average at start "
        + " ".join(f"{x:.2f}" for x in m["loadavg_at_start"]),
        f"versions: python {m['python']}, celery {m['celery']}, kombu {m['kombu']}, "
        f"redis-py {m['redis_py']}, redis-server {m['redis_server']}, "
        f"celery-ordered {m['celery_ordered']}",
        f"redis: {m['redis_url']} ({m['redis_source']}); worker: prefork, "
        f"concurrency={PROCESSES}; stream window={WINDOW}",
        "",
        f"1. Throughput: {s['tasks']} trivial tasks, tasks/s, median and min-max "
        f"over {s['repeats']} repeats",
        f"   {'variant':<52} {'median':>9}  {'min-max':>15}",
    ]
    names = {key: label for key, label, _ in THROUGHPUT}
    for key, row in results["throughput"].items():
        median, spread = _rate_cells(row["rates"])
        lines.append(f"   {names[key]:<52} {median:>9}  {spread:>15}")
    lines += [
        "",
        f"2. Latency, task end -> consumer has it ({s['tasks']} trivial tasks, one run;",
        "   only outcomes that finished while the consumer was already waiting for them)",
        f"   {'variant':<52} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  samples",
    ]
    for label, row in (
        (f"celery-ordered, put thread + iterate (w={WINDOW})", results["latency"]["stream"]),
        ("   the same, ordered_consumer_linger=0", results["latency"]["stream_no_linger"]),
        (f"celery, r.get() in order, {PROCESSES} in flight", results["latency"]["asyncresult"]),
    ):
        if row["samples"]:
            lines.append(
                f"   {label:<52} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {row['max_ms']:>8.2f}  {row['samples']}/{row['tasks']}"
            )
        else:
            lines.append(f"   {label:<52} {'no outcome was awaited':>35}  0/{row['tasks']}")
    lines += [
        "",
        f"3. Consumer peak RSS (VmHWM), fresh process per row, window={WINDOW}",
        f"   {'consumer':<38} {'tasks':>8} {'setup MiB':>10} {'peak MiB':>9} "
        f"{'growth MiB':>11} {'tasks/s':>8}",
    ]
    labels = {"stream": "celery-ordered stream", "asyncresult": "celery [r.get() ...] list"}
    for row in results["rss"]:
        growth = (row["peak_kib"] - row["baseline_kib"]) / 1024
        lines.append(
            f"   {labels[row['mode']]:<38} {row['tasks']:>8,} {row['baseline_kib'] / 1024:>10.1f} "
            f"{row['peak_kib'] / 1024:>9.1f} {growth:>11.1f} {row['tasks'] / row['seconds']:>8,.0f}"
        )
    if results.get("rss_note"):
        lines.append(f"   ({results['rss_note']})")
    u = results["uneven"]
    lines += [
        "",
        f"4. Uneven durations: {u['tasks']} seeded tasks (most 1-5 ms, {UNEVEN_SLOW} of "
        f"50-100 ms), sum {u['sum_s']:.3f} s;",
        f"   ideal total = sum / {PROCESSES} processes = {u['ideal_s']:.3f} s; first task "
        f"alone takes {u['first_duration_s'] * 1000:.1f} ms; medians over {s['repeats']} repeats",
        f"   {'variant':<52} {'first s':>8} {'total s':>8} {'total/ideal':>12}",
    ]
    names = {key: label for key, label, _ in UNEVEN}
    for key, row in u["variants"].items():
        first, total = statistics.median(row["first_s"]), statistics.median(row["total_s"])
        lines.append(
            f"   {names[key]:<52} {first:>8.3f} {total:>8.3f} {total / u['ideal_s']:>12.2f}"
        )
    lines += ["", f"run took {results['elapsed_s']:.0f} s"]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def _parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark celery-ordered against plain Celery and multiprocessing."
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 repeats of 300 tasks; RSS at 1k and 5k"
    )
    parser.add_argument("--repeats", type=int, help="repeats per row (default 5; quick 2)")
    parser.add_argument("--tasks", type=int, help="tasks per throughput run (default 2000)")
    parser.add_argument(
        "--rss-sizes",
        type=_parse_sizes,
        help="comma-separated task counts for the RSS rows (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--rss-asyncresult-max",
        type=int,
        default=10_000,
        help="largest RSS size also run with the [r.get() ...] recipe (default 10000)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help=f"Redis to use (default {DEFAULT_REDIS} if it answers)")
    where.add_argument(
        "--private-redis", action="store_true", help="always start a private redis-server"
    )
    parser.add_argument("--json", type=Path, help="also save the raw numbers to this file")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.tasks = args.tasks or (300 if args.quick else 2000)
    if args.rss_sizes is None:
        args.rss_sizes = [1000, 5000] if args.quick else [1000, 10_000, 100_000]
    if args.repeats < 1 or args.tasks < 1 or min(args.rss_sizes, default=1) < 1:
        parser.error("--repeats, --tasks and --rss-sizes must be at least 1")
    return args


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the run through its ``finally`` blocks (worker stopped, keys removed).

    Forked pool processes inherit the handler; in them SIGTERM keeps its
    default meaning, which ``multiprocessing.Pool.terminate`` relies on.
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    run_id = uuid.uuid4().hex[:8]
    queue = f"co-bench-{run_id}"
    with chosen_redis(args) as (redis_url, redis_source):
        os.environ["BENCH_REDIS_URL"] = redis_url
        os.environ["BENCH_BROKER_URL"] = broker_url(redis_url)
        os.environ["BENCH_QUEUE"] = queue
        client = redis.Redis.from_url(redis_url)
        results: dict[str, Any] = {
            "machine": machine(client, redis_url, redis_source),
            "settings": {
                "tasks": args.tasks,
                "repeats": args.repeats,
                "rss_sizes": args.rss_sizes,
                "window": WINDOW,
                "processes": PROCESSES,
            },
        }
        progress(f"starting the worker on queue {queue} ({redis_url})")
        worker = start_worker("benchmarks.bench_app", queue)
        try:
            ctx = Context(redis_url, queue, worker, run_id)
            ctx.wait_ready()
            progress("worker ready")
            results["throughput"] = bench_throughput(ctx, args.tasks, args.repeats)
            results["latency"] = {
                "stream": latency_stream(ctx, args.tasks),
                "stream_no_linger": latency_stream(ctx, args.tasks, linger=0),
                "asyncresult": latency_asyncresult(ctx, args.tasks),
            }
            progress("latency done")
            asyncresult_sizes = [n for n in args.rss_sizes if n <= args.rss_asyncresult_max]
            results["rss"] = bench_rss(ctx, args.rss_sizes, asyncresult_sizes)
            skipped = [n for n in args.rss_sizes if n not in asyncresult_sizes]
            if skipped:
                results["rss_note"] = (
                    f"[r.get() ...] not run at {', '.join(f'{n:,}' for n in skipped)} tasks: "
                    "over --rss-asyncresult-max, to keep the run's time in bounds; its growth "
                    "is linear in the task count, see the smaller rows"
                )
            results["uneven"] = bench_uneven(ctx, args.repeats)
            progress("uneven durations done")
        finally:
            worker.stop()
            clean(client, queue, run_id)
    results["elapsed_s"] = time.perf_counter() - began
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = run(args)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
