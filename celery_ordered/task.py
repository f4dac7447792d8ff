"""The worker side: tasks that publish their outcome into a stream.

A stream dispatch carries three message headers, ``co_stream`` (the stream's
name), ``co_seq`` (the task's number) and ``co_ser`` (the serializer for its
outcome). :class:`OrderedTask` looks for them after the task ran: when they are
there it publishes the return value, or the exception with the worker's
traceback, into the stream; when they are not (``.delay()``, ``.apply()``,
a direct call) the task behaves exactly as a plain Celery task.

Plain functions are run by the task ``celery_ordered.call``, which every Celery
app gets once :mod:`celery_ordered` is imported (a ``shared_task``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
import traceback
import types
import weakref
from collections import UserList
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, overload

import redis
from celery import Task, shared_task, signals
from celery._state import _task_stack
from celery.exceptions import NotRegistered, Reject, TaskRevokedError, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from . import codec, liveness
from .config import (
    durability,
    function_allowed,
    redis_client,
    resolve_redis,
    serializer_for,
    stream_ttl,
)
from .redis.protocol import Protocol
from .redis.urls import mask_url

logger = logging.getLogger(__name__)

HEADER_STREAM = "co_stream"
HEADER_SEQ = "co_seq"
HEADER_SERIALIZER = "co_ser"
#: The stream's incarnation id: an outcome for another incarnation (the stream
#: was deleted, and maybe created again under its name) is dropped.
HEADER_INCARNATION = "co_inc"
#: Present when the stream hedges: the worker notes the task's run time
#: (see :func:`celery_ordered.liveness.note_runtime`).
HEADER_HEDGE = "co_hedge"
#: The task's lane (its queue and priority, as its dispatch record starts),
#: which the worker's heartbeat reports as it receives the task.
HEADER_LANE = "co_lane"
#: Present on a hedging stream's backup copy of a task: the first run may still
#: finish, so the copy's expiry (the task's ``expires``, copied) is not its outcome.
HEADER_BACKUP = "co_backup"

#: Name of the task that runs plain functions for streams.
CALL_TASK_NAME = "celery_ordered.call"

#: Name of the task that runs one function or task over a chunk of items.
CHUNK_TASK_NAME = "celery_ordered.chunk"

#: Prefix of a chunk target that names a registered task, not a function.
TASK_TARGET_PREFIX = "task:"

#: Prefix of a function reference that names a function inherited by forked
#: workers rather than imported (see :mod:`celery_ordered.compat`).
INHERITED_PREFIX = "celery_ordered.inherited:"

#: Functions registered before local workers fork, by reference.
INHERITED: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


class ChunkOutcomes(UserList[Any]):
    """What a chunk task returns: its outcomes, one per item, as a list.

    It compares and indexes as the list it wraps (``.data``), which is what
    goes into the stream. Only its ``repr`` differs: a count, not the items
    (see :class:`ChunkTask`).
    """

    def __repr__(self) -> str:
        return f"<{len(self.data)} outcomes>"


class OrderedRequest(Request):
    """The worker's request of a stream's task: it also fills the task's place
    when the pool kills the task at its hard time limit.

    Celery then acknowledges the message (``task_acks_on_failure_or_timeout``)
    and calls the task's ``on_failure`` in the worker's main process, where
    the task's request (and so its stream) is not known: without this the
    place would wait for the outcome until it counted as lost, and the task
    would be sent again, to be killed again.
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Fill the place with ``TimeLimitExceeded`` (a hard limit), then Celery's own."""
        headers = self._request_dict
        # In a cold shutdown Celery records no failure either; a hedging
        # backup's first run, started earlier, meets its own limit first.
        stream_task = headers.get(HEADER_STREAM) is not None and not headers.get(HEADER_BACKUP)
        if not soft and stream_task and not worker_state.should_terminate:
            error = TimeLimitExceeded(
                f"task {self.task.name}[{self.id}] was killed at its hard time "
                f"limit ({timeout:g} s): raise time_limit, or make the task shorter"
            )
            _fill_from_signal(self.task.app, headers.get, self.task.name, error, "time-limit error")
        super().on_timeout(soft, timeout)


