"""The exceptions celery-ordered raises.

::

    OrderedStreamError
    ├── ConfigurationError     (also celery.exceptions.ImproperlyConfigured)
    ├── UnsendableError        (also TypeError): put() refused a task or its arguments
    ├── StreamClosedError      (also ValueError): put() on a closed stream
    ├── StreamFull             (also queue.Full): put() timed out on a full window
    ├── StreamEmpty            (also queue.Empty and TimeoutError): get() timed out
    ├── StreamExhausted        get() on a closed stream with nothing left
    ├── StreamNotFound         (also LookupError): create=False and no such stream
    ├── StreamStateLost        the stream's state in Redis went back in time
    │   └── StreamDeleted      the stream was deleted (or wiped from Redis) under a handle
    ├── ConsumerFenced         another consumer took the stream over from this one
    ├── ProducerFailed         the producer closed the stream with an error
    ├── DispatchError          sending a claimed task failed; its place holds this error
    ├── RedisUnavailable       Redis could not be reached
    └── TaskFailed             a task failed and its exception class could not be rebuilt
        └── ResultLost         a task's outcome never arrived

A task's own exception is re-raised in the consumer as the same class where it
can be rebuilt; it then carries ``stack_trace``, ``seq``, ``task_name`` and
``stream`` attributes like :class:`TaskFailed` does, and its ``__cause__`` is a
:class:`RemoteTraceback` whose text is the worker's traceback.
"""

from __future__ import annotations

import queue

from celery.exceptions import ImproperlyConfigured


class OrderedStreamError(Exception):
    """Base class of every celery-ordered error.

    ``stream`` is the stream's name and ``seq`` the sequence number the error
    concerns, where they apply (else None).
    """

    def __init__(self, message: str = "", *, stream: str | None = None, seq: int | None = None):
        super().__init__(message)
        self.stream = stream
        self.seq = seq


class ConfigurationError(OrderedStreamError, ImproperlyConfigured):
    """Setup is missing or contradictory (no Redis URL, both url and client...)."""


class UnsendableError(OrderedStreamError, TypeError):
    """``put()`` refused a task or its arguments before claiming a number."""


class StreamClosedError(OrderedStreamError, ValueError):
    """``put()`` on a stream that was closed."""


class StreamFull(OrderedStreamError, queue.Full):
    """``put(timeout=...)`` found the window full for the whole timeout."""


class StreamEmpty(OrderedStreamError, queue.Empty, TimeoutError):
    """``get(timeout=...)`` found no next result for the whole timeout.

    Both a ``queue.Empty`` (as ``queue.Queue.get`` and ``parallel_queue``
    raise) and a ``TimeoutError`` (as ``concurrent.futures`` and
    ``multiprocessing``'s ``imap`` iterators raise), so either ``except``
    catches it.
    """

    def __init__(self, message: str = "", *, stream: str | None = None, seq: int | None = None):
        # OSError (TimeoutError's base) would read a second positional
        # argument as errno; pass the message alone.
        OrderedStreamError.__init__(self, message, stream=stream, seq=seq)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StreamExhausted(OrderedStreamError):
    """``get()`` on a closed stream whose every result has been delivered."""


class StreamNotFound(OrderedStreamError, LookupError):
    """``OrderedResultStream(..., create=False)`` names no stream in that Redis.

    Never created, deleted, or expired after ``ordered_stream_ttl`` unused.
    """


class StreamStateLost(OrderedStreamError):
    """The stream's state in Redis went back in time, so it cannot go on safely.

    A failover to a replica that had not received the latest writes, a
    restore from an older snapshot, or the stream deleted under a running
    producer: numbers would be handed out twice, or a consumer would wait for
    numbers that no longer exist. Raised in the producer and the consumer;
    start the work again on a new stream. ``ordered_wait_replicas`` makes
    every write wait for replicas, so that a failover cannot take it back.
    """


class StreamDeleted(StreamStateLost):
    """The stream was deleted while this handle used it.

    ``delete()``, ``celery ordered purge``, its keys expired after
    ``ordered_stream_ttl`` unused, or its Redis lost every key (a restart
    without persistence, ``FLUSHDB``). Raised at once in producers
    (``put``, ``close``), consumers (``get``) and ``join``; nothing is written
    into Redis, so a deleted stream is never brought back half-way. A
    :class:`StreamStateLost`, so handlers of that catch it too.
    """


class ConsumerFenced(OrderedStreamError):
    """Another consumer took this stream over, so this one may not go on.

    A stream has one consumer at a time: it holds a lease
    (``ordered_consumer_lease``), renewed by each of its round trips. A
    successor takes over once the lease lapses, or at once with
    ``takeover=True`` / :meth:`~celery_ordered.OrderedResultStream.take_over`;
    the consumer it replaced then gets this error instead of skipping or
    repeating outcomes. Its outcomes handed out but not yet acknowledged are
    handed out again by the successor.
    """


class _RemoteFailure(OrderedStreamError):
    """An error that happened elsewhere: its class by name, and its traceback text."""

    def __init__(
        self,
        message: str = "",
        *,
        stream: str | None = None,
        seq: int | None = None,
        exc_type: str = "",
        exc_module: str = "",
        stack_trace: str = "",
    ):
        super().__init__(message, stream=stream, seq=seq)
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.stack_trace = stack_trace


class ProducerFailed(_RemoteFailure):
    """The producer closed the stream with an error: the work was cut short.

    Raised by the consumer after every outcome put before the failure, in
    place of a normal end (and again on each later ``get()``). ``exc_type``
    and ``exc_module`` name the producer's exception class, ``stack_trace``
    holds its traceback text (also shown as the ``__cause__``).
    """


class DispatchError(OrderedStreamError):
    """Sending a task failed after its number was claimed.

    ``put()`` raises it, and the consumer gets it at the task's position, so
    the order has no gap.
    """


class RedisUnavailable(OrderedStreamError, ConnectionError):
    """Redis could not be reached."""


class TaskFailed(_RemoteFailure):
    """A task failed and its exception class could not be rebuilt here.

    ``exc_type`` and ``exc_module`` name the original class, ``stack_trace``
    holds the worker's traceback text and ``task_name`` the task.
    """

    def __init__(
        self,
        message: str = "",
        *,
        stream: str | None = None,
        seq: int | None = None,
        exc_type: str = "",
        exc_module: str = "",
        stack_trace: str = "",
        task_name: str | None = None,
    ):
        super().__init__(
            message,
            stream=stream,
            seq=seq,
            exc_type=exc_type,
            exc_module=exc_module,
            stack_trace=stack_trace,
        )
        self.task_name = task_name


class ResultLost(TaskFailed):
    """A task's outcome never arrived; its place holds this error."""


class RemoteTraceback(Exception):
    """Carries a worker's traceback text as the ``__cause__`` of a task error.

    Python prints it above the consumer's own traceback, so an uncaught task
    error shows where it happened on the worker.
    """

    def __init__(self, stack_trace: str):
        super().__init__(stack_trace)
        self.stack_trace = stack_trace

    def __str__(self) -> str:
        return f'\n"""\n{self.stack_trace.rstrip()}\n"""'
