"""What every benchmark script shares: its settings, the Redis it runs on, workers, output.

``benchmarks/run.py`` (celery-ordered against plain Celery and
multiprocessing) and ``benchmarks/cluster.py`` (by where the streams live)
both take from here:

- the settings of a run: :data:`PROCESSES`, :data:`WINDOW`, :data:`TIMEOUT`;
- :func:`chosen_redis`: ``--redis-url``, else the machine's Redis (database
  14, the benchmarks' own), else a private ``redis-server``;
  :func:`broker_url`: the same Redis as kombu spells it;
- :func:`start_worker` and :func:`check_worker`: a ``celery worker``
  subprocess (the tests' one launcher, :class:`tests.support.workers.Worker`),
  and a :class:`BenchError` with its log once it has died;
- :func:`progress` (to stderr) and :func:`version` (of an installed package),
  for the printed table.

Scripts run from the repository root: each puts the root on ``sys.path``
before it imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from celery_ordered.redis.urls import socket_url

if TYPE_CHECKING:
    from tests.support.workers import Worker

#: The repository's root: the working directory of every worker.
ROOT = Path(__file__).resolve().parent.parent

#: The Redis tried when --redis-url is not given (database 14, the benchmarks' own).
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
#: Worker processes, and the processes of the multiprocessing rows.
PROCESSES = 2
#: The window of every stream in the run.
WINDOW = 64
#: Seconds any single wait may take before the run gives up on it.
TIMEOUT = 120.0


class BenchError(RuntimeError):
    """A benchmark did not complete as it should."""


def answers(url: str) -> bool:
    """Whether a Redis answers at ``url`` within a second."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def broker_url(url: str) -> str:
    """The redis-py URL ``url`` as kombu spells it (a unix socket: ``redis+socket://``)."""
    return socket_url(url, kombu=True)


@contextlib.contextmanager
def chosen_redis(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """Yield (redis-py URL, description): --redis-url, else 6379/14, else a private one.

    ``args`` has ``redis_url`` (None: not given) and ``private_redis`` (always
    start a private server). A private server is stopped when the block ends.
    """
    if args.redis_url:
        yield args.redis_url, "given by --redis-url"
    elif not args.private_redis and answers(DEFAULT_REDIS):
        yield DEFAULT_REDIS, "the machine's Redis"
    else:
        from celery_ordered.embedded import RedisServer

        server = RedisServer().start()
        try:
            yield server.url, "a private redis-server (celery_ordered.embedded)"
        finally:
            server.stop()


def start_worker(
    app_spec: str,
    queue: str,
    *,
    concurrency: int = PROCESSES,
    extra_env: Mapping[str, str] | None = None,
) -> Worker:
    """A ``celery -A app_spec worker`` on ``queue`` (prefork), in a process group of its own.

    It dies with this process (Linux); its ``stop()`` stops it warm, then
    kills the whole group, pool processes included, and removes its log.
    """
    from tests.support.workers import Worker

    return Worker(
        app_spec,
        queue=queue,
        concurrency=concurrency,
        hostname=f"bench-{uuid.uuid4().hex[:8]}@%h",
        cwd=ROOT,
        extra_env=extra_env,
        new_session=True,
    )


def check_worker(worker: Worker, what: str = "the Celery worker") -> None:
    """Raise :class:`BenchError`, with the end of its log, if ``worker`` has exited."""
    code = worker.proc.poll()
    if code is not None:
        raise BenchError(f"{what} exited with {code}:\n{worker.output()[-3000:]}")


def progress(message: str) -> None:
    """Print a timestamped progress line to stderr (the table goes to stdout)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def version(package: str) -> str:
    """The installed version of ``package`` ("?" when it is not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``: the nearest sample at or above it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def clean(client: redis.Redis, queue: str, run_id: str) -> None:
    """Remove a run's queue, its binding and any key named after the run."""
    with contextlib.suppress(redis.RedisError):
        leftovers = list(client.scan_iter(match=f"*co-bench-{run_id}*", count=1000))
        leftovers += [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
        client.delete(*leftovers)