class OrderedTask(Task):
    """Base class of tasks whose outcome can go into an ordered stream.

    Use it through :func:`ordered_task`, or as ``@app.task(base=OrderedTask)``.

    Messages are acknowledged late (:attr:`acks_late`) and given back to the
    broker when their worker process dies (:attr:`reject_on_worker_lost`), so
    a task killed mid-run is run again; the stream keeps only the first
    outcome for each number, so a second run never duplicates a result.
    """

    #: Acknowledge a stream's message after the task ran, not before.
    acks_late = True
    #: Requeue the message when the worker process running it dies.
    reject_on_worker_lost = True
    #: Fills the place of a task killed at its hard time limit.
    Request = OrderedRequest

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """Note when the task started, for a hedging stream's run times."""
        if getattr(self.request, HEADER_HEDGE, None):
            self.request.co_started = time.monotonic()
        super().before_start(task_id, args, kwargs)

    def _note_runtime(self, target: tuple[str, int, str]) -> None:
        started = getattr(self.request, "co_started", None)
        if started is not None:
            incarnation = str(getattr(self.request, HEADER_INCARNATION, None) or "")
            liveness.note_runtime(self.app, target[0], incarnation, time.monotonic() - started)

    def _stream_target(self) -> tuple[str, int, str] | None:
        request = self.request
        stream = getattr(request, HEADER_STREAM, None)
        if stream is None:
            return None
        seq = int(getattr(request, HEADER_SEQ))
        serializer = getattr(request, HEADER_SERIALIZER, None) or serializer_for(self.app)
        return str(stream), seq, str(serializer)

    def _publish(self, target: tuple[str, int, str], status: bytes, value: Any) -> None:
        stream, seq, serializer = target
        incarnation = str(getattr(self.request, HEADER_INCARNATION, None) or "")
        try:
            publish_outcome(
                self.app, stream, seq, serializer, status, value, self.name,
                incarnation=incarnation,
            )  # fmt: skip
        except redis.RedisError as exc:
            # Leave the message unacknowledged and put it back: another
            # attempt publishes once Redis answers again.
            logger.error("could not publish %s[%d] to Redis: %r", stream, seq, exc)
            raise Reject(exc, requeue=True) from exc

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Publish the return value when the task came from a stream."""
        target = self._stream_target()
        if target is not None:
            self._publish(target, codec.RESULT, retval)
            self._note_runtime(target)
        super().on_success(retval, task_id, args, kwargs)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Publish the exception and traceback when the task came from a stream."""
        target = self._stream_target()
        if target is not None:
            payload = codec.exception_payload(
                exc, str(getattr(einfo, "traceback", "") or ""), target[2], self.name
            )
            self._publish(target, codec.ERROR, payload)
            self._note_runtime(target)
        super().on_failure(exc, task_id, args, kwargs, einfo)


class ChunkTask(OrderedTask):
    """Base of the tasks that run a chunk of items: ``(target, items, ...)``.

    ``map(..., chunksize=N)`` and ``OrderedExecutor.map(..., chunksize=N)``
    send one per N items. Celery takes the ``repr`` of every message's
    arguments (on the producer) and of every return value (on the worker)
    for its logs and monitors; for a chunk, each walked every item and cost
    more than the chunk's own work. So a chunk's message carries the
    ``argsrepr`` ``('<target>', <N items>)``, and the task returns
    :class:`ChunkOutcomes`, whose ``repr`` is ``<N outcomes>``: its list
    is what goes into the stream.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send the chunk, its ``argsrepr`` its target and item count (unless given)."""
        if args is not None and len(args) >= 2 and "argsrepr" not in options:
            options["argsrepr"] = f"({args[0]!r}, <{len(args[1])} items>)"
        return super().apply_async(args, kwargs, **options)

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        """Publish the outcomes' list (see :meth:`OrderedTask.on_success`)."""
        if isinstance(retval, ChunkOutcomes):
            retval = retval.data
        super().on_success(retval, task_id, args, kwargs)


#: The settings a worker's publish depends on (see :func:`_publishing`).
_PUBLISHING_SETTINGS = (
    "ordered_redis_url", "result_backend", "broker_url", "ordered_redis_transport_options",
    "result_backend_transport_options", "broker_transport_options", "ordered_redis_retry_for",
    "ordered_stream_ttl", "ordered_wait_replicas", "ordered_wait_timeout",
)  # fmt: skip

#: Seconds a worker trusts what :func:`_publishing` resolved before it reads the
#: settings again.
_PUBLISHING_RECHECK = 1.0

