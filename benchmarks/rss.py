"""Peak RSS of one consumer, run in a fresh process by ``benchmarks/run.py``.

    python -m benchmarks.rss --mode stream --tasks 10000 --window 64

Runs ``--tasks`` trivial tasks through the benchmark worker, consuming every
result in order and keeping none, and prints one JSON line: the process's
peak RSS (``VmHWM``) once set up and at the end, and the elapsed time. The
Redis and queue come from the ``BENCH_*`` environment (see ``bench_app``).

``--mode stream``: an :class:`~celery_ordered.OrderedResultStream`, a
producer thread putting while the main thread iterates.
``--mode asyncresult``: the plain Celery recipe, ``results = [t.apply_async()
for ...]`` then ``r.get()`` for each, in order.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
import uuid
from typing import Any

#: Seconds any single wait may take before the consumer gives up.
TIMEOUT = 120.0


def peak_rss_kib() -> int:
    """The process's peak resident set size in KiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def run_stream(tasks: int, window: int, name: str) -> dict[str, Any]:
    from benchmarks.bench_app import QUEUE, app, ordered_noop
    from celery_ordered import OrderedResultStream, StreamExhausted

    options = {"queue": QUEUE}
    warm = OrderedResultStream(app, f"{name}-warm", window=window, task_options=options)
    try:
        warm.put(ordered_noop, 0)
        warm.get(timeout=TIMEOUT)
    finally:
        warm.delete()
    stream = OrderedResultStream(app, name, window=window, task_options=options)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for i in range(tasks):
                stream.put(ordered_noop, i)
        except BaseException as exc:
            errors.append(exc)
        finally:
            stream.close()

    baseline = peak_rss_kib()
    began = time.perf_counter()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    got = 0
    try:
        while True:
            try:
                value = stream.get(timeout=TIMEOUT)
            except StreamExhausted:
                break
            if value != got:
                raise RuntimeError(f"stream gave {value!r} at position {got}")
            got += 1
        elapsed = time.perf_counter() - began
        producer.join(TIMEOUT)
        peak = peak_rss_kib()
        if errors:
            raise errors[0]
        if got != tasks:
            raise RuntimeError(f"stream gave {got} results, not {tasks}")
        return {
            "baseline_kib": baseline,
            "peak_kib": peak,
            "seconds": elapsed,
            "peak_out_of_order": stream.peak_out_of_order,
        }
    finally:
        stream.delete()


def run_asyncresult(tasks: int, name: str) -> dict[str, Any]:
    import redis

    from benchmarks.bench_app import REDIS_URL, noop

    client = redis.Redis.from_url(REDIS_URL)
    warm = noop.apply_async((0,), task_id=f"{name}-warm")  # set up before the baseline
    warm.get(timeout=TIMEOUT)
    client.delete(f"celery-task-meta-{warm.id}")
    baseline = peak_rss_kib()
    began = time.perf_counter()
    results = [noop.apply_async((i,), task_id=f"{name}-{i}") for i in range(tasks)]
    try:
        for i, result in enumerate(results):
            if result.get(timeout=TIMEOUT) != i:
                raise RuntimeError(f"result {i} is wrong")
        elapsed = time.perf_counter() - began
        peak = peak_rss_kib()
    finally:
        ids = [f"celery-task-meta-{r.id}" for r in results]
        for start in range(0, len(ids), 1000):
            client.delete(*ids[start : start + 1000])
    return {"baseline_kib": baseline, "peak_kib": peak, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("stream", "asyncresult"), required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--name", default=f"bench-rss-{uuid.uuid4().hex[:12]}")
    args = parser.parse_args(argv)
    if args.mode == "stream":
        report = run_stream(args.tasks, args.window, args.name)
    else:
        report = run_asyncresult(args.tasks, args.name)
    report.update(mode=args.mode, tasks=args.tasks)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
