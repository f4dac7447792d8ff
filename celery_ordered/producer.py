"""The producer part of a stream: prepare, claim, send, reclaim and close.

:class:`Producer` is what :meth:`OrderedResultStream.put`, ``close`` and
``reclaim`` delegate to, and what the map iterators (:mod:`celery_ordered.maps`)
use to claim numbers in blocks. It owns the producer's state: which stream it
writes to, how tasks are encoded and routed, and whether it knows the stream
is closed. It talks to Redis only through :class:`~celery_ordered.redis.protocol.Protocol`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from celery import Celery, Task
from celery.canvas import Signature
from kombu.serialization import prepare_accept_content

from . import codec, liveness
from .config import function_allowed
from .errors import DispatchError, ResultLost, StreamClosedError, StreamFull, UnsendableError
from .redis.protocol import WAIT_SLICE, Claim, Overdue, Protocol
from .task import (
    CALL_TASK_NAME,
    HEADER_BACKUP,
    HEADER_HEDGE,
    HEADER_INCARNATION,
    HEADER_LANE,
    HEADER_SEQ,
    HEADER_SERIALIZER,
    HEADER_STREAM,
    TASK_TARGET_PREFIX,
    OrderedTask,
    function_reference,
)

#: ``apply_async`` options a dispatch record keeps for a re-dispatch.
RECORDED_OPTIONS = frozenset(
    {"queue", "routing_key", "exchange", "priority", "expires", "time_limit",
     "soft_time_limit", "serializer", "compression"}
)  # fmt: skip

#: Status of a dispatch record: a task to send, or a marker to publish.
RECORD_TASK = b"T"
RECORD_MARKER = b"M"

# The stream's logger: users configure the stream's messages by this name.
logger = logging.getLogger("celery_ordered.stream")

#: What turns redis-py's errors into :class:`~celery_ordered.RedisUnavailable`
#: for one stream (the stream's ``_redis_errors``).
RedisErrors = Callable[[], contextlib.AbstractContextManager[None]]


@functools.lru_cache(maxsize=256)
def _signature(function: Any) -> inspect.Signature | None:
    """``function``'s signature, once per function (a map checks every item's put)."""
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # no signature to check against (some builtins)
        return None


def _check_arguments(
    function: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse arguments that ``function``'s signature cannot take (before a claim).

    Sent anyway, such a task took a number and then failed at its place (the
    send raising, or the worker): the error belongs to the put that made it.
    """
    signature = _signature(function) if function is not None else None
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UnsendableError(
            f"put() of {name}{signature} with these arguments: {exc}. Fix the arguments "
            "(nothing was claimed or sent)"
        ) from None


@dataclass(frozen=True)
class Prepared:
    """What ``put`` validated and encoded before claiming a number."""

    #: The dispatch record stored under the number: ``<lane>:T:...`` for a
    #: task, where the lane (:func:`~celery_ordered.liveness.lane_token`) is
    #: the queue and priority it is routed to; ``0:M:...`` for a marker.
    record: bytes
    #: The encoded marker, for a marker; None for a task.
    marker: codec.Encoded | None = None
    #: The task instance to send with, if the app knows it.
    task: Task | None = None
    #: The name the task is sent by.
    task_name: str = ""
    #: Positional arguments of the task.
    args: tuple[Any, ...] = ()
    #: Keyword arguments of the task.
    kwargs: dict[str, Any] | None = None
    #: ``apply_async`` options (the stream's ``task_options`` and the signature's).
    options: dict[str, Any] | None = None


