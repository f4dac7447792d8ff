"""``ParallelQueue`` and ``ParallelSingleTaskQueue``: the parallel_queue API on Celery.

Code written for the original ``parallel_queue`` package keeps working with
only its import changed::

    from celery_ordered import ParallelQueue

    queue = ParallelQueue(daemon=True)
    queue.put(index_document, doc)   # callables run on worker processes
    queue.put(BatchDone(100))        # anything else passes through, in order
    result = queue.get(timeout=1)    # results come back in the order put
    queue.stop()
    queue.join(timeout=2)

By default a queue runs on a private :class:`~celery_ordered.embedded.LocalCluster`
(its own Redis and worker processes, forked from the caller so functions
defined in ``__main__`` work) and uses pickle, as the original did: tuples,
custom classes and exceptions round-trip exactly. Pass ``app=`` to run the same
code on a real Celery fleet instead (with that app's serializer).

How the original's sizes map here. The original holds an item in one of
five places between ``put`` and ``get``: its input queue (``in_q_max``), a
worker's hands (one per worker, running or waiting for the consumer to make
room), the queue from the workers to the consumer (``worker_q_max``, one
queue shared by all workers), the consumer's reordering buffer
(``consumer_buffer_max``: results up to that many positions ahead of the
next one to hand out), and the output queue ``get`` reads (``out_q_max``).
Its ``put`` blocks only when the input queue is full, so the most it ever
accepts ahead of ``get`` is the sum of those places. Here one window in
Redis bounds everything between ``put`` and ``get``, and it is that sum::

    window = in_q_max + num_workers + worker_q_max + consumer_buffer_max + out_q_max

with the original's defaults (``in_q_max=1000``, ``out_q_max=1000``,
``worker_q_max=100``, ``consumer_buffer_max=10 * num_workers``), so whatever
the original accepted without blocking is accepted here; ``put`` blocks (or
raises ``queue.Full`` after its timeout) one item later than the original
could at the earliest. ``out_q_max`` also caps how many ready results the
consumer reads per round trip to Redis. Where the original took 0 as "no
bound" (``multiprocessing.Queue(maxsize=0)``), a size here must be >= 1:
a stream's window is always bounded, so pass a large number instead.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery

from . import checks
from .consumer import DEFAULT_PREFETCH
from .embedded import LocalCluster
from .errors import StreamEmpty, StreamExhausted
from .stream import OrderedResultStream
from .task import CALL_TASK_NAME, INHERITED, INHERITED_PREFIX, function_reference

#: Window per worker when ``consumer_buffer_max`` is not given.
DEFAULT_BUFFER_PER_WORKER = 10

#: The original's default size of its input queue.
DEFAULT_IN_Q_MAX = 1000

#: The original's default size of its output queue.
DEFAULT_OUT_Q_MAX = 1000

#: The original's default size of the queue from its workers to its consumer.
DEFAULT_WORKER_Q_MAX = 100


def window_for(
    num_workers: int,
    in_q_max: int = DEFAULT_IN_Q_MAX,
    out_q_max: int = DEFAULT_OUT_Q_MAX,
    worker_q_max: int = DEFAULT_WORKER_Q_MAX,
    consumer_buffer_max: int | None = None,
) -> int:
    """The window that accepts whatever the original accepted with these sizes.

    Every place the original can hold an item between ``put`` and ``get``,
    added up (see the module docs).
    """
    if consumer_buffer_max is None:
        consumer_buffer_max = DEFAULT_BUFFER_PER_WORKER * num_workers
    return in_q_max + num_workers + worker_q_max + consumer_buffer_max + out_q_max


class ParallelQueue:
    """An ordered parallel queue: ``put`` tasks in, ``get`` results out in order.

    Args:
        num_workers: worker processes of the private cluster (default: CPU count).
        daemon: accepted as in the original; the workers never outlive the
            queue, whether it is stopped, garbage-collected or its process killed.
        in_q_max, out_q_max, worker_q_max: the original's queue sizes (defaults
            1000, 1000 and 100, as there); with ``num_workers`` and
            ``consumer_buffer_max`` they add up to the window (see the module
            docs), so ``put`` accepts at least what the original did.
            ``out_q_max`` also caps the ready results read per round trip.
        worker_init_f: called with no arguments in each local worker process
            as it starts.
        consumer_buffer_max: how far ahead of the next result the original's
            consumer held results (default 10 x ``num_workers``); part of the
            window.
        app: run on this Celery app's workers instead of a private cluster.
        name: the stream's name (default: a unique one).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        daemon: bool = False,
        in_q_max: int = DEFAULT_IN_Q_MAX,
        out_q_max: int = DEFAULT_OUT_Q_MAX,
        worker_q_max: int = DEFAULT_WORKER_Q_MAX,
        worker_init_f: Callable[[], Any] | None = None,
        consumer_buffer_max: int | None = None,
        *,
        app: Celery | None = None,
        name: str | None = None,
    ) -> None:
        self.num_workers = checks.count("num_workers", num_workers, none=True) or (
            os.cpu_count() or 1
        )
        self.daemon = daemon
        self.in_q_max = checks.count("in_q_max", in_q_max)
        self.out_q_max = checks.count("out_q_max", out_q_max)
        self.worker_q_max = checks.count("worker_q_max", worker_q_max)
        self.consumer_buffer_max = checks.count(
            "consumer_buffer_max", consumer_buffer_max, none=True
        ) or (DEFAULT_BUFFER_PER_WORKER * self.num_workers)
        window = window_for(
            self.num_workers,
            self.in_q_max,
            self.out_q_max,
            self.worker_q_max,
            self.consumer_buffer_max,
        )
        self._cluster: LocalCluster | None = None
        self._stopped = False
        self._private_redis_gone = False
        if app is None:
            self._before_fork()
            self._cluster = LocalCluster(
                self.num_workers, worker_init=worker_init_f, serializer="pickle"
            ).start()
            app = self._cluster.app
        elif worker_init_f is not None:
            raise ValueError(
                "worker_init_f runs only in a private cluster's workers; with app=, "
                "connect your function to celery.signals.worker_process_init instead"
            )
        self.app = app
        self._stream = OrderedResultStream(
            app, name, window=window, prefetch=min(self.out_q_max, DEFAULT_PREFETCH)
        )

    def _before_fork(self) -> None:
        """Hook for subclasses: runs before the private workers are forked."""

    def __repr__(self) -> str:
        where = "private cluster" if self._cluster is not None else f"app {self.app.main!r}"
        return f"<{type(self).__name__} {self._stream.name!r} on {where}>"

    @property
    def stream(self) -> OrderedResultStream:
        """The :class:`~celery_ordered.OrderedResultStream` underneath."""
        return self._stream

    def put(self, task: Any, /, *args: Any, timeout: float | None = None, **kwargs: Any) -> int:
        """Put ``task(*args, **kwargs)`` in, or a non-callable as a marker.

        Blocks while the window is full; raises ``queue.Full`` after
        ``timeout`` seconds. Returns the task's sequence number.
        """
        return self._stream.put(task, *args, timeout=timeout, **kwargs)

    def get(self, timeout: float | None = None, *, block: bool = True) -> Any:
        """The next result in the order put; ``queue.Empty`` after ``timeout`` seconds.

        ``block=False`` raises ``queue.Empty`` at once unless the next result
        is ready, whatever ``timeout`` says, as ``queue.Queue.get`` does (the
        original passed its keywords on to one).

        A task's exception is raised here, at its position, with a
        ``stack_trace`` attribute holding the worker's traceback text.
        Once the queue is stopped and every result was taken, raises
        ``queue.Empty`` (given a timeout) or
        :class:`~celery_ordered.StreamExhausted` (without one, instead of
        blocking forever).
        """
        if not block:
            timeout = 0
        if self._private_redis_gone and not self._stream.consumer.buffered:
            return self._nothing_left(timeout)
        try:
            return self._stream.get(timeout=timeout)
        except StreamExhausted:
            return self._nothing_left(timeout)

    def _nothing_left(self, timeout: float | None) -> Any:
        if timeout is not None:
            raise StreamEmpty(
                f"queue {self._stream.name!r} is stopped and every result was taken",
                stream=self._stream.name,
            )
        raise StreamExhausted(
            f"queue {self._stream.name!r} is stopped and every result was taken",
            stream=self._stream.name,
        )

    def stop(self) -> None:
        """Signal that nothing more will be put; returns at once."""
        if not self._stopped:
            self._stream.close()

    def join(self, timeout: float | None = None) -> None:
        """Wait for every task to finish, then shut the workers down.

        Returns after ``timeout`` seconds even if work remains: check
        :meth:`is_alive`. Results not yet taken stay available to :meth:`get`.
        """
        if self._stopped:
            return
        self._stream.join(timeout)
        if self._stream.is_alive():
            return
        if self._cluster is not None:
            self._stream.consumer.prefetch_all()
            # What was read is handed out from memory from now on: no
            # acknowledgement may try the Redis that is about to go.
            self._stream.consumer.stop_acknowledging()
            self._cluster.stop()
            self._private_redis_gone = True
            self._after_stop()
        self._stopped = True

    def _after_stop(self) -> None:
        """Hook for subclasses: runs once the private workers are gone."""

    def is_alive(self) -> bool:
        """False once stopped and joined (every task finished)."""
        return not self._stopped and self._stream.is_alive()


