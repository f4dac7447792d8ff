"""The iterators of ordered maps: :meth:`OrderedResultStream.map` and :func:`imap`.

:class:`OrderedMap` claims numbers in blocks and sends one message per item;
:class:`ChunkedMap` sends many items per message and hands them out one by
one; :func:`imap` runs either on a private stream that it deletes at the end.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery, Task

from . import codec
from .errors import DispatchError, OrderedStreamError, StreamFull
from .stream import OrderedResultStream, _Prepared
from .task import CHUNK_TASK_NAME


class OrderedMap:
    """The iterator :meth:`OrderedResultStream.map` returns.

    It claims numbers in blocks: everything that fits the window goes out
    with one claim (one round trip), then one send per item.
    """

    def __init__(
        self, stream: OrderedResultStream, task: Any, items: Iterator[Any], timeout: float | None
    ) -> None:
        self.stream = stream
        self.task = task
        self.items: Iterator[Any] | None = items
        self.timeout = timeout
        # Items taken and checked, in order, not yet claimed: what put would
        # send, or the error that refused the item.
        self.backlog: collections.deque[_Prepared | BaseException] = collections.deque()
        # One slot per item claimed or refused, in order: None for an item
        # whose outcome comes from the stream, or the error that refused it.
        self.slots: collections.deque[BaseException | None] = collections.deque()
        self.pending = 0  # slots that wait on the stream
        self.closed = False

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
            try:
                if self.task is None:  # the items are ready-made signatures
                    prepared = self.stream._prepare(item, (), {})
                else:
                    prepared = self.stream._prepare(self.task, (item,), {})
            except (TypeError, ValueError) as exc:
                self.backlog.append(exc)  # refused: raised at this item's place
            else:
                self.backlog.append(prepared)

    def _fill(self) -> None:
        """Claim and send what fits the window (at least one if nothing is pending)."""
        while True:
            room = self.stream._window_seen - self.pending
            if self.pending and room <= 0:
                return  # full by this iterator's own count: no round trip to learn it
            self._take(max(room, 1))
            while self.backlog and isinstance(self.backlog[0], BaseException):
                self.slots.append(self.backlog.popleft())  # type: ignore[arg-type]
            run: list[_Prepared] = []
            for entry in self.backlog:
                if isinstance(entry, BaseException) or len(run) >= max(room, 1):
                    break
                run.append(entry)
            if not run:
                if self.items is None and not self.backlog:
                    if not self.closed:
                        self.stream.close()
                        self.closed = True
                    return
                continue
            try:
                claim = self.stream._claim_block(
                    [prepared.record for prepared in run], 0 if self.pending else self.timeout
                )
            except StreamFull:
                if self.pending:
                    return  # hand out an outcome first
                raise
            for offset in range(claim.count):
                prepared = self.backlog.popleft()
                assert isinstance(prepared, _Prepared)
                with contextlib.suppress(DispatchError):
                    # A failed send fills its number with the error, which
                    # comes out of the stream at this item's place.
                    self.stream._send(prepared, claim.first + offset)
                self.slots.append(None)
                self.pending += 1
            if claim.count < len(run):
                return  # the window filled up

    def __next__(self) -> Any:
        self._fill()
        if not self.slots:
            raise StopIteration
        refused = self.slots.popleft()
        if refused is not None:
            raise refused
        self.pending -= 1
        return self.stream.get(timeout=self.timeout)


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
    ) -> None:
        self.stream = stream
        self.target = stream._chunk_target(task)
        self.chunk_task = stream.app.tasks[CHUNK_TASK_NAME]
        self.chunks = OrderedMap(stream, None, self._chunked(items, chunksize), timeout)
        # Outcomes of the chunk being handed out: ("r", value) or ("e", error).
        self.outcomes: collections.deque[tuple[str, Any]] = collections.deque()
        self.sizes = collections.deque()

    def _chunked(self, items: Iterator[Any], size: int) -> Iterator[Any]:
        while True:
            chunk = list(itertools.islice(items, size))
            if not chunk:
                return
            self.sizes.append(len(chunk))
            yield self.chunk_task.s(self.target, chunk)

    def __iter__(self) -> ChunkedMap:
        return self

    def __next__(self) -> Any:
        if not self.outcomes:
            self._next_chunk()
        kind, value = self.outcomes.popleft()
        if kind == "e":
            raise value
        return value

    def _next_chunk(self) -> None:
        try:
            entry = next(self.chunks)
        except StopIteration:
            raise
        except Exception as exc:  # the whole chunk failed or was refused
            size = self.sizes.popleft()
            self.outcomes.extend(("e", exc) for _ in range(size))
            return
        size = self.sizes.popleft()
        for kind, value in entry:
            if kind == "e":
                error = codec.rebuild_exception(
                    value, stream=self.stream.name, seq=self.stream._delivered - 1
                )
                self.outcomes.append(("e", error))
            else:
                self.outcomes.append(("r", value))
        if len(entry) != size:  # pragma: no cover - a worker of another version
            raise OrderedStreamError(f"a chunk of {size} items came back with {len(entry)}")


def imap(
    task: Callable[..., Any] | Task,
    iterable: Any,
    *,
    app: Celery | None = None,
    chunksize: int = 1,
    window: int | None = None,
    timeout: float | None = None,
    **stream_options: Any,
) -> Iterator[Any]:
    """``task(item)`` for each item on Celery workers, outcomes in order.

    Like ``multiprocessing.Pool.imap``, on a Celery app (default: the
    current app): a private stream is made for the run and deleted when the
    iteration ends, is closed or is garbage-collected. A failed item raises
    at its position; ``chunksize`` and ``timeout`` are as for
    :meth:`OrderedResultStream.map`, and ``stream_options`` go to
    :class:`OrderedResultStream`.
    """
    stream = OrderedResultStream(app, window=window, **stream_options)
    try:
        outcomes = stream.map(task, iterable, chunksize=chunksize, timeout=timeout)
    except BaseException:
        stream.delete()
        raise
    return PrivateStreamIterator(stream, outcomes)


class PrivateStreamIterator:
    """Iterates over a private stream's outcomes; deletes the stream after."""

    def __init__(self, stream: OrderedResultStream, outcomes: Iterator[Any]) -> None:
        self.outcomes = outcomes
        self._delete = weakref.finalize(self, _delete_quietly, stream)

    def __iter__(self) -> PrivateStreamIterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.outcomes)
        except StopIteration:
            self.close()
            raise

    def close(self) -> None:
        """Delete the private stream now (also done at the end, or when collected)."""
        self._delete()


def _delete_quietly(stream: OrderedResultStream) -> None:
    with contextlib.suppress(Exception):  # at garbage collection: nobody to tell
        stream.delete()
