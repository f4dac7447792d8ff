"""Stream throughput with the streams on a Redis Cluster, on Sentinel, and on one Redis.

Run from the repository root::

    python benchmarks/cluster.py [--tasks N] [--repeats N] [--no-sentinel]
                                 [--broker-url URL | --private-redis]

Every store is started here, on local ports, the same way (``redis-server``
without persistence): one Redis; a Redis Cluster of three primaries
(``tests/support/topologies.py``); a primary with one replica under Sentinel,
written to plainly and with ``ordered_wait_replicas=1``. Each store gets its
own Celery worker (prefork, 2 processes, ``tests.apps.topologyapp:worker_app``
with Celery's default prefetch), all on one broker (``--broker-url``, else the
machine's Redis, database 14, else a private one); the same jobs run against
each store, interleaved repeat by repeat so machine noise spreads evenly, and
a table of tasks/s (median, min-max) is printed. ``--no-sentinel`` leaves the
Sentinel stores out.

Jobs: ``stream.map`` of trivial tasks on one stream; three streams at once
(on the cluster, one per node); and ``stream.map(chunksize=100)``, where the
Redis work per item is a hundredth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    check_worker,
    chosen_redis,
    progress,
    version,
)

#: Items of the chunked job per task of the others, so it runs long enough to measure.
CHUNK_SCALE = 25


class Store:
    """A place for the streams, its worker, and the app its jobs use."""

    def __init__(self, key: str, label: str, url: str, **settings: Any) -> None:
        from tests.apps.topologyapp import topology_app
        from tests.support.topologies import topology_worker

        self.key = key
        self.label = label
        self.url = url
        self.queue = f"co-bench-cluster-{uuid.uuid4().hex[:8]}"
        # Celery's default prefetch, as benchmarks/bench_app.py keeps it.
        settings.setdefault("worker_prefetch_multiplier", 4)
        self.app = topology_app(url, self.queue, **settings)
        self.worker = topology_worker(url, self.queue, concurrency=PROCESSES, **settings)

    def stream(self, name: str | None = None) -> Any:
        from celery_ordered import OrderedResultStream

        return OrderedResultStream(self.app, name, window=WINDOW)

    def check(self) -> None:
        check_worker(self.worker, f"the worker of {self.label}")


def _names_on_distinct_nodes(store: Store, count: int) -> list[str]:
    """Stream names in distinct hash slots owned by distinct cluster nodes (or any names)."""
    from redis.cluster import RedisCluster

    from celery_ordered.redis.clients import client_for
    from celery_ordered.redis.keys import StreamKeys

    client = client_for(store.url)
    names: list[str] = []
    owners: set[str] = set()
    while len(names) < count:
        name = f"co-bench-cluster-{uuid.uuid4().hex[:10]}"
        if isinstance(client, RedisCluster):
            owner = client.get_node_from_key(StreamKeys(name).seq).name
            if owner in owners:
                continue
            owners.add(owner)
        names.append(name)
    return names


def _map_rate(store: Store, items: int, chunksize: int, what: str) -> float:
    """``items`` echo tasks through one stream's ``map``: items/s."""
    from tests.apps.tasks import echo

    stream = store.stream()
    try:
        began = time.perf_counter()
        values = list(stream.map(echo, range(items), chunksize=chunksize, timeout=TIMEOUT))
        elapsed = time.perf_counter() - began
    finally:
        stream.delete()
    if values != list(range(items)):
        raise BenchError(f"{store.label}: {what} gave wrong values")
    return items / elapsed


def one_stream(store: Store, n: int) -> float:
    return _map_rate(store, n, 1, "stream.map")


def three_streams(store: Store, n: int) -> float:
    """n tasks split over three streams consumed at once: total tasks/s."""
    from tests.apps.tasks import echo

    streams = [store.stream(name) for name in _names_on_distinct_nodes(store, 3)]
    share = n // 3
    errors: list[BaseException] = []

    def consume(stream: Any, offset: int) -> None:
        try:
            wanted = list(range(offset, offset + share))
            if list(stream.map(echo, wanted, timeout=TIMEOUT)) != wanted:
                raise BenchError(f"{store.label}: a stream gave wrong values")
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=consume, args=(stream, i * share))
        for i, stream in enumerate(streams)
    ]
    try:
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        elapsed = time.perf_counter() - began
    finally:
        for stream in streams:
            stream.delete()
    if errors:
        raise BenchError(f"{store.label}: {errors[0]!r}") from errors[0]
    return 3 * share / elapsed


def chunked(store: Store, n: int) -> float:
    return _map_rate(store, n * CHUNK_SCALE, 100, "chunked stream.map")


