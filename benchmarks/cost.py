"""What order costs: the streams' own Redis work per task, beside plain Celery's rate.

Run from the repository root (see benchmarks/README.md)::

    python benchmarks/cost.py [--tasks N] [--repeats N] [--redis-url URL]
                              [--skip-fleet] [--json FILE]

The broker is the machine's Redis (database 14) or ``--redis-url``; the
streams live on a private ``redis-server`` of their own, so that Redis's own
accounting (``INFO commandstats`` and ``INFO cpu``, reset before each row)
counts the streams' work and nothing else. One worker subprocess (prefork,
2 processes) runs every row; each row runs ``--repeats`` times, alternating
with plain Celery, and the table shows medians with their ranges:

- plain Celery: ``apply_async`` of a task with ``ignore_result`` that makes
  one Redis write, the rate a stream is measured against;
- ``stream.map`` and a producer thread calling ``put`` while the main thread
  iterates, each with the run's window;
- ``map(chunksize=100)``, in items per second.

For each stream row it prints the round trips per task to the stream's
Redis from the producer and the consumer (every command a client sent, as
``MONITOR`` sees them, but the workers' ``publish``, ``lease`` and
``timing``), the worker's ``publish`` calls per task, the commands
the scripts run inside Redis per task (``PEXPIRE`` and ``GET`` shown apart),
and Redis's time per task (commandstats: top-level commands, the scripts'
inner work included; and Redis's own CPU from ``INFO cpu``).

``--skip-fleet`` leaves out the last row: one worker with 64 thread slots
(``-P threads -c 64``) running 100 ms tasks, fed by one producer with the
default settings (no ``window=``): the share of the fleet's capacity (640
tasks/s) a stream keeps busy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` and `tests` importable
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    PROCESSES,
    TIMEOUT,
    WINDOW,
    BenchError,
    broker_url,
    chosen_redis,
    clean,
    progress,
    start_worker,
    version,
)
from benchmarks.run import Context, celery_ceiling, stream_map, stream_thread  # noqa: E402
from tests.support.processes import group_cpu, process_cpu  # noqa: E402

#: Commands a client sends itself; everything else in commandstats ran inside a
#: script (``EXISTS`` among them: the scripts check keys with it, the rows' clients
#: never send it, as the ``MONITOR`` counts show).
TOP_LEVEL = {
    "evalsha", "eval", "blpop", "brpoplpush", "script|load", "script", "del", "ping",
    "client|setinfo", "client", "hello", "select", "scan", "info",
}  # fmt: skip

#: What the workers send to the stream Redis (the rest is the producer's and the consumer's).
WORKER_SIDE = frozenset({"publish", "lease", "timing"})

#: Fleet row: thread slots, task seconds, tasks.
FLEET_SLOTS = 64
FLEET_TASK_SECONDS = 0.1
FLEET_TASKS = 1280


def _script_names() -> dict[str, str]:
    from celery_ordered.redis.protocol import SCRIPTS, script_source

    return {hashlib.sha1(script_source(n).encode()).hexdigest(): n for n in SCRIPTS}


class RedisMeter:
    """Counts what one Redis did between :meth:`reset` and :meth:`read`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.names = _script_names()

    def reset(self, *, by_script: bool = False) -> None:
        """Start counting; ``by_script`` also counts each script's calls (MONITOR)."""
        self.client.config_resetstat()
        cpu = self.client.info("cpu")
        self.cpu = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        self.monitor = MonitorCounter(self.client, self.names) if by_script else None

    def read(self, tasks: int) -> dict[str, Any]:
        """What Redis did per task since :meth:`reset`."""
        cpu = self.client.info("cpu")
        used_cpu = cpu["used_cpu_user"] + cpu["used_cpu_sys"] - self.cpu
        stats = self.client.info("commandstats")
        by_script = self.monitor.stop() if self.monitor is not None else {}
        top_usec = inner = 0.0
        detail: dict[str, float] = {}
        for key, value in stats.items():
            command = key.removeprefix("cmdstat_")
            if command in ("config|resetstat", "info", "script|flush", "monitor"):
                continue
            if command in TOP_LEVEL:
                top_usec += value["usec"]
            else:
                inner += value["calls"]
            detail[command] = value["calls"] / tasks
        return {
            "by_script": {name: calls / tasks for name, calls in by_script.items()},
            "inner": inner / tasks,
            "pexpire": detail.get("pexpire", 0.0),
            "get": detail.get("get", 0.0),
            "usec": top_usec / tasks,
            "cpu_usec": used_cpu * 1e6 / tasks,
        }