class ParallelSingleTaskQueue(ParallelQueue):
    """A :class:`ParallelQueue` bound to one function: ``put(*args)`` runs ``task_fn(*args)``.

    The function reaches the private workers by inheritance (they are forked
    after it is registered), not by pickling: closures, nested functions and
    callable objects holding ``multiprocessing`` primitives all work. With
    ``app=`` it must be a top-level function the fleet's workers can import.
    """

    def __init__(self, task_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not callable(task_fn):
            raise TypeError(f"task_fn must be callable, got {task_fn!r}")
        self.task_fn = task_fn
        self._token = uuid.uuid4().hex
        self._reference: str | None = None
        super().__init__(*args, **kwargs)
        if self._reference is None:  # on a fleet: by name
            self._reference = function_reference(task_fn)

    def _before_fork(self) -> None:
        INHERITED[self._token] = self.task_fn
        self._reference = INHERITED_PREFIX + self._token
        weakref.finalize(self, INHERITED.pop, self._token, None)

    def _after_stop(self) -> None:
        INHERITED.pop(self._token, None)

    def put(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> int:
        """Put ``task_fn(*args, **kwargs)`` in; returns its sequence number."""
        signature = self.app.tasks[CALL_TASK_NAME].s(self._reference, list(args), kwargs)
        return self._stream.put(signature, timeout=timeout)
