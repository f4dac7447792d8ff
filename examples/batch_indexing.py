"""The original parallel_queue story, on celery-ordered.

Index documents in parallel and log "batch N done" only when every document
of batch N is indexed, without waiting for a whole batch before starting the
next: a slow document holds up the log line, not the work. A producer thread
puts, a consumer thread gets, exactly as with parallel_queue; only the import
changed. Runs on the zero-setup default (a private Redis and local worker
processes):

    python examples/batch_indexing.py [BATCHES] [BATCH_SIZE]
"""

from __future__ import annotations

import random
import sys
import time
from threading import Thread

from celery_ordered import ParallelQueue


class BatchDone(int):
    """Marker for the completion of an indexing batch."""


def indexing_func(document: str) -> str:
    """Index one document (here: uneven work standing in for a search engine)."""
    time.sleep(random.choice([0.001, 0.002, 0.004, 0.05]))
    return document.upper()


def get_document_batch(batch: int, size: int) -> list[str]:
    """One batch of documents."""
    return [f"doc-{batch}-{i}" for i in range(size)]


def producer(queue: ParallelQueue, batches: int, size: int) -> None:
    """Put every document, and a BatchDone marker after each batch."""
    for batch in range(batches):
        doc_count = 0
        for document in get_document_batch(batch, size):
            queue.put(indexing_func, document)  # callables run on the workers
            doc_count += 1
        queue.put(BatchDone(doc_count))  # non-callables pass through, in order
    queue.stop()


def consumer(queue: ParallelQueue, batches: int, log: list[str]) -> None:
    """Log each batch once all of it is done."""
    done = 0
    indexed = 0
    while done < batches:
        result_or_batch_done = queue.get()
        if isinstance(result_or_batch_done, BatchDone):
            log.append(f"batch {done} done: {int(result_or_batch_done)} documents")
            print(log[-1], f"({indexed} indexed so far)", flush=True)
            done += 1
        else:
            indexed += 1


def main(batches: int = 10, size: int = 50) -> list[str]:
    """Run the pipeline; returns the log lines."""
    queue = ParallelQueue(daemon=True)
    log: list[str] = []
    threads = [
        Thread(target=producer, args=(queue, batches, size)),
        Thread(target=consumer, args=(queue, batches, log)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.join(timeout=10)
    if queue.is_alive():
        raise RuntimeError("join() must have timed out!")
    return log


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