class Producer:
    """The producer part of one stream handle (internal: see ``OrderedResultStream``).

    Prepares (checks and encodes) what is put, claims numbers for it, sends
    the tasks, fills a number whose send failed with the error, re-dispatches
    overdue work (:meth:`reclaim`) and closes the stream.
    """

    def __init__(
        self,
        app: Celery,
        name: str,
        protocol: Protocol,
        *,
        serializer: str,
        task_options: dict[str, Any],
        lost_after: float,
        max_redispatches: int,
        default_window: int,
        redis_errors: RedisErrors,
        overtaken_after: float = 10.0,
        hedge: bool = False,
    ) -> None:
        self.app = app
        self.name = name
        self.protocol = protocol
        self.serializer = serializer
        self.task_options = task_options
        self.lost_after = lost_after
        self.max_redispatches = max_redispatches
        #: Seconds a number no worker received may stay behind a later number
        #: of its queue that a worker received, before reclaim sends it again.
        self.overtaken_after = overtaken_after
        #: Whether the stream hedges: its tasks then report their run times.
        self.hedge = hedge
        self.default_window = default_window
        self.redis_errors = redis_errors
        #: True once this handle knows the stream is closed: it closed it, or
        #: a claim found it closed (by any process). Later puts are refused
        #: before anything is claimed.
        self.known_closed = False
        #: Called when a claim finds the window full: acknowledges what this
        #: handle's own consumer handed out, unless it is busy in ``get``;
        #: True if it did (the claim is then tried again at once).
        self.free_space: Callable[[], bool] = lambda: False
        self._task_accept = prepare_accept_content(app.conf.accept_content or ["json"])
        self._producer_id = uuid.uuid4().hex
        self._next_reclaim = 0.0

    # -- put -----------------------------------------------------------------

    def put(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None
    ) -> int:
        """Prepare, claim and send ``task(*args, **kwargs)``; its number."""
        prepared = self.prepare(task, args, kwargs)
        if self.known_closed:
            raise StreamClosedError(
                f"put() on stream {self.name!r} after close(): open a new stream for more work",
                stream=self.name,
            )
        seq = self.claim(prepared.record, timeout)
        self.send(prepared, seq)
        return seq

    def prepare(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
        """Check and encode a put, before any number is claimed for it.

        Raises ``ValueError`` for a marker given arguments, and
        :class:`~celery_ordered.UnsendableError` (a ``TypeError``) for what
        cannot be sent.
        """
        if not callable(task):
            if args or kwargs:
                raise ValueError(
                    f"put({task!r}, ...): {type(task).__name__} is not callable, so it is a "
                    "marker, and a marker takes no arguments. Put the marker alone, or "
                    "put a callable task with its arguments"
                )
            marker = codec.encode(task, self.serializer, what="marker")
            return Prepared(record=marker.member(0, RECORD_MARKER), marker=marker)
        options = dict(self.task_options)
        if isinstance(task, Signature):
            options.update(task.options)
            args = tuple(task.args) + args
            kwargs = {**task.kwargs, **kwargs}
            name = task.task
            found = self.app.tasks.get(name)
        elif isinstance(task, Task):
            name, found = self._task_in_app(task)
        else:
            reference = self.function_reference(task)
            _check_arguments(task, reference.replace(":", "."), args, kwargs)
            name = CALL_TASK_NAME
            found = self.app.tasks[CALL_TASK_NAME]
            args, kwargs = (reference, list(args), kwargs), {}
        if found is not None and not isinstance(found, OrderedTask):
            raise UnsendableError(
                f"task {name!r} is a plain Celery task, so its workers would not publish "
                "its result into the stream: decorate it with @celery_ordered.ordered_task "
                "(or @app.task(base=celery_ordered.OrderedTask))"
            )
        if found is not None and found.typing and name != CALL_TASK_NAME:
            # As Celery's apply_async checks them (task.typing), before the claim.
            _check_arguments(getattr(found, "__header__", None), name, args, kwargs)
        serializer = options.get("serializer") or getattr(found, "serializer", None)
        serializer = serializer or self.app.conf.task_serializer
        recorded = {
            key: getattr(value, "name", value)  # a kombu Queue or Exchange: by name
            for key, value in options.items()
            if key in RECORDED_OPTIONS
        }
        record = codec.encode(
            {"task": name, "args": list(args), "kwargs": kwargs, "options": recorded},
            serializer,
            what=f"arguments of {name}",
        )
        lane = liveness.lane_of(self.app, name, args, kwargs, options)
        return Prepared(
            record=liveness.lane_token(lane) + record.member(0, RECORD_TASK)[1:],
            task=found,
            task_name=name,
            args=args,
            kwargs=kwargs,
            options=options,
        )

    def _task_in_app(self, task: Task) -> tuple[str, Task]:
        """``task`` as this stream's app knows it: its name and its instance.

        An ``@ordered_task`` is a proxy that resolves through the *current*
        app, which is per thread: put from another thread, a task defined in
        a script (``__main__``) would get another app's name for it, and be
        sent where no worker knows it. Look it up in the stream's app instead.
        """
        name = str(task.name)
        found = self.app.tasks.get(name)
        if found is None and task.app is not self.app:
            function = getattr(task, "__wrapped__", None)
            if function is not None:
                own_name = self.app.gen_task_name(function.__name__, function.__module__)
                if own_name in self.app.tasks:
                    return own_name, self.app.tasks[own_name]
        return name, found if found is not None else task

    def chunk_target(self, task: Any) -> str:
        """What a chunk runs: ``"task:NAME"`` or a plain function reference."""
        if isinstance(task, Task):
            return TASK_TARGET_PREFIX + str(task.name)
        if isinstance(task, Signature) or not callable(task):
            raise UnsendableError(
                f"map(chunksize=...) needs an @ordered_task task or a top-level function, "
                f"got {task!r}; pass chunksize=1 for a signature"
            )
        return self.function_reference(task)

    def function_reference(self, function: Callable[..., Any]) -> str:
        """The reference workers run ``function`` by, if this app lets them."""
        reference = function_reference(function)
        module = reference.partition(":")[0]
        if not function_allowed(self.app, module):
            raise UnsendableError(
                f"{reference}: workers may not run plain functions from module "
                f"{module!r} (standard-library modules are refused unless listed). "
                "Add it to app.conf.ordered_function_modules, or wrap the call in an "
                "@ordered_task task"
            )
        return reference

    # -- claim ---------------------------------------------------------------

    def claim(self, record: bytes, timeout: float | None) -> int:
        """Claim one number for ``record``; blocks while the window is full."""
        return self.claim_block([record], timeout).first

    def claim_block(self, records: list[bytes], timeout: float | None) -> Claim:
        """Claim up to ``len(records)`` numbers in one round trip (at least one).

        Blocks while the window is full; :class:`~celery_ordered.StreamFull`
        after ``timeout`` seconds, :class:`~celery_ordered.StreamClosedError`
        once the stream is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        claim_id = uuid.uuid4().hex
        with self.redis_errors():
            while True:
                claim = self.protocol.claim(
                    records,
                    self.default_window,
                    producer=f"{self._producer_id}-{os.getpid()}-{threading.get_ident()}",
                    claim_id=claim_id,
                    lost_after=self.lost_after,
                )
                if claim.closed:
                    raise self.closed_error()
                if claim.count:
                    return claim
                if self.free_space():
                    # This handle's own consumer acknowledged what it had handed
                    # out: or put and get from one thread would wait on each other.
                    continue
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise self.full_error(timeout)
                self.protocol.wait_space(remaining)

    def closed_error(self) -> StreamClosedError:
        """What a put raises when its claim found the stream closed (noted here)."""
        self.known_closed = True
        return StreamClosedError(
            f"put() on stream {self.name!r}, which is closed: open a new stream for more work",
            stream=self.name,
        )

    def full_error(self, timeout: float | None) -> StreamFull:
        """What a put raises when the window stayed full for its whole ``timeout``."""
        return StreamFull(
            f"stream {self.name!r}: the window stayed full for {timeout}s; "
            "the consumer is behind (get() more, or raise the window)",
            stream=self.name,
        )

    # -- send ----------------------------------------------------------------

    def send(self, prepared: Prepared, seq: int) -> None:
        """Publish a marker at ``seq``, or send the task with number ``seq``.

        A send that fails fills ``seq`` with a :class:`~celery_ordered.DispatchError`
        (so the consumer sees it at its place) and raises it.
        """
        if prepared.marker is not None:
            with self.redis_errors():
                stored = self.protocol.publish(seq, prepared.marker.member(seq, codec.MARKER))
                if stored < 0:
                    raise self.protocol.refused(stored, seq, "put()")
            return
        try:
            self._dispatch_prepared(prepared, seq)
        except Exception as exc:
            raise self._send_failed(prepared, seq, exc) from exc

    def send_many(self, block: list[tuple[Prepared, int]]) -> None:
        """Send a block of claimed numbers at once: :meth:`send` for each, in order.

        The tasks go out over one producer from Celery's pool, in one batch
        where the broker allows it (kombu's ``Producer.batch``: on Redis, one
        pipeline for the whole block instead of a round trip and a new
        client per message); routing, signatures and the message protocol
        are Celery's own, as for ``apply_async``. A send that fails fills its
        number with a :class:`~celery_ordered.DispatchError`, which comes out
        at its place; nothing is raised. When the batch itself fails, every
        task in it is filled so: its delivery is uncertain, and an outcome
        that comes all the same is dropped (the first outcome wins).
        """
        tasks: list[tuple[Prepared, int]] = []
        for prepared, seq in block:
            if prepared.marker is None:
                tasks.append((prepared, seq))
            else:
                self.send(prepared, seq)
        if not tasks:
            return
        filled: set[int] = set()
        try:
            with self.app.producer_or_acquire() as producer:
                batch = getattr(producer, "batch", None)  # kombu >= 5.7
                # Room for each message's commands (a push, and an expiry per
                # priority step for a queue with x-expires): one flush, at the end.
                with batch(max_size=16 * len(tasks)) if batch else contextlib.nullcontext():
                    for prepared, seq in tasks:
                        try:
                            self._dispatch_prepared(prepared, seq, producer=producer)
                        except Exception as exc:
                            filled.add(seq)
                            self._send_failed(prepared, seq, exc)
        except Exception as exc:  # no producer, or the batch failed as a whole
            for prepared, seq in tasks:
                if seq not in filled:
                    self._send_failed(prepared, seq, exc)

    def _send_failed(self, prepared: Prepared, seq: int, exc: Exception) -> DispatchError:
        """Fill ``seq`` with the :class:`~celery_ordered.DispatchError` of a failed send."""
        error = DispatchError(
            f"sending task {prepared.task_name!r} for stream {self.name!r} failed: {exc!r}",
            stream=self.name,
            seq=seq,
        )
        self.fill_with_error(seq, error, prepared.task_name)
        return error

    def _dispatch_prepared(self, prepared: Prepared, seq: int, producer: Any = None) -> None:
        self._dispatch(
            prepared.task,
            prepared.task_name,
            prepared.args,
            prepared.kwargs or {},
            prepared.options or {},
            seq,
            liveness.lane_of_record(prepared.record),
            producer=producer,
        )

    def _dispatch(
        self,
        task: Task | None,
        name: str,
        args: Any,
        kwargs: dict[str, Any],
        options: dict[str, Any],
        seq: int,
        lane: str,
        *,
        producer: Any = None,
        backup: bool = False,
    ) -> None:
        headers = {
            HEADER_STREAM: self.name,
            HEADER_SEQ: seq,
            HEADER_SERIALIZER: self.serializer,
            HEADER_INCARNATION: self.protocol.incarnation,
            HEADER_LANE: lane,
        }
        if self.hedge:
            headers[HEADER_HEDGE] = 1
        if backup:
            headers[HEADER_BACKUP] = 1
        options = dict(options)
        options["headers"] = {**(options.get("headers") or {}), **headers}
        options["ignore_result"] = True
        if producer is not None:
            options["producer"] = producer
        if task is not None:
            task.apply_async(args, kwargs, **options)
        else:
            self.app.send_task(name, args, kwargs, **options)

    def fill_with_error(self, seq: int, error: BaseException, task_name: str) -> None:
        """Publish ``error`` as the outcome of ``seq`` (a failed send, a lost task)."""
        payload = codec.exception_payload(error, "", self.serializer, task_name)
        encoded = codec.encode(payload, self.serializer)
        with self.redis_errors():
            self.protocol.publish(seq, encoded.member(seq, codec.ERROR))

    # -- reclaim -------------------------------------------------------------

    def reclaim(self) -> int:
        """Re-dispatch the tasks whose outcome cannot come, fill hopeless ones; how many.

        (See :meth:`OrderedResultStream.reclaim` and ``reclaim.lua``.)
        """
        with self.redis_errors():
            overdue = self.protocol.reclaim(
                self.lost_after, self.max_redispatches, overtaken_after=self.overtaken_after
            )
        for item in overdue:
            self._act_on_overdue(item)
        return len(overdue)

    #: What each reason reclaim gives means, for the logs and ResultLost.
    WHY: ClassVar[dict[str, str]] = {
        "lapsed": "the worker holding it stopped renewing its lease (it died, froze or lost "
        "its network)",
        "overtaken": "no worker received it, while a task sent after it to its queue was "
        "received (its message was lost)",
        "idle": "no worker held it, and its queue showed no progress for lost_after",
    }

    def _act_on_overdue(self, item: Overdue) -> None:
        seq, record = item.seq, item.record
        _, status, content_type, content_encoding, body = record.split(b":", 4)
        if status == RECORD_MARKER:
            # The producer died between claiming and publishing a marker: the
            # record holds the encoded marker, which goes in as it is.
            encoded = codec.Encoded(content_type.decode(), content_encoding.decode(), body)
            with self.redis_errors():
                self.protocol.publish(seq, encoded.member(seq, codec.MARKER))
            return
        why = self.WHY.get(item.why, item.why or "it was overdue")
        lost = item.lost
        try:
            dispatch = codec.decode(liveness.record_body(record), self._task_accept).value
            name = str(dispatch["task"])
        except Exception as exc:  # unreadable: nothing can be sent again
            logger.error("stream %s: dispatch record of %d is unreadable: %r", self.name, seq, exc)
            lost, name, dispatch = True, "?", {}
        if lost:
            logger.warning(
                "stream %s: no outcome for %d (%s) after %d re-dispatches (%s): filled as lost",
                self.name, seq, name, self.max_redispatches, why,
            )  # fmt: skip
            dispatches = self.max_redispatches + 1
            each = "its one dispatch" if dispatches == 1 else f"each of its {dispatches} dispatches"
            error = ResultLost(
                f"task {name!r} at position {seq} of stream {self.name!r} gave no outcome "
                f"after {each}: its message or its worker was lost (the last time, {why})",
                stream=self.name,
                seq=seq,
                exc_type="ResultLost",
                task_name=name,
            )
            payload = codec.exception_payload(error, "", self.serializer, name)
            member = codec.encode(payload, self.serializer).member(seq, codec.LOST)
            with self.redis_errors():
                self.protocol.publish(seq, member)
            return
        logger.warning("stream %s: number %d (%s) is dispatched again: %s",
                       self.name, seq, name, why)  # fmt: skip
        self._send_again(seq, name, dispatch, record)

    def _send_again(
        self, seq: int, name: str, dispatch: dict[str, Any], record: bytes, *, backup: bool = False
    ) -> None:
        """Send the task of ``seq`` again from its record, decoded (a re-dispatch, a backup)."""
        try:
            self._dispatch(
                self.app.tasks.get(name),
                name,
                dispatch.get("args") or [],
                dispatch.get("kwargs") or {},
                dispatch.get("options") or {},
                seq,
                liveness.lane_of_record(record),
                backup=backup,
            )
        except Exception as exc:  # the broker is down: the number comes due again
            logger.error("stream %s: sending %d again failed: %r", self.name, seq, exc)

    def backup(self, seq: int, record: bytes) -> None:
        """Send a backup copy of ``seq`` from its record (hedging: the first outcome wins)."""
        try:
            dispatch = codec.decode(liveness.record_body(record), self._task_accept).value
        except Exception as exc:
            logger.error("stream %s: dispatch record of %d is unreadable: %r", self.name, seq, exc)
            return
        self._send_again(seq, str(dispatch["task"]), dispatch, record, backup=True)

    def maybe_reclaim(self) -> None:
        """:meth:`reclaim`, unless this handle did so less than :meth:`reclaim_every` ago."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_every()
            self.reclaim()

    def reclaim_every(self) -> float:
        """Seconds between the reclaims of a waiting consumer or ``join()``."""
        return min(self.protocol.wait_slice, max(0.05, self.lost_after / 4))

    # -- close ---------------------------------------------------------------

    def close(self, error: BaseException | None = None) -> None:
        """Close the stream, with the producer's ``error`` if it failed.

        (See :meth:`OrderedResultStream.close`.)
        """
        member = b""
        if error is not None:
            if not isinstance(error, BaseException):
                raise TypeError(
                    f"close(error=...) takes the exception that stopped the producer "
                    f"(or None for a normal end), got {type(error).__name__}: {error!r}"
                )
            member = self._encode_producer_error(error)
        with self.redis_errors():
            self.protocol.close(member)
        self.known_closed = True

    def _encode_producer_error(self, error: BaseException) -> bytes:
        stack_trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        payload = codec.exception_payload(error, stack_trace, self.serializer, None)
        payload.pop("exc", None)  # text travels, never the object: consumers rebuild nothing
        try:
            encoded = codec.encode(payload, self.serializer, what="producer's error")
        except UnsendableError:  # say, a traceback over the size limit: keep its end
            payload["stack_trace"] = stack_trace[-100_000:]
            payload["exc_message"] = [repr(a)[:10_000] for a in error.args]
            encoded = codec.encode(payload, self.serializer, what="producer's error")
        return encoded.member(0, codec.ERROR)
