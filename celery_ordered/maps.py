"""The iterators of ordered maps: :meth:`OrderedResultStream.map`, ``starmap``,
:func:`imap` and :func:`starmap`.

:class:`OrderedMap` claims numbers in blocks and sends one message per item;
:class:`ChunkedMap` sends many items per message and hands them out one by
one; :func:`imap` and :func:`starmap` run either on a private stream that
they delete at the end. :func:`map_iterator` picks the iterator.

They behave as ``multiprocessing.Pool.imap`` does where it matters:

- An item's failure raises at its position; the iteration goes on after it.
- An exception raised by the input iterable itself comes out after the
  outcomes of every item read before it, once, and ends the iteration (the
  stream is closed with that error, so other consumers of a shared stream
  see :class:`~celery_ordered.ProducerFailed` there instead of a normal end).
- ``close()`` ends the iteration at once, as it does a generator.
- A timeout (:class:`~celery_ordered.StreamEmpty`, also a ``TimeoutError``)
  loses nothing: ``next()`` again waits for the same item.
- The end acknowledges every outcome handed out and gives up the consumer
  lease, so other handles' ``stats()`` and a later consumer see the stream
  fully delivered, and a later consumer need not wait for the lease.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery import Celery, Task

from . import checks, codec
from .errors import OrderedStreamError, StreamEmpty, StreamFull
from .producer import Prepared
from .stream import OrderedResultStream
from .task import CHUNK_TASK_NAME


class _InputFailed:
    """The exception the input iterable raised, at its place among the items."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


#: What ``OrderedMap.backlog`` holds per item: what put would send, the error
#: that refused the item, or the input's own failure (always last).
_Entry = Prepared | BaseException | _InputFailed

#: What ``OrderedMap.slots`` holds per item: None for an outcome the stream
#: hands out, else the error raised at this place.
_Slot = None | BaseException | _InputFailed


def map_iterator(
    stream: OrderedResultStream,
    task: Any,
    iterables: tuple[Iterable[Any], ...],
    *,
    star: bool = False,
    chunksize: int = 1,
    timeout: float | None = None,
) -> OrderedMap | ChunkedMap:
    """The iterator of ``stream.map(task, *iterables)`` (``star``: of ``starmap``).

    With one iterable and ``star=False``, ``task(item)`` per item; with
    several, ``task(*items)`` over ``zip(*iterables)`` (the shortest ends
    it); with ``star=True``, ``task(*item)`` per item of the one iterable.
    Arguments are checked here, at the call.
    """
    chunksize = checks.count("chunksize", chunksize)
    timeout = checks.seconds("timeout", timeout)
    if not iterables:
        raise TypeError("map() needs at least one iterable of items to call the task on")
    if star and len(iterables) != 1:
        raise TypeError("starmap() takes one iterable of argument tuples")
    if task is not None and not callable(task):
        # Refused here, before anything is put or closed: the stream stays usable.
        raise TypeError(
            f"map() got {task!r} as its task, which is not callable: pass the task (an "
            "@ordered_task, a signature or a top-level function) first, then the items "
            "(a marker goes in alone, with put())"
        )
    items: Iterator[Any]
    if len(iterables) == 1:
        items = iter(iterables[0])
    else:
        items = zip(*iterables, strict=False)  # the shortest ends it, as map() does
        star = True
    if chunksize == 1:
        return OrderedMap(stream, task, items, timeout, star=star)
    return ChunkedMap(stream, task, items, timeout, chunksize, star=star)


