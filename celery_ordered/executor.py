"""OrderedExecutor: a ``concurrent.futures.Executor`` whose work runs on Celery.

Code written against the standard executor interface (``submit``, ``map``,
``shutdown``, ``with``, ``loop.run_in_executor``) runs on a Celery fleet
unchanged::

    with OrderedExecutor(app, window=64) as executor:
        future = executor.submit(render, 7)        # a Future, as usual
        for html in executor.map(render, pages):   # in order, as usual
            ...

It is built on one private :class:`~celery_ordered.OrderedResultStream`:
``submit`` puts into it (blocking while the window is full), and one thread
of the executor's own reads the outcomes in submission order and completes
the futures, so a future never completes before one submitted earlier.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any

from celery import Celery, Task, shared_task
from celery.canvas import Signature

from . import checks
from .errors import StreamClosedError, StreamExhausted, StreamFull
from .stream import OrderedResultStream
from .task import (
    CALL_TASK_NAME,
    ChunkOutcomes,
    ChunkTask,
    chunk_target,
)

logger = logging.getLogger(__name__)

#: The task that runs one chunk of ``OrderedExecutor.map(..., chunksize=N)``.
CHUNK_TASK_NAME = "celery_ordered.executor.chunk"

SHUTDOWN_MESSAGE = "cannot schedule new futures after shutdown"

#: Keyword arguments ``OrderedResultStream.put`` reads itself: a call that has
#: one goes to ``put`` as a signature.
PUT_OWN_KEYWORDS = frozenset({"timeout"})


@shared_task(name=CHUNK_TASK_NAME, base=ChunkTask, bind=True)
def run_chunk(self: ChunkTask, target: str, calls: list[list[Any]]) -> ChunkOutcomes:
    """Run ``target(*args)`` for each ``args`` of ``calls``, in order, on one worker.

    ``target`` is ``"task:NAME"`` (a registered task, called directly) or a
    plain function reference. As in ``ProcessPoolExecutor``, the first
    exception fails the whole chunk.
    """
    with chunk_target(self.app, target) as function:
        return ChunkOutcomes([function(*args) for args in calls])


class _Shared:
    """What the executor's threads share: never the executor itself, so it can
    be garbage-collected while they run (its finalizer then shuts them down)."""

    def __init__(self, stream: OrderedResultStream) -> None:
        self.stream = stream
        self.cond = threading.Condition()
        # Futures sent and not completed yet, by sequence number.
        self.futures: dict[int, Future[Any]] = {}
        self.submitting = False  # a put is in progress (its number may be claimed)
        self.submits = 0  # how many puts have ended, to tell an orphan outcome
        self.shutdown = False
        self.broken: BaseException | None = None
        self.outcomes: queue.SimpleQueue[tuple[int, bool, Any] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.deleted = False

    def start(self) -> None:
        """Start the reader and completer threads (cond held)."""
        if self.threads:
            return
        name = self.stream.name
        self.threads = [
            threading.Thread(target=self.read, name=f"OrderedExecutor-read-{name}", daemon=True),
            threading.Thread(
                target=self.complete, name=f"OrderedExecutor-complete-{name}", daemon=True
            ),
        ]
        for thread in self.threads:
            thread.start()

    def read(self) -> None:
        """The reader: take outcomes in order, pass them on until the stream ends."""
        stream = self.stream
        try:
            while True:
                before = stream.position
                try:
                    value = stream.get()
                    item = (stream.position - 1, True, value)
                except StreamExhausted:
                    return
                except Exception as exc:
                    if stream.position <= before:  # not an outcome: the stream failed
                        logger.error("OrderedExecutor %s: reading outcomes failed: %r",
                                     stream.name, exc)  # fmt: skip
                        with self.cond:
                            self.broken = exc
                            self.shutdown = True
                        return
                    item = (stream.position - 1, False, exc)
                self.outcomes.put(item)
                del item
        finally:
            self.delete()
            self.outcomes.put(None)

    def complete(self) -> None:
        """The completer: set each future from its outcome, in order.

        A thread apart from the reader, so a done callback that submits (and
        waits for window space) never stops the outcomes that free it.
        """
        while True:
            item = self.outcomes.get()
            if item is None:
                break
            seq, ok, value = item
            del item
            with self.cond:
                # Its put may still be registering the future it sent.
                submits = self.submits
                while seq not in self.futures and self.submitting and self.submits == submits:
                    self.cond.wait()
                future = self.futures.pop(seq, None)
            if future is None:  # its submit failed after claiming (a DispatchError)
                logger.debug("OrderedExecutor %s: no future for outcome %d", self.stream.name, seq)
            elif ok:
                future.set_result(value)
            else:
                future.set_exception(value)
            del future, value
        with self.cond:
            left, self.futures = list(self.futures.values()), {}
            error = self.broken
        for future in left:
            future.set_exception(
                RuntimeError(f"OrderedExecutor {self.stream.name}: the stream ended early")
                if error is None
                else error
            )

    def delete(self) -> None:
        """Delete the stream (once, quietly)."""
        with self.cond:
            if self.deleted:
                return
            self.deleted = True
        try:
            self.stream.delete()
        except Exception as exc:  # its keys expire anyway (ordered_stream_ttl)
            logger.warning("OrderedExecutor %s: deleting the stream failed: %r",
                           self.stream.name, exc)  # fmt: skip

    def stop(self, wait: bool) -> None:
        """Refuse new work, close the stream; with ``wait``, wait for the threads."""
        with self.cond:
            first = not self.shutdown
            self.shutdown = True
            started = bool(self.threads)
            threads = list(self.threads)
            deleted = self.deleted
        if first and not deleted:
            try:
                self.stream.close()  # wakes a submit blocked on the window
            except Exception as exc:
                logger.warning("OrderedExecutor %s: closing the stream failed: %r",
                               self.stream.name, exc)  # fmt: skip
        if not started:
            self.delete()
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


def _stop_in(owner: int, shared: _Shared) -> None:
    """The finalizer of a collected executor: shut it down, in its own process only."""
    if os.getpid() == owner:
        shared.stop(False)


class OrderedExecutor(Executor):
    """A ``concurrent.futures.Executor`` that runs its work on Celery workers.

    ``submit`` returns a ``Future``; ``map`` yields in order; ``shutdown`` and
    ``with`` work as with the standard executors, and code that takes an
    executor (``loop.run_in_executor`` included) runs on a Celery fleet.

    **Order.** The work goes into one private stream, whose outcomes one
    thread of the executor reads in submission order: a future completes
    only once every future submitted before it has. So ``as_completed``
    and ``wait(return_when=FIRST_COMPLETED)`` see the futures complete in
    submission order (``as_completed`` yields those already done when it
    starts first, in no set order), and a slow task holds back the futures
    after it even when their tasks are done (their results wait in Redis).

    **Backpressure.** At most ``window`` tasks are sent ahead of the futures
    completed: ``submit`` blocks while the window is full, until an earlier
    outcome arrives. (From an event loop, ``run_in_executor`` then blocks the
    loop for that while: pick a window at least the number of calls in flight.)

    **Cancelling.** A future is sent to Celery by ``submit`` itself, and is
    running from then on: a Celery task cannot be recalled safely, so
    ``Future.cancel()`` returns False, as it does for a running
    ``ThreadPoolExecutor`` future. What ``shutdown(cancel_futures=True)`` and
    a closed or failed ``map`` cancel is the work not sent yet: a ``submit``
    blocked on the window raises ``RuntimeError``, and ``map`` reads no more
    of its iterables. Sent tasks run to the end; their outcomes are dropped.

    Args:
        app: the Celery app (default: the current app).
        window: how many tasks may be sent ahead of the futures completed
            (default as for :class:`~celery_ordered.OrderedResultStream`).
        redis_url: the Redis holding the executor's stream.
        stream_options: other arguments of
            :class:`~celery_ordered.OrderedResultStream` (``task_options``,
            ``serializer``, ``lost_after``...), except ``name`` and
            ``create``: the stream is the executor's own, deleted after
            :meth:`shutdown` once every outcome was handed out.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        window: int | None = None,
        redis_url: str | None = None,
        **stream_options: Any,
    ) -> None:
        for refused in ("name", "create"):
            if refused in stream_options:
                raise TypeError(
                    f"OrderedExecutor() got {refused}=: its stream is private (a new name, "
                    "deleted after shutdown); use OrderedResultStream for a named stream, "
                    "or read the executor's stream name from executor.name"
                )
        stream = OrderedResultStream(app, window=window, redis_url=redis_url, **stream_options)
        self._shared = _Shared(stream)
        self._submit_lock = threading.Lock()
        # Only in this process: a child forked while the executor was garbage
        # must not close its parent's stream.
        self._finalizer = weakref.finalize(self, _stop_in, os.getpid(), self._shared)

    def __repr__(self) -> str:
        state = "shut down" if self._shared.shutdown else "running"
        return f"<OrderedExecutor {self.name!r} {state}>"

    @property
    def name(self) -> str:
        """The name of the executor's stream (for ``celery ordered inspect NAME``)."""
        return self._shared.stream.name

    @property
    def app(self) -> Celery:
        """The Celery app the work is sent with."""
        return self._shared.stream.app

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Send ``fn(*args, **kwargs)`` to a worker; return its ``Future``.

        ``fn`` is an :func:`~celery_ordered.ordered_task` task, a signature of
        one, or a top-level function (as
        :meth:`~celery_ordered.OrderedResultStream.put` takes). The future
        completes with the task's result, or its exception (the worker's own
        class where it can be rebuilt, with ``stack_trace``), and no earlier
        than the futures submitted before it. Blocks while the window is full.
        A function or arguments that cannot be sent raise here
        (:class:`~celery_ordered.UnsendableError`, a ``TypeError``), and so
        does ``RuntimeError`` after :meth:`shutdown`.
        """
        return self._submit(fn, args, kwargs)

    def _submit(
        self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None
    ) -> Future[Any]:
        """:meth:`submit`; with ``timeout``, ``StreamFull`` if the window stays full that long."""
        if not callable(fn):
            raise TypeError(
                f"submit() needs a callable: an @ordered_task task, a signature of one or "
                f"a top-level function, got {fn!r}"
            )
        if PUT_OWN_KEYWORDS.intersection(kwargs):
            # put() reads these itself: send the call as a signature instead.
            fn, args, kwargs = self._signature(fn, args, kwargs), (), {}
        shared = self._shared
        with self._submit_lock:
            with shared.cond:
                self._check_open()
                shared.submitting = True
                shared.start()
            try:
                seq = shared.stream.put(fn, *args, timeout=timeout, **kwargs)
            except StreamClosedError:
                with shared.cond:
                    shared.shutdown = True
                raise RuntimeError(SHUTDOWN_MESSAGE) from None
            else:
                future: Future[Any] = Future()
                future.set_running_or_notify_cancel()
                with shared.cond:
                    shared.futures[seq] = future
            finally:
                with shared.cond:
                    shared.submitting = False
                    shared.submits += 1
                    shared.cond.notify_all()
        return future

    def _signature(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Signature:
        """``fn(*args, **kwargs)`` as a signature ``put`` sends as it is."""
        if isinstance(fn, Signature):
            return fn.replace(args=(*fn.args, *args), kwargs={**fn.kwargs, **kwargs})
        if isinstance(fn, Task):
            return Signature(fn, args=args, kwargs=kwargs, app=self.app)
        reference = self._shared.stream.producer.function_reference(fn)
        return Signature(
            CALL_TASK_NAME, args=(reference, list(args), kwargs), kwargs={}, app=self.app
        )

    def _check_open(self) -> None:
        if self._shared.broken is not None:
            raise RuntimeError(
                f"{SHUTDOWN_MESSAGE}: the executor's stream {self.name!r} failed "
                f"({self._shared.broken})"
            ) from self._shared.broken
        if self._shared.shutdown:
            raise RuntimeError(SHUTDOWN_MESSAGE)

    def map(
        self,
        fn: Any,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``fn(*args)`` for each ``args`` of ``zip(*iterables)``; results in order.

        The standard semantics: the shortest iterable ends the map; without
        ``buffersize`` every item is submitted by the call itself (so it
        returns once all but a window's worth were sent); with
        ``buffersize``, only that many are submitted ahead of the item the
        caller takes, so an endless iterable works. ``timeout`` (seconds)
        counts from the call: a result not there by then raises
        ``TimeoutError`` (a negative one, as in the standard library, is
        already past). It bounds the sending too: the call returns by then
        even if the window stays full, and the first item that could not be
        sent in time raises ``TimeoutError`` at its place, after the results
        of those sent before it. A failed item raises at its place and ends the map;
        closing the iterator or an error sends nothing more (what was sent
        runs, and its outcomes are dropped). With ``chunksize > 1``, as in
        ``ProcessPoolExecutor``, that many items travel in one Celery message
        (``fn`` then is a task or a top-level function, not a signature) and
        an exception fails its whole chunk.
        """
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout < 0:
            timeout = 0  # the standard map's: long past, a result not there yet times out
        timeout = checks.seconds("timeout", timeout)
        chunksize = checks.count("chunksize", chunksize)
        buffersize = checks.count("buffersize", buffersize, none=True, type_error=True)
        end = None if timeout is None else time.monotonic() + timeout
        items: Iterator[tuple[Any, ...]] = zip(*iterables, strict=False)
        if chunksize > 1:
            target = self._shared.stream.producer.chunk_target(fn)
            chunks = _batched(items, chunksize)
            items = ((run_chunk, target, chunk) for chunk in chunks)
        else:
            items = ((fn, *args) for args in items)
        self._check_open()
        futures: collections.deque[Future[Any]] = collections.deque()
        unsent = None
        for call in itertools.islice(items, buffersize):
            sent = self._send_by(call, end)
            if isinstance(sent, FuturesTimeout):
                unsent = sent
                break
            futures.append(sent)
        return _results(
            weakref.ref(self), futures, items, end, bool(buffersize), chunksize > 1, unsent
        )

    def _send_by(self, call: tuple[Any, ...], end: float | None) -> Future[Any] | FuturesTimeout:
        """The future of ``call`` (``fn, *args``) submitted before ``end``; or, the window
        full until then, the ``TimeoutError`` to raise at its place."""
        timeout = None if end is None else max(0.0, end - time.monotonic())
        try:
            return self._submit(call[0], call[1:], {}, timeout)
        except StreamFull:
            return FuturesTimeout(
                f"map(): the window of stream {self.name!r} stayed full until the map's "
                "timeout; this item and those after it were not sent"
            )

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more work; with ``wait``, return once every future is done.

        The stream is closed at once (a ``submit`` blocked on the window
        raises ``RuntimeError``), and deleted, with the executor's threads
        gone, once every outcome was handed out. Every future sent is
        already running on Celery and completes; ``cancel_futures`` is
        accepted for the standard signature, and has nothing more to cancel.
        Idempotent.
        """
        del cancel_futures  # nothing is queued unsent: see the class docstring
        self._shared.stop(wait)


def _batched(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[list[Any]]]:
    while chunk := [list(args) for args in itertools.islice(items, size)]:
        yield chunk


def _results(
    executor_ref: weakref.ref[OrderedExecutor],
    futures: collections.deque[Future[Any]],
    items: Iterator[tuple[Any, ...]],
    end: float | None,
    buffered: bool,
    chunked: bool,
    unsent: FuturesTimeout | None,
) -> Iterator[Any]:
    """The iterator of :meth:`OrderedExecutor.map` (only a weak reference to the
    executor, which may be collected while the iterator lives). ``unsent``: the
    error of the first item the map could not send by its timeout."""
    try:
        while futures:
            if buffered and unsent is None:
                executor = executor_ref()
                call = next(items, None) if executor is not None else None
                if executor is not None and call is not None:
                    sent = executor._send_by(call, end)
                    if isinstance(sent, FuturesTimeout):
                        unsent = sent
                    else:
                        futures.append(sent)
                    del sent
                del executor, call
            future = futures.popleft()
            try:
                result = future.result(None if end is None else end - time.monotonic())
            finally:
                del future
            if chunked:
                yield from result
            else:
                yield result
            del result
        if unsent is not None:
            raise unsent
    finally:
        for future in futures:
            future.cancel()  # False for those sent: they run, their outcomes dropped
