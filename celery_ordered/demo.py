"""The main job: index documents in parallel, report each batch in order.

This is the story the original ``parallel_queue`` was written for: many
documents of uneven cost are indexed in parallel, and "batch N done" may be
logged only once every document of batch N is done, in order, while later
batches are already running. Run it with ``celery-ordered demo`` (or
``python -m celery_ordered demo``): on a fresh machine it starts a private
Redis and local workers; given ``--broker-url``/``--redis-url`` it runs on
a fleet started with ``celery -A celery_ordered.demo worker``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from celery import Celery, signals

from .config import resolve_redis
from .progress import ProgressBar
from .redis.clients import client_for
from .redis.protocol import Protocol
from .task import ordered_task

logger = logging.getLogger(__name__)

#: The app fleet workers run (``celery -A celery_ordered.demo worker``); it
#: reads its broker and Redis from the environment.
app = Celery(
    "celery_ordered.demo",
    broker=os.environ.get("CELERY_BROKER_URL"),
    set_as_current=False,
)
app.conf.ordered_redis_url = os.environ.get("CELERY_ORDERED_REDIS_URL")

#: The environment a fleet worker of :data:`app` reads, as the README sets it.
FLEET_ENVIRONMENT = ("CELERY_BROKER_URL", "CELERY_ORDERED_REDIS_URL")


@signals.worker_init.connect(weak=False)
def _name_what_the_fleet_worker_lacks(sender: Any = None, **_: Any) -> None:
    """A fleet worker started without its environment says so, instead of running on defaults.

    Without ``CELERY_BROKER_URL`` it would wait on Celery's default broker
    (``amqp://localhost``), and without ``CELERY_ORDERED_REDIS_URL`` its
    outcomes would have no Redis to go to.
    """
    if getattr(sender, "app", None) is not app:
        return
    missing = [name for name in FLEET_ENVIRONMENT if not os.environ.get(name)]
    if missing:
        logger.warning(
            "celery-ordered demo worker: %s not set; set both as for "
            "`celery-ordered demo --broker-url URL --redis-url URL`, e.g. "
            "CELERY_BROKER_URL=redis://host:6379/0 CELERY_ORDERED_REDIS_URL=redis://host:6379/0 "
            "celery -A celery_ordered.demo worker",
            " and ".join(missing),
        )


@ordered_task(name="celery_ordered.demo.index_document")
def index_document(doc_id: int, cost_ms: float) -> dict[str, Any]:
    """Index one document: work for ``cost_ms`` ms, return its id and a digest."""
    time.sleep(cost_ms / 1000.0)  # stands in for I/O: a search engine, an API
    digest = hashlib.blake2s(str(doc_id).encode(), digest_size=4).hexdigest()
    return {"doc": doc_id, "digest": digest, "worker": os.getpid()}


def document_costs(documents: int, seed: int) -> list[float]:
    """Uneven costs in ms: most documents are quick, a few are slow."""
    rng = random.Random(seed)
    costs = []
    for _ in range(documents):
        if rng.random() < 0.02:
            costs.append(rng.uniform(40.0, 120.0))  # the odd huge document
        else:
            costs.append(rng.expovariate(1 / 2.0))
    return costs


@dataclass
class DemoReport:
    """What one run of the demo measured."""

    documents: int
    batches: int
    workers: str
    window: int
    elapsed: float
    startup: float | None
    peak_out_of_order: int
    in_order: bool

    @property
    def throughput(self) -> float:
        """Documents per second over the run."""
        return self.documents / self.elapsed if self.elapsed else 0.0

    def lines(self) -> Iterator[str]:
        """The summary, line by line."""
        yield "Summary"
        yield f"  documents         {self.documents} in {self.batches} batches"
        yield f"  workers           {self.workers}"
        yield f"  window            {self.window}"
        startup = f" (+ {self.startup:.2f} s start-up)" if self.startup is not None else ""
        yield f"  elapsed           {self.elapsed:.2f} s{startup}"
        yield f"  throughput        {self.throughput:,.0f} documents/s"
        yield (
            f"  out of order      at most {self.peak_out_of_order} result(s) waited "
            "for an earlier one"
        )
        yield "  order             " + (
            "every result in submission order: ok" if self.in_order else "OUT OF ORDER"
        )


#: Seconds the demo, interrupted, retries deleting its stream (its Redis may be gone).
INTERRUPTED_RETRY_FOR = 1.0


def run_demo(
    stream_app: Celery,
    *,
    documents: int,
    batch_size: int,
    window: int | None,
    seed: int,
    workers_label: str,
    startup: float | None,
    out: IO[str] = sys.stdout,
    quiet_batches: bool = False,
) -> DemoReport:
    """Put every document and a batch marker after each batch; consume in order."""
    import threading

    from .stream import OrderedResultStream

    stream = OrderedResultStream(stream_app, window=window)
    costs = document_costs(documents, seed)
    batches = (documents + batch_size - 1) // batch_size
    producer_error: list[BaseException] = []
    # Set when the consumer stops early (Ctrl-C, an error): the producer stops too.
    stopped = threading.Event()

    def produce() -> None:
        try:
            for start in range(0, documents, batch_size):
                count = 0
                for doc_id in range(start, min(start + batch_size, documents)):
                    stream.put(index_document, doc_id, costs[doc_id])
                    count += 1
                stream.put({"batch": start // batch_size, "documents": count})
        except BaseException as exc:  # reported by the consumer below
            if not stopped.is_set():
                producer_error.append(exc)
        finally:
            if not stopped.is_set():
                stream.close()

    progress = ProgressBar(documents, desc="documents", file=out)
    began = time.monotonic()
    producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
    producer.start()
    expected_doc = 0
    expected_batch = 0
    in_order = True
    finished = False
    try:
        for outcome in stream:
            if "batch" in outcome:
                in_order &= outcome["batch"] == expected_batch
                if not quiet_batches:
                    progress.say(
                        f"batch {outcome['batch']:>3} done: {outcome['documents']} documents"
                    )
                expected_batch += 1
            else:
                in_order &= outcome["doc"] == expected_doc
                expected_doc += 1
                progress.update(expected_doc)
        elapsed = time.monotonic() - began
        window_used = stream.stats().window
        finished = True
    finally:
        progress.close()
        if finished:
            producer.join()
            stream.delete()
        else:
            # Ctrl-C, or an error: the producer may wait for room in a window
            # nobody empties now. Deleting the stream under it ends its put
            # (StreamDeleted), without waiting on a Redis that may have gone
            # with the Ctrl-C (a private one gets the terminal's signal too):
            # a client of its own retries for a second at most.
            stopped.set()
            with contextlib.suppress(Exception):
                url, options = resolve_redis(stream_app)
                client = client_for(url, INTERRUPTED_RETRY_FOR, transport_options=options)
                Protocol(client, stream.name).delete()
            producer.join(timeout=1)  # a daemon thread: it ends with the process anyway
    if producer_error:
        raise producer_error[0]
    in_order &= expected_doc == documents and expected_batch == batches
    return DemoReport(
        documents=documents,
        batches=batches,
        workers=workers_label,
        window=window_used,
        elapsed=elapsed,
        startup=startup,
        peak_out_of_order=stream.peak_out_of_order,
        in_order=in_order,
    )