JOBS: list[tuple[str, str, Callable[[Store, int], float]]] = [
    ("one", f"stream.map, one stream (w={WINDOW}), tasks/s", one_stream),
    ("three", "stream.map, three streams at once, tasks/s in all", three_streams),
    ("chunked", "stream.map chunksize=100, items/s", chunked),
]


@contextlib.contextmanager
def stores(with_sentinel: bool) -> Iterator[list[Store]]:
    """Start every store and its worker; stop them all at the end."""
    from tests.support.topologies import LocalRedisCluster, LocalSentinel, RedisNode, free_ports

    with contextlib.ExitStack() as stack:
        single_dir = stack.enter_context(_tempdir())
        single = RedisNode(single_dir, free_ports(1)[0]).start()
        stack.callback(single.stop)
        cluster = stack.enter_context(LocalRedisCluster(3))
        made = [
            Store("single", "one Redis", f"redis://127.0.0.1:{single.port}/0"),
            Store("cluster", "Redis Cluster, 3 primaries", cluster.url),
        ]
        if with_sentinel:
            sentinel = stack.enter_context(LocalSentinel(replicas=1))
            made += [
                Store("sentinel", "Sentinel, primary + 1 replica", sentinel.url),
                Store(
                    "sentinel_wait",
                    "Sentinel, ordered_wait_replicas=1",
                    sentinel.url,
                    ordered_wait_replicas=1,
                ),
            ]
        for store in made:
            stack.callback(store.worker.stop)
        for store in made:
            store.worker.wait_ready(store.app, timeout=60)
        yield made


@contextlib.contextmanager
def _tempdir() -> Iterator[Path]:
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="co-bench-single-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    with chosen_redis(args) as (broker, broker_source):
        # tests.apps.topologyapp puts its apps and workers on the tests' broker variable.
        os.environ["CO_TEST_BROKER_URL"] = broker_url(broker)
        progress(f"broker: {broker} ({broker_source}); starting the stores and their workers")
        with stores(not args.no_sentinel) as made:
            progress("workers ready")
            rates: dict[str, dict[str, list[float]]] = {
                store.key: {key: [] for key, _, _ in JOBS} for store in made
            }
            for repeat in range(args.repeats):
                for key, _, job in JOBS:
                    for store in made:
                        rates[store.key][key].append(job(store, args.tasks))
                        store.check()
                progress(f"repeat {repeat + 1}/{args.repeats} done")
            server = redis.Redis.from_url(made[0].url).info("server")
            labels = {store.key: store.label for store in made}
        _clean_broker(broker, [store.queue for store in made])
    return {
        "broker": broker,
        "broker_source": broker_source,
        "redis_server": server.get("redis_version", "?"),
        "tasks": args.tasks,
        "repeats": args.repeats,
        "labels": labels,
        "rates": rates,
        "elapsed_s": time.perf_counter() - began,
    }


def _clean_broker(broker: str, queues: list[str]) -> None:
    """Remove the stores' queues and their bindings from the broker."""
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(broker)
        for queue in queues:
            client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def render(results: dict[str, Any]) -> str:
    labels: dict[str, str] = results["labels"]
    width = max(len(label) for label in labels.values())
    lines = [
        "celery-ordered: stream throughput by where the streams live",
        f"machine: nproc={os.cpu_count()}; python {sys.version.split()[0]}, celery "
        f"{version('celery')}, redis-py {version('redis')}, redis-server "
        f"{results['redis_server']}",
        f"broker: {results['broker']} ({results['broker_source']}); each store: its own "
        f"worker, prefork, concurrency={PROCESSES}; {results['tasks']} trivial tasks per "
        f"run; median (min-max) of {results['repeats']} repeats",
    ]
    for key, title, _ in JOBS:
        lines += ["", f"{title}:"]
        for store, label in labels.items():
            values = results["rates"][store][key]
            lines.append(
                f"   {label:<{width}}  {statistics.median(values):>9,.0f}  "
                f"({min(values):,.0f}-{max(values):,.0f})"
            )
    lines += ["", f"run took {results['elapsed_s']:.0f} s"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1500, help="tasks per run (default 1500)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per row (default 5)")
    parser.add_argument("--no-sentinel", action="store_true", help="only one Redis and the cluster")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--broker-url",
        dest="redis_url",
        help="the broker, a Redis (default redis://127.0.0.1:6379/14 if it answers)",
    )
    where.add_argument("--private-redis", action="store_true", help="always start a private broker")
    args = parser.parse_args(argv)
    if args.tasks < 3 or args.repeats < 1:
        parser.error("--tasks must be at least 3 and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(render(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