class MonitorCounter:
    """Counts the round trips to the stream Redis, by script, from its ``MONITOR``.

    commandstats counts EVALSHA as one command whichever script it runs, and
    cannot tell a command a client sent from one a script ran; MONITOR sees
    each command with its client ("lua" inside a script) and each script
    call with its SHA. Every command a client sent is counted: EVALSHA under
    its script's name, anything else under its own (BLPOP: the blocking
    waits). It costs Redis some time, which the ``usec`` figures include for
    every row alike.
    """

    #: What the meter itself sends (to read its figures, and to stop MONITOR).
    OWN = frozenset({"INFO", "CONFIG", "PING", "MONITOR"})

    def __init__(self, client: redis.Redis, names: dict[str, str]) -> None:
        self.counts: dict[str, int] = {}
        self.names = names
        self._monitor = client.monitor()
        self._connection = self._monitor.__enter__()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for command in self._connection.listen():
                if self._stop.is_set():
                    return
                parts = command["command"].split()
                if command.get("client_type") == "lua" or not parts:
                    continue
                name = parts[0].strip('"').upper()
                if name == "EVALSHA" and len(parts) > 1:
                    sha = parts[1].strip('"')
                    name = self.names.get(sha, sha[:8])
                elif name in self.OWN:
                    continue
                self.counts[name] = self.counts.get(name, 0) + 1
        except (redis.ConnectionError, ValueError, OSError):
            return

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._connection.connection.send_command("PING")  # wakes the reader up
        self._thread.join(5)
        self._monitor.__exit__(None, None, None)
        return dict(self.counts)


def chunked_map(ctx: Context, n: int) -> float:
    stream = ctx.stream("chunked")
    try:
        began = time.perf_counter()
        values = list(stream.map(ctx.tasks.ordered_noop, range(n), chunksize=100, timeout=TIMEOUT))
        elapsed = time.perf_counter() - began
    finally:
        stream.delete()
    if values != list(range(n)):
        raise BenchError("map(chunksize=100) gave wrong values")
    return elapsed


def _measure(
    ctx: Context,
    meter: RedisMeter,
    row: Callable[[Context, int], float],
    n: int,
    *,
    by_script: bool = False,
) -> tuple[float, dict[str, Any]]:
    """A row's rate, and per task: the stream Redis's work, and the CPU of this
    process (producer and consumer) and of the worker (its main and pool processes)."""
    meter.reset(by_script=by_script)
    ctx.producer_cpu.clear()
    worker = ctx.worker.proc.pid
    mine, theirs, main = time.process_time(), group_cpu(worker), process_cpu(worker)
    elapsed = row(ctx, n)
    costs = meter.read(n)
    costs["producer_cpu_usec"] = (time.process_time() - mine) * 1e6 / n
    costs["worker_cpu_usec"] = (group_cpu(worker) - theirs) * 1e6 / n
    costs["worker_main_cpu_usec"] = (process_cpu(worker) - main) * 1e6 / n
    if ctx.producer_cpu:  # the row puts from a thread of its own
        costs["producer_thread_cpu_usec"] = sum(ctx.producer_cpu) * 1e6 / n
    return n / elapsed, costs


def _fleet_stream(ctx: Context, pid: int, n: int, window: int | None) -> tuple[float, float, Any]:
    """``stream.map`` over ``n`` fleet tasks: (seconds, worker CPU us per task, final stats)."""
    from celery_ordered import OrderedResultStream

    stream = OrderedResultStream(
        ctx.app, ctx.name("fleet"), window=window, task_options={"queue": ctx.queue}
    )
    try:
        began, cpu = time.perf_counter(), group_cpu(pid)
        values = list(stream.map(ctx.tasks.ordered_sleep, [FLEET_TASK_SECONDS] * n))
        elapsed = time.perf_counter() - began
        worker_cpu = (group_cpu(pid) - cpu) * 1e6 / n
        stats = stream.stats()
    finally:
        stream.delete()
    if len(values) != n:
        raise BenchError("the fleet row lost outcomes")
    return elapsed, worker_cpu, stats