# Per app: (when the settings were read, their values, client, TTL, durability).
_publishing_cache: weakref.WeakKeyDictionary[
    Any, tuple[float, tuple[str, ...], Any, float, Any]
] = weakref.WeakKeyDictionary()


def _publishing(app: Any) -> tuple[Any, float, Any]:
    """The client, TTL and durability a worker publishes with, for ``app``.

    Resolving them (reading ten settings through Celery's configuration and
    parsing the Redis URL) cost more client time than the publish's own round
    trip, once per task. They are resolved once per app, and again when one of
    :data:`_PUBLISHING_SETTINGS` changed: the settings are read again at most
    every :data:`_PUBLISHING_RECHECK` seconds.
    """
    now = time.monotonic()
    cached = _publishing_cache.get(app)
    if cached is None or now - cached[0] >= _PUBLISHING_RECHECK:
        settings = tuple(repr(app.conf.get(name)) for name in _PUBLISHING_SETTINGS)
        if cached is None or cached[1] != settings:
            cached = (now, settings, redis_client(app), stream_ttl(app), durability(app))
        else:
            cached = (now, *cached[1:])
        _publishing_cache[app] = cached
    return cached[2], cached[3], cached[4]


def publish_outcome(
    app: Any,
    stream: str,
    seq: int,
    serializer: str,
    status: bytes,
    value: Any,
    task_name: str,
    *,
    incarnation: str = "",
) -> None:
    """Publish one outcome into a stream from a worker (first outcome wins).

    ``incarnation`` (the message's ``co_inc`` header) is the incarnation of
    the stream the number was claimed in; "" publishes without that check.
    """
    try:
        encoded = codec.encode(value, serializer, what=f"result of {task_name}")
    except Exception as exc:  # the result cannot travel: its place holds why
        status = codec.ERROR
        encoded = codec.encode(codec.exception_payload(exc, "", serializer, task_name), serializer)
    client, ttl, wait_for = _publishing(app)
    proto = Protocol(client, stream, ttl=ttl, durability=wait_for)
    stored = proto.publish(seq, encoded.member(seq, status), incarnation=incarnation)
    if stored == 0:
        logger.debug("dropped a duplicate or late outcome for %s[%d]", stream, seq)
    elif stored == -2:
        logger.warning(
            "stream %s went back in time: the Redis at %s has not handed out number %d, "
            "which its producer claimed (a failover to a replica that had not received "
            "the claim?): outcome dropped",
            stream,
            mask_url(resolve_redis(app)[0]),
            seq,
        )
    elif stored < 0:
        logger.warning(
            "stream %s has no number %d in the Redis at %s (deleted, or not the Redis its "
            "producer uses? the worker's ordered_redis_url must name the producer's): "
            "outcome dropped",
            stream,
            seq,
            mask_url(resolve_redis(app)[0]),
        )


def _fill_from_signal(
    app: Any, fields: Callable[[str], Any], name: str, error: Exception, what: str
) -> None:
    """Fill a stream task's place with ``error``, from a worker signal's handler.

    ``fields`` reads one of the task's stream headers (None when absent):
    from the message's headers, or from its request's attributes. A signal
    handler must never break the worker's consumer, so a failed publish is
    logged, as ``what``, and left at that.
    """
    serializer = str(fields(HEADER_SERIALIZER) or serializer_for(app))
    payload = codec.exception_payload(error, "", serializer, name)
    try:
        publish_outcome(
            app, str(fields(HEADER_STREAM)), int(fields(HEADER_SEQ)), serializer, codec.ERROR,
            payload, name, incarnation=str(fields(HEADER_INCARNATION) or ""),
        )  # fmt: skip
    except Exception:
        logger.exception("could not publish the %s for %s", what, fields(HEADER_STREAM))


@signals.task_unknown.connect(weak=False)
def _publish_unknown_task(
    sender: Any = None, message: Any = None, name: str = "?", **_: Any
) -> None:
    """A worker got a stream's task it does not know: fill its place with the error.

    Celery rejects such a message for good, so without this the stream would
    wait for it until its outcome counts as overdue.
    """
    headers = getattr(message, "headers", None) or {}
    if headers.get(HEADER_STREAM) is None or sender is None:
        return
    error = NotRegistered(
        f"task {name!r} is not registered on worker {getattr(sender, 'hostname', '?')}: "
        "import its module in the worker's app (include=[...] or imports=[...]), or "
        "route the stream's tasks to workers that have it"
    )
    _fill_from_signal(sender.app, headers.get, name, error, "unknown-task error")