class OrderedMap:
    """The iterator :meth:`OrderedResultStream.map` returns.

    It claims numbers in blocks: everything that fits the window goes out
    with one claim (one round trip), then one send per item.
    """

    def __init__(
        self,
        stream: OrderedResultStream,
        task: Any,
        items: Iterator[Any],
        timeout: float | None,
        *,
        star: bool = False,
    ) -> None:
        self.stream = stream
        self.task = task
        self.items: Iterator[Any] | None = items
        self.timeout = timeout
        self.star = star
        # Items taken and checked, in order, not yet claimed.
        self.backlog: collections.deque[_Entry] = collections.deque()
        # One slot per item claimed or refused, in order.
        self.slots: collections.deque[_Slot] = collections.deque()
        self.pending = 0  # slots that wait on the stream
        self.closed = False  # the stream was closed by this iterator
        self.input_error: BaseException | None = None
        #: True once the iteration has ended (exhausted, failed input or close()).
        self.finished = False

    def __iter__(self) -> OrderedMap:
        return self

    def _take(self, wanted: int) -> None:
        """Top the backlog up to ``wanted`` checked items."""
        while self.items is not None and len(self.backlog) < wanted:
            try:
                item = next(self.items)
            except StopIteration:
                self.items = None
                return
            except Exception as exc:  # the input itself failed: after what it gave
                self.items = None
                self.input_error = exc
                self.backlog.append(_InputFailed(exc))
                return
            try:
                if self.task is None:  # the items are ready-made signatures
                    prepared = self.stream.producer.prepare(item, (), {})
                else:
                    args = _star_args(item) if self.star else (item,)
                    prepared = self.stream.producer.prepare(self.task, args, {})
            except (TypeError, ValueError) as exc:
                self.backlog.append(exc)  # refused: raised at this item's place
            else:
                self.backlog.append(prepared)

    def _fill(self, deadline: float | None) -> None:
        """Claim and send what fits the window (at least one if nothing is pending).

        With work pending, it claims again only once half the window is free
        (hysteresis): then one acknowledgement, one claim and one batch of
        messages carry half a window of items, instead of a round trip or
        two for each outcome handed out.
        """
        while True:
            if self.items is None and not self.backlog:
                self._close_stream()
                return
            window = self.stream.consumer.window_seen
            room = window - self.pending
            if self.pending and room < max(1, window // 2):
                return  # full enough by this iterator's own count: no round trip
            self._take(max(room, 1))
            while self.backlog and not isinstance(self.backlog[0], Prepared):
                refused = self.backlog.popleft()
                assert not isinstance(refused, Prepared)
                self.slots.append(refused)
            run: list[Prepared] = []
            for entry in self.backlog:
                if not isinstance(entry, Prepared) or len(run) >= max(room, 1):
                    break
                run.append(entry)
            if not run:
                continue
            wait = 0.0 if self.pending else _remaining(deadline)
            if self.pending:
                # What was handed out frees its place in Redis's count first,
                # or the claim would find the window full.
                self.stream.consumer.acknowledge_if_idle()
            try:
                records = [prepared.record for prepared in run]
                claim = self.stream.producer.claim_block(records, wait)
            except StreamFull as exc:
                if self.pending:
                    return  # hand out an outcome first
                raise StreamEmpty(
                    f"stream {self.stream.name!r}: no window space for the next item within "
                    f"{self.timeout}s (the map's timeout); the outcomes ahead of it are not "
                    "consumed",
                    stream=self.stream.name,
                ) from exc
            block: list[tuple[Prepared, int]] = []
            for offset in range(claim.count):
                prepared = self.backlog.popleft()
                assert isinstance(prepared, Prepared)
                block.append((prepared, claim.first + offset))
            # A failed send fills its number with the error, which comes out of
            # the stream at its item's place.
            self.stream.producer.send_many(block)
            self.slots.extend(None for _ in block)
            self.pending += len(block)
            if claim.count < len(run):
                return  # the window filled up

    def _grow_before_waiting(self, deadline: float | None) -> None:
        """With the window full and nothing read, read once before waiting; fill what grew.

        A read that finds the head missing with the window full is what grows
        an adaptive window (docs/how-it-works.md). This iterator is the
        stream's producer too: if it went straight into a wait for the head,
        the room that read made would stay unused until the head arrived, and
        a wide fleet would start at the floor's few tasks for a whole task's
        run. At most one read more per window filled.
        """
        consumer = self.stream.consumer
        window = consumer.window_seen
        if consumer.buffered or self.pending < window or (self.items is None and not self.backlog):
            return
        consumer.read_now()
        if consumer.window_seen > window:
            self._fill(deadline)

    def _close_stream(self) -> None:
        """Close the stream once: with the input's error if it failed."""
        if not self.closed:
            self.closed = True
            self.stream.close(error=self.input_error)

    def _finish(self) -> None:
        """End the iteration: nothing more is read, put or handed out."""
        if self.finished:
            return
        self.finished = True
        self.items = None
        self.backlog.clear()
        self.slots.clear()
        self.pending = 0
        self._close_stream()
        # Every outcome handed out is delivered, for every handle, and the
        # consumer lease is free: a later consumer need not wait for it to lapse.
        self.stream.release()

    def _outcome(self) -> tuple[bool, Any]:
        """``(True, value)`` or ``(False, error)`` for the next item, in order.

        Raises StopIteration at the end. An error of the stream itself (a
        timeout, Redis gone) propagates and leaves the item's place as it was,
        so the next call waits for the same item again.
        """
        if self.finished:
            raise StopIteration
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self._fill(deadline)
        if not self.slots:
            self._finish()
            raise StopIteration
        slot = self.slots[0]
        if slot is None:
            self._grow_before_waiting(deadline)
            handed_out = self.stream.consumer.handed_out
            try:
                value = self.stream.get(timeout=_remaining(deadline))
            except Exception as exc:
                if self.stream.consumer.handed_out == handed_out:
                    raise  # not this item's outcome: the stream failed, or timed out
                self.slots.popleft()
                self.pending -= 1
                return False, exc
            self.slots.popleft()
            self.pending -= 1
            return True, value
        self.slots.popleft()
        if isinstance(slot, _InputFailed):
            self._finish()
            return False, slot.error
        return False, slot

    def __next__(self) -> Any:
        ok, value = self._outcome()
        if ok:
            return value
        raise value

    def close(self) -> None:
        """End the iteration now, as a generator's ``close()`` does.

        Nothing more is read from the input or put; the stream is closed
        (the outcomes already put stay in it for other consumers) and what
        was handed out is acknowledged. ``next()`` then raises StopIteration.
        """
        self._finish()


def _star_args(item: Any) -> tuple[Any, ...]:
    """The arguments a starmap item holds; a TypeError that says so if it holds none."""
    try:
        return tuple(item)
    except TypeError:
        raise TypeError(
            f"starmap() got the item {item!r}, which is not a tuple of arguments: give "
            "starmap() tuples (task(*item) per item), or use map() for one argument per item"
        ) from None


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class ChunkedMap:
    """The iterator :meth:`OrderedResultStream.map` returns with ``chunksize > 1``."""

    sizes: collections.deque[int]

    def __init__(
        self,
        stream: OrderedResultStream,
        task: Any,
        items: Iterator[Any],
        timeout: float | None,
        chunksize: int,
        *,
        star: bool = False,
    ) -> None:
        self.stream = stream
        self.target = stream.producer.chunk_target(task)
        self.chunk_task = stream.app.tasks[CHUNK_TASK_NAME]
        self.star = star
        self.chunks = OrderedMap(stream, None, self._chunked(items, chunksize), timeout)
        # Outcomes of the chunk being handed out: (True, value) or (False, error).
        self.outcomes: collections.deque[tuple[bool, Any]] = collections.deque()
        self.sizes = collections.deque()

    def _chunked(self, items: Iterator[Any], size: int) -> Iterator[Any]:
        while True:
            chunk: list[Any] = []
            failure: Exception | None = None
            try:
                # (With star, an item that is no argument tuple fails on the
                # worker, at its own place.)
                chunk.extend(itertools.islice(items, size))
            except Exception as exc:  # the input failed: the items it gave go out first
                failure = exc
            if chunk:
                self.sizes.append(len(chunk))
                if self.star:
                    yield self.chunk_task.s(self.target, chunk, star=True)
                else:
                    yield self.chunk_task.s(self.target, chunk)
            if failure is not None:
                self.sizes.append(1)
                raise failure
            if len(chunk) < size:
                return

    @property
    def finished(self) -> bool:
        """True once the iteration has ended."""
        return self.chunks.finished and not self.outcomes

    def __iter__(self) -> ChunkedMap:
        return self

    def __next__(self) -> Any:
        if not self.outcomes:
            self._next_chunk()
        ok, value = self.outcomes.popleft()
        if ok:
            return value
        raise value

    def _next_chunk(self) -> None:
        ok, entry = self.chunks._outcome()  # StopIteration and stream errors go up
        size = self.sizes.popleft()
        if not ok:  # the whole chunk failed or was refused, or the input failed
            self.outcomes.extend((False, entry) for _ in range(size))
            return
        position = self.stream.position - 1
        for kind, value in entry:
            if kind == "e":
                error = codec.rebuild_exception(value, stream=self.stream.name, seq=position)
                self.outcomes.append((False, error))
            else:
                self.outcomes.append((True, value))
        if len(entry) != size:  # pragma: no cover - a worker of another version
            raise OrderedStreamError(f"a chunk of {size} items came back with {len(entry)}")

    def close(self) -> None:
        """End the iteration now, as a generator's ``close()`` does (see
        :meth:`OrderedMap.close`)."""
        self.outcomes.clear()
        self.chunks.close()


def imap(
    task: Callable[..., Any] | Task,
    iterable: Iterable[Any],
    *iterables: Iterable[Any],
    app: Celery | None = None,
    chunksize: int = 1,
    window: int | None = None,
    timeout: float | None = None,
    **stream_options: Any,
) -> Iterator[Any]:
    """``task(item)`` for each item on Celery workers, outcomes in order.

    Like ``multiprocessing.Pool.imap``, on a Celery app (default: the
    current app): a private stream is made for the run and deleted when the
    iteration ends, is closed (``close()``) or is garbage-collected. With
    several iterables, ``task(*items)`` over ``zip(*iterables)``, the
    shortest ending it, as the builtin ``map`` does. A failed item raises at
    its position; an exception of the input iterable raises once, after the
    outcomes of the items read before it, and ends the iteration.
    ``chunksize`` and ``timeout`` (seconds each ``next()`` may wait) are as
    for :meth:`OrderedResultStream.map`; ``stream_options`` go to
    :class:`OrderedResultStream`.
    """
    return _private(task, (iterable, *iterables), False, app, chunksize, window, timeout,
                    stream_options)  # fmt: skip


def starmap(
    task: Callable[..., Any] | Task,
    iterable: Iterable[Iterable[Any]],
    *,
    app: Celery | None = None,
    chunksize: int = 1,
    window: int | None = None,
    timeout: float | None = None,
    **stream_options: Any,
) -> Iterator[Any]:
    """``task(*args)`` for each ``args`` of ``iterable``, outcomes in order.

    :func:`imap` for argument tuples, like ``multiprocessing.Pool.starmap``
    but lazy (an iterator, as ``itertools.starmap``): on a private stream,
    deleted when the iteration ends, is closed or is garbage-collected.
    """
    return _private(task, (iterable,), True, app, chunksize, window, timeout, stream_options)


def _private(
    task: Any,
    iterables: tuple[Iterable[Any], ...],
    star: bool,
    app: Celery | None,
    chunksize: int,
    window: int | None,
    timeout: float | None,
    stream_options: dict[str, Any],
) -> PrivateStreamIterator:
    chunksize = checks.count("chunksize", chunksize)
    timeout = checks.seconds("timeout", timeout)
    stream = OrderedResultStream(app, window=window, **stream_options)
    try:
        outcomes = map_iterator(
            stream, task, iterables, star=star, chunksize=chunksize, timeout=timeout
        )
    except BaseException:
        stream.delete()
        raise
    return PrivateStreamIterator(stream, outcomes)


class PrivateStreamIterator:
    """Iterates over a private stream's outcomes; deletes the stream after."""

    def __init__(self, stream: OrderedResultStream, outcomes: OrderedMap | ChunkedMap) -> None:
        #: The private stream's name.
        self.name = stream.name
        self.outcomes = outcomes
        # Only the process that made the stream deletes it: a child forked
        # while this iterator was garbage must not end its parent's stream.
        self._delete = weakref.finalize(self, _delete_quietly, stream, os.getpid())

    def __iter__(self) -> PrivateStreamIterator:
        return self

    def __next__(self) -> Any:
        if not self._delete.alive:
            raise StopIteration  # closed: exhausted, as a closed generator
        try:
            return next(self.outcomes)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            if self.outcomes.finished:  # the input's failure was the last outcome
                self.close()
            raise

    def close(self) -> None:
        """End the iteration and delete the private stream now (also done at the
        end, or when collected); ``next()`` then raises StopIteration."""
        self._delete()


def _delete_quietly(stream: OrderedResultStream, owner: int) -> None:
    if os.getpid() != owner:
        return
    with contextlib.suppress(Exception):  # at garbage collection: nobody to tell
        stream.delete()