def _fleet_plain(ctx: Context, pid: int, n: int) -> tuple[float, float]:
    """Plain Celery: ``n`` fleet tasks sent as fast as it can: (seconds, worker CPU us per task)."""
    counter, done = ctx.name("fleet-counter"), ctx.name("fleet-done")
    began, cpu = time.perf_counter(), group_cpu(pid)
    for _ in range(n):
        ctx.tasks.sleep_count.apply_async(
            (counter, done, n, FLEET_TASK_SECONDS), ignore_result=True
        )
    ctx.blpop(done)
    elapsed = time.perf_counter() - began
    worker_cpu = (group_cpu(pid) - cpu) * 1e6 / n
    ctx.redis.delete(counter, done)
    return elapsed, worker_cpu


def fleet_row(broker_redis_url: str, queue: str) -> dict[str, Any]:
    """One worker with 64 thread slots, 100 ms tasks, one producer, default window.

    Both ways first run two tasks per slot, not counted: the worker starts its
    threads and each thread opens its connections on its first tasks, which
    would otherwise bill whichever way runs first.
    """
    from tests.support.workers import Worker

    worker = Worker(
        "benchmarks.bench_app",
        queue=queue,
        concurrency=FLEET_SLOTS,
        pool="threads",
        hostname=f"bench-{uuid.uuid4().hex[:8]}@%h",
        new_session=True,
    )
    try:
        ctx = Context(broker_redis_url, queue, worker, uuid.uuid4().hex[:8])
        ctx.wait_ready()
        pid = worker.proc.pid
        _fleet_stream(ctx, pid, 2 * FLEET_SLOTS, window=2 * FLEET_SLOTS)  # warm-up
        _fleet_plain(ctx, pid, 2 * FLEET_SLOTS)  # warm-up
        elapsed, stream_cpu, stats = _fleet_stream(ctx, pid, FLEET_TASKS, window=None)
        plain_elapsed, plain_cpu = _fleet_plain(ctx, pid, FLEET_TASKS)
        capacity = FLEET_SLOTS / FLEET_TASK_SECONDS
        rate = FLEET_TASKS / elapsed
        return {"rate": rate, "capacity": capacity, "share": rate / capacity,
                "window": stats.window, "why": stats.window_why,
                "plain": FLEET_TASKS / plain_elapsed,
                "worker_cpu_usec": stream_cpu, "plain_worker_cpu_usec": plain_cpu}  # fmt: skip
    finally:
        worker.stop()


