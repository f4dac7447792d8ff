"""Operations written once, as generators of requests, and the two drivers that run them.

An operation that talks to Redis (claim, pop, a consumer's wait for its next
outcome...) is a generator: it yields a request (a script to run, a command,
a pause), is sent the reply or has the error thrown in at its ``yield``, and
returns its result. ``yield from`` nests one operation in another. The
operation holds the logic: the keys and arguments it builds, how it reads a
reply, which errors it maps to which exceptions, what it decides between two
round trips. A driver only performs requests: :func:`run` with a blocking
function (the threaded stream), :func:`arun` with a coroutine function (the
asyncio stream). So both streams share every decision, and differ only in
how they wait::

    def pop_op(self, ...) -> Step[Batch]:
        reply = yield Script("pop", keys, args)
        return Batch(...)

    batch = steps.run(protocol.pop_op(...), protocol.perform)          # blocking
    batch = await steps.arun(protocol.pop_op(...), aprotocol.perform)  # asyncio

:func:`blocking` makes the blocking method of an operation method, so an
operation is written (and documented) once: ``pop = blocking(pop_op)``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: An operation: yields requests, is sent their replies, returns a ``_T``.
Step = Generator[Any, Any, _T]


@dataclass(frozen=True)
class Script:
    """Run the Lua script ``name`` (see :mod:`celery_ordered.redis.protocol`)."""

    name: str
    keys: list[str]
    args: list[Any]
    #: Whether its writes wait for replicas (``ordered_wait_replicas``); False
    #: for a script that only reads.
    durable: bool = True


@dataclass(frozen=True)
class Command:
    """Send one Redis command, such as ``("BLPOP", key, seconds)``."""

    args: tuple[Any, ...]


@dataclass(frozen=True)
class Pause:
    """Wait ``seconds`` without talking to Redis."""

    seconds: float


@dataclass(frozen=True)
class OnWait:
    """Tell the stream a wait slice passed without number ``head`` arriving."""

    head: int


class _Driven:
    """One operation being driven: the request it waits on, or its result."""

    def __init__(self, op: Step[Any]) -> None:
        self.op = op
        self.request: Any = None
        self.result: Any = None
        # What the last request gave: (reply, None) or (None, error).
        self.outcome: tuple[Any, BaseException | None] = (None, None)

    def advance(self) -> bool:
        """Hand the operation its last outcome; True while it asks for more."""
        reply, error = self.outcome
        try:
            self.request = self.op.send(reply) if error is None else self.op.throw(error)
        except StopIteration as stop:
            self.result = stop.value
            return False
        return True


class Performer(Protocol):
    """An object whose operations' requests its ``perform`` carries out, blocking."""

    def perform(self, request: Any) -> Any:
        """Carry out one request; its reply."""


_S = TypeVar("_S", bound=Performer)


def blocking(op: Callable[Concatenate[_S, _P], Step[_T]]) -> Callable[Concatenate[_S, _P], _T]:
    """The blocking method of the operation method ``op`` (``name_op`` gives ``name``).

    It takes ``op``'s arguments and docstring, and runs the operation with
    its instance's ``perform``.
    """

    @functools.wraps(op)
    def method(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return run(op(self, *args, **kwargs), self.perform)

    method.__name__ = op.__name__.removesuffix("_op")
    method.__qualname__ = op.__qualname__.removesuffix("_op")
    return method


def run(op: Step[_T], perform: Callable[[Any], Any]) -> _T:
    """Drive ``op`` to its result, performing each request with the blocking ``perform``."""
    driven = _Driven(op)
    while driven.advance():
        driven.outcome = _attempt(perform, driven.request)
    result: _T = driven.result
    return result


async def arun(op: Step[_T], perform: Callable[[Any], Awaitable[Any]]) -> _T:
    """Drive ``op`` to its result, awaiting each request with the coroutine function ``perform``.

    A cancellation is not thrown into the operation: it is left at its
    ``yield`` (and closed when dropped), as a cancelled coroutine is.
    """
    task = asyncio.current_task()
    driven = _Driven(op)
    while driven.advance():
        cancels = _cancels(task)
        driven.outcome = await _awaited(perform(driven.request))
        if _cancels(task) > cancels:
            # The task was cancelled during the request, but the cancellation
            # was lost on the way: asyncio.wait_for before Python 3.12 drops one
            # that comes as its inner future completes, and redis-py waits for
            # its writes with it. Deliver it here, before anything else runs.
            raise asyncio.CancelledError
    result: _T = driven.result
    return result


def _cancels(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations ``task`` was asked for and has not dealt with (0 before 3.11)."""
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


def _attempt(perform: Callable[[Any], Any], request: Any) -> tuple[Any, BaseException | None]:
    try:
        return perform(request), None
    except Exception as exc:
        return None, exc


async def _awaited(reply: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    try:
        return await reply, None
    except Exception as exc:
        return None, exc