@signals.task_revoked.connect(weak=False)
def _publish_revoked_task(
    sender: Any = None,
    request: Any = None,
    terminated: bool = False,
    expired: bool = False,
    **_: Any,
) -> None:
    """A stream's task expired, was revoked or terminated: fill its place with the error.

    Celery drops such a message without running the task (or kills the run),
    and sends no outcome: without this the stream would wait for it until its
    outcome counts as overdue, dispatch it again (to expire again), and only
    then give up on it.
    """
    if getattr(request, HEADER_STREAM, None) is None or sender is None:
        return
    if expired and getattr(request, HEADER_BACKUP, None):
        return  # a hedging backup: the first run may still finish
    name = str(getattr(sender, "name", None) or "?")
    if expired:
        why = (
            f"expired before a worker ran it (expires={getattr(request, 'expires', None)}): "
            "give it a later expiry, or none, for work that may wait in a queue"
        )
    elif terminated:
        why = "was terminated while it ran (revoke(..., terminate=True))"
    else:
        why = "was revoked (app.control.revoke) before a worker ran it"
    error = TaskRevokedError(f"task {name}[{getattr(request, 'id', None)}] {why}")
    _fill_from_signal(
        sender.app, lambda field: getattr(request, field, None), name, error, "revoked-task error"
    )


@overload
def ordered_task(fn: F) -> Any: ...


@overload
def ordered_task(*, base: type[OrderedTask] = ..., **options: Any) -> Callable[[F], Any]: ...


def ordered_task(*args: Any, **options: Any) -> Any:
    """Decorate a function as a Celery task whose results can be streamed in order.

    Used like Celery's ``shared_task``, bare or with the same options::

        @ordered_task
        def render(page): ...

        @ordered_task(bind=True, max_retries=3)
        def fetch(self, url): ...

    The task stays an ordinary Celery task (``.delay()`` works as before); put
    into an :class:`~celery_ordered.OrderedResultStream`, its outcome goes into
    the stream at its place in the order.
    """
    base = options.setdefault("base", OrderedTask)
    if not (isinstance(base, type) and issubclass(base, OrderedTask)):
        raise TypeError(
            f"ordered_task(base={base!r}): the base must subclass "
            "celery_ordered.OrderedTask, or the task cannot publish into a stream"
        )
    return shared_task(*args, **options)