def render(results: dict[str, Any]) -> str:
    lines = [
        f"celery-ordered {version('celery-ordered')}, celery {version('celery')}, "
        f"redis-py {version('redis')}; {os.cpu_count()} CPUs; worker: prefork, {PROCESSES} "
        f"processes; window {WINDOW}; {results['tasks']:,} tasks x {results['repeats']} runs",
        "",
        "| way | tasks/s (median) | range | vs plain Celery | round trips/task "
        "(producer+consumer) | publish/task | script calls inside Redis/task "
        "(PEXPIRE, GET) | Redis usec/task (commandstats; cpu) | CPU usec/task: "
        "producer+consumer (producer thread), worker (main process) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    plain = statistics.median(results["rows"]["plain Celery"]["rates"])
    for way, row in results["rows"].items():
        rates = row["rates"]
        median = statistics.median(rates)
        cells = [way, f"{median:,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}",
                 f"{median / plain:.2f}"]  # fmt: skip
        costs = row.get("costs") or [{}]
        c = {k: statistics.median(x[k] for x in costs) for k in costs[0] if k != "by_script"}
        if row.get("by_script"):
            # Round trips of the producer and the consumer: every command a
            # client sent (MONITOR) but the workers' (publish, and the
            # heartbeat's lease and timing calls).
            publish = row["by_script"].get("publish", 0.0)
            ours = sum(v for k, v in row["by_script"].items() if k not in WORKER_SIDE)
            cells += [
                f"{ours:.2f}",
                f"{publish:.2f}",
                f"{c['inner']:.1f} ({c['pexpire']:.1f}, {c['get']:.1f})",
                f"{c['usec']:.0f}; {c['cpu_usec']:.0f}",
            ]
        else:  # plain Celery: the streams' Redis does nothing
            cells += ["", "", "", ""]
        if "producer_cpu_usec" in c:
            thread = c.get("producer_thread_cpu_usec")
            cells.append(
                f"{c['producer_cpu_usec']:,.0f}"
                + ("" if thread is None else f" ({thread:,.0f})")
                + f", {c['worker_cpu_usec']:,.0f} ({c['worker_main_cpu_usec']:,.0f})"
            )
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    for way, row in results["rows"].items():
        if row.get("by_script"):
            scripts = row["by_script"]
            listed = ", ".join(f"{name} {calls:.2f}" for name, calls in sorted(scripts.items()))
            lines.append(f"\n{way}: round trips per task, by script or command: {listed}")
    fleet = results.get("fleet")
    if fleet:
        lines.append(
            f"\nfleet: {FLEET_SLOTS} thread slots, {FLEET_TASK_SECONDS * 1000:.0f} ms tasks, "
            f"default window (now {fleet['window']}: {fleet['why']}): "
            f"{fleet['rate']:,.0f} tasks/s of {fleet['capacity']:,.0f} ({fleet['share']:.0%}); "
            f"plain Celery on the same worker {fleet['plain']:,.0f} tasks/s "
            f"({fleet['plain'] / fleet['capacity']:.0%}); the stream at "
            f"{fleet['rate'] / fleet['plain']:.0%} of plain Celery; the worker process's CPU "
            f"per task {fleet['worker_cpu_usec']:,.0f} us with the stream, "
            f"{fleet['plain_worker_cpu_usec']:,.0f} us plain (one process: its 64 threads "
            "share one interpreter lock)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from celery_ordered.embedded import RedisServer

    run_id = uuid.uuid4().hex[:8]
    queue = f"co-bench-{run_id}"
    results: dict[str, Any] = {"tasks": args.tasks, "repeats": args.repeats, "rows": {}}
    server = RedisServer().start()
    try:
        with chosen_redis(args) as (redis_url, _):
            os.environ["BENCH_REDIS_URL"] = redis_url
            os.environ["BENCH_BROKER_URL"] = broker_url(redis_url)
            os.environ["BENCH_STREAM_URL"] = server.url
            os.environ["BENCH_QUEUE"] = queue
            worker = start_worker("benchmarks.bench_app", queue)
            try:
                ctx = Context(redis_url, queue, worker, run_id)
                ctx.wait_ready()
                meter = RedisMeter(redis.Redis.from_url(server.url))
                rows: dict[str, Callable[[Context, int], float]] = {
                    "plain Celery": celery_ceiling,
                    "stream.map": stream_map,
                    "producer thread + iterate": stream_thread,
                    "map(chunksize=100), items/s": chunked_map,
                }
                for repeat in range(args.repeats):
                    for way, row in rows.items():
                        n = args.tasks * (25 if "chunksize" in way else 1)
                        rate, costs = _measure(ctx, meter, row, n)
                        entry = results["rows"].setdefault(way, {"rates": [], "costs": []})
                        entry["rates"].append(rate)
                        entry["costs"].append(costs)
                    progress(f"run {repeat + 1} of {args.repeats} done")
                # One more run of each stream row with MONITOR on (it slows Redis
                # down, so only its counts are kept): each script's calls per task.
                for way, row in rows.items():
                    if way != "plain Celery":
                        n = args.tasks * (25 if "chunksize" in way else 1)
                        _, costs = _measure(ctx, meter, row, n, by_script=True)
                        results["rows"][way]["by_script"] = costs["by_script"]
            finally:
                worker.stop()
                client = redis.Redis.from_url(redis_url)
                clean(client, queue, run_id)  # the queue, its bindings, the run's keys
            if not args.skip_fleet:
                progress("fleet row: 64 thread slots")
                try:
                    results["fleet"] = fleet_row(redis_url, queue)
                finally:
                    clean(client, queue, run_id)
    finally:
        server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--redis-url", default=None, help="the broker's Redis")
    parser.add_argument("--private-redis", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-fleet", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