def function_reference(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` of a top-level function, or raise TypeError."""
    from .errors import UnsendableError

    name = getattr(fn, "__qualname__", None)
    module = getattr(fn, "__module__", None)
    if not isinstance(name, str) or not isinstance(module, str):
        raise UnsendableError(
            f"{fn!r} is not a plain function and cannot be sent to workers by name: "
            "put a top-level function defined with def, or an @ordered_task task"
        )
    if name == "<lambda>" or name.endswith(".<lambda>"):
        raise UnsendableError(
            f"put() got the lambda {module}.{name}: a lambda cannot be sent to workers. "
            "Define it with def at the top level of a module and put that function"
        )
    if "<locals>" in name:
        outer = name.split(".<locals>")[0]
        raise UnsendableError(
            f"put() got {module}.{name}, a function defined inside {outer}(): workers "
            "cannot import it. Move it to the top level of a module (pass what it "
            "closed over as arguments), or use ParallelSingleTaskQueue, which shares "
            "one function with local workers by inheritance"
        )
    bound_to = getattr(fn, "__self__", None)
    if bound_to is not None and not isinstance(bound_to, types.ModuleType):
        # A worker would call the function without the object it is bound to:
        # its first argument would take the place of ``self``.
        raise UnsendableError(
            f"put() got {module}.{name}, a bound method (of a {type(bound_to).__name__}): "
            "workers get only the function, not the object it is bound to. Put a "
            "top-level function, and pass what it needs of the object as arguments"
        )
    found: Any = importlib.import_module(module) if module != "__main__" else None
    if found is not None:
        for part in name.split("."):
            found = getattr(found, part, None)
        if found is not fn and getattr(found, "__func__", None) is not fn:
            raise UnsendableError(
                f"put() got {module}.{name}, but importing that name gives "
                f"{found!r}, not the same function (a bound method, or a decorated or "
                "rebound name?): put a top-level function that workers can import"
            )
    return f"{module}:{name}"


def resolve_function(app: Any, reference: str) -> Callable[..., Any]:
    """The function a reference names, if ``app`` admits its module."""
    if reference.startswith(INHERITED_PREFIX):
        token = reference[len(INHERITED_PREFIX) :]
        try:
            return INHERITED[token]
        except KeyError:
            raise LookupError(
                f"this worker did not inherit function {token}: a ParallelSingleTaskQueue "
                "function reaches only the local workers it forked"
            ) from None
    module, _, name = reference.partition(":")
    if not function_allowed(app, module):
        raise PermissionError(
            f"workers may not run functions from module {module!r}: add it to the "
            "app setting ordered_function_modules (or wrap the call in an "
            "@ordered_task task)"
        )
    found: Any
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(f"{exc.name}.")):
            raise  # the module itself failed to import one of its own
        # As Celery imports a worker's task modules: from the worker's current
        # directory too (where `celery -A proj worker` ran), not only sys.path.
        # (Only then: it changes sys.path for a moment, for every thread.)
        found = app.loader.import_from_cwd(module)
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            if module == "__main__":
                raise LookupError(
                    f"function {name} is not in this worker's __main__: local workers "
                    "see only what __main__ defined before they were forked (define it "
                    "before starting the queue or cluster), and other workers never see "
                    "the producer's __main__ (move it into a module)"
                ) from None
            raise
    if not callable(found):
        raise TypeError(f"{reference} is not callable")
    return found  # type: ignore[no-any-return]


@contextlib.contextmanager
def chunk_target(app: Any, target: str) -> Iterator[Callable[..., Any]]:
    """What a chunk task calls for each of its items: the target ``target`` names.

    ``target`` is ``"task:NAME"`` (a registered task, called directly, not
    sent) or a plain function reference (see :func:`resolve_function`).

    A task called directly (``Task.__call__``) builds a new request context
    on every call, which costs Celery about 20 us: more than most items'
    work, and more than the rest of a chunk's cost per item. So for a task
    that keeps Celery's ``__call__``, the chunk does once what that call
    does each time (the task becomes Celery's current task, with a request
    of its own), then for each item resets that request to what a new one
    holds, with the item's ``args``, and calls the task's ``run``: the task
    sees what a direct call shows it, and nothing an earlier item left on
    its request. A task whose class defines its own ``__call__`` (to open an
    application context, say) is called through it for every item.
    """
    if not target.startswith(TASK_TARGET_PREFIX):
        yield resolve_function(app, target)
        return
    task = app.tasks[target[len(TASK_TARGET_PREFIX) :]]
    if type(task).__call__ is not Task.__call__:
        yield task
        return
    # As Task.__call__ does (celery.app.task), once for the whole chunk.
    _task_stack.push(task)
    task.push_request(args=(), kwargs={})
    state, run = task.request.__dict__, task.run
    fresh = dict(state)  # what a new request context holds

    def call(*args: Any) -> Any:
        state.clear()
        state.update(fresh, args=args, kwargs={})
        return run(*args)

    try:
        yield call
    finally:
        task.pop_request()
        _task_stack.pop()


@shared_task(name=CALL_TASK_NAME, base=OrderedTask, bind=True)
def call(self: OrderedTask, reference: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run the plain function ``reference`` names on ``args`` and ``kwargs``."""
    return resolve_function(self.app, reference)(*args, **kwargs)


@shared_task(name=CHUNK_TASK_NAME, base=ChunkTask, bind=True)
def chunk(self: ChunkTask, target: str, items: list[Any], star: bool = False) -> ChunkOutcomes:
    """Run ``target`` on each item; one ``["r", value]`` or ``["e", error]`` per item.

    ``target`` is ``"task:NAME"`` (a registered task, called directly, not
    sent) or a plain function reference. With ``star``, each item is a list
    of arguments: ``target(*item)``. An item's exception fails only that
    item: its traceback travels with it.
    """
    serializer = (self._stream_target() or ("", 0, serializer_for(self.app)))[2]
    outcomes: list[list[Any]] = []
    with chunk_target(self.app, target) as function:
        for item in items:
            try:
                outcomes.append(["r", function(*item) if star else function(item)])
            except Exception as exc:
                payload = codec.exception_payload(exc, traceback.format_exc(), serializer, target)
                outcomes.append(["e", payload])
    return ChunkOutcomes(outcomes)
