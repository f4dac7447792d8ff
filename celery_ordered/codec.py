"""How outcomes travel through Redis: one encoded member per outcome.

A member is ``b"<seq>:<status>:<content type>:<content encoding>:" + body``,
where the body is the outcome encoded by a serializer from kombu's registry.
The number keeps members unique (two outcomes never collapse into one), the
content type lets the consumer refuse what it does not accept, exactly as
Celery's result backends do.

Exceptions travel as a mapping (``exc_type``, ``exc_module``, ``exc_message``,
``stack_trace``), rebuilt on the consumer the way Celery's backends rebuild
them: the class is looked up only among modules already imported, and must be
an exception class. With an exception-capable serializer (pickle) the
exception object itself rides along too, so it round-trips exactly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from kombu.serialization import dumps, loads

from .errors import RemoteTraceback, ResultLost, TaskFailed, UnsendableError

RESULT = b"r"
ERROR = b"e"
MARKER = b"m"
LOST = b"l"

#: Largest encoded value accepted, in bytes: arguments, results and markers
#: sit in Redis while their task is in flight, once per task of the window.
MAX_PAYLOAD = 16 * 1024 * 1024

#: Serializers that can carry exception objects exactly.
EXCEPTION_CAPABLE = frozenset({"pickle"})


@dataclass(frozen=True)
class Encoded:
    """An outcome encoded by a serializer, ready to be given its number."""

    content_type: str
    content_encoding: str
    body: bytes

    def member(self, seq: int, status: bytes) -> bytes:
        """The encoded member that stores this outcome at ``seq`` (its value in ``results``)."""
        head = b"%d:%s:%s:%s:" % (
            seq,
            status,
            self.content_type.encode(),
            self.content_encoding.encode(),
        )
        return head + self.body


def encode(obj: Any, serializer: str, what: str = "value") -> Encoded:
    """Encode ``obj`` with ``serializer`` or raise :class:`UnsendableError`."""
    try:
        content_type, content_encoding, body = dumps(obj, serializer=serializer)
    except Exception as exc:
        raise UnsendableError(
            f"cannot encode the {what} with the {serializer!r} serializer: {exc}. "
            f"Pass only values {serializer} can encode, or choose another serializer "
            "(serializer='pickle' for Python objects, if every party trusts the others)"
        ) from exc
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    if len(body) > MAX_PAYLOAD:
        raise UnsendableError(
            f"{what} too large: {len(body) / 2**20:.1f} MiB encoded, over the limit of "
            f"{MAX_PAYLOAD / 2**20:.0f} MiB; store the data elsewhere (a file, object "
            "storage, a database row) and pass a reference to it"
        )
    return Encoded(content_type, content_encoding or "binary", body)


@dataclass(frozen=True)
class Outcome:
    """One decoded member."""

    seq: int
    status: bytes
    value: Any


def decode(member: bytes, accept: set[str] | None) -> Outcome:
    """Decode a member; ``accept`` limits the content types (None: any)."""
    seq, status, ctype, cenc, body = member.split(b":", 4)
    value = loads(body, ctype.decode(), cenc.decode(), accept=accept)
    return Outcome(int(seq), status, value)


def _json_safe(values: tuple[Any, ...]) -> list[Any]:
    safe = []
    for value in values:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        safe.append(value)
    return safe


def exception_payload(
    exc: BaseException, stack_trace: str, serializer: str, task_name: str | None
) -> dict[str, Any]:
    """The mapping that carries ``exc`` to the consumer."""
    cls = type(exc)
    exc_type, exc_module, args = cls.__qualname__, cls.__module__, exc.args
    if cls.__name__ == "UnpickleableExceptionWrapper" and hasattr(exc, "exc_cls_name"):
        # Celery hands on_failure this stand-in for an exception that does
        # not pickle: name the original class, not the wrapper.
        exc_type = str(getattr(exc, "exc_cls_name", exc_type))
        exc_module = str(getattr(exc, "exc_module", exc_module))
        args = tuple(getattr(exc, "exc_args", ()) or ())
    payload: dict[str, Any] = {
        "exc_type": exc_type,
        "exc_module": exc_module,
        "exc_message": _json_safe(args),
        "stack_trace": stack_trace,
        "task_name": task_name,
    }
    if serializer in EXCEPTION_CAPABLE and exc_type == cls.__qualname__:
        try:
            dumps(exc, serializer=serializer)
        except Exception:  # an exception that does not pickle: the mapping will do
            pass
        else:
            payload["exc"] = exc
    return payload


def _find_class(module: str, qualname: str) -> type[Exception] | None:
    """The class named, if it is an ``Exception`` class already imported here.

    A ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit``...) is never rebuilt: raised
    in the consumer it would pass through ``except Exception`` and stop the
    consumer's process or loop. Such a name becomes a :class:`TaskFailed`.
    """
    found: Any = sys.modules.get(module)
    if found is None:
        return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def rebuild_exception(
    payload: dict[str, Any], *, stream: str, seq: int, lost: bool = False
) -> BaseException:
    """The exception to raise in the consumer for a failed task.

    Always an ``Exception``: a name that is not one (or cannot be rebuilt)
    gives a :class:`TaskFailed` naming it.
    """
    stack_trace = str(payload.get("stack_trace") or "")
    task_name = payload.get("task_name")
    exc_type = str(payload.get("exc_type") or "Exception")
    exc_module = str(payload.get("exc_module") or "")
    args = payload.get("exc_message") or []
    if not isinstance(args, (list, tuple)):
        args = [args]
    exc: BaseException | None = payload.get("exc") if not lost else None
    if not isinstance(exc, Exception):  # see _find_class: no SystemExit and the like
        exc = None
        cls = None if lost else _find_class(exc_module, exc_type)
        if cls is not None:
            try:
                exc = cls(*args)
            except Exception:  # a constructor with other needs: fall back below
                exc = None
    if exc is None:
        message = ", ".join(str(a) for a in args)
        error_cls = ResultLost if lost else TaskFailed
        exc = error_cls(
            f"{exc_module}.{exc_type}: {message}" if exc_module and not lost else message,
            stream=stream,
            seq=seq,
            exc_type=exc_type,
            exc_module=exc_module,
            stack_trace=stack_trace,
            task_name=task_name,
        )
    exc.stack_trace = stack_trace  # type: ignore[attr-defined]
    exc.seq = seq  # type: ignore[attr-defined]
    exc.stream = stream  # type: ignore[attr-defined]
    exc.task_name = task_name  # type: ignore[attr-defined]
    if stack_trace:
        exc.__cause__ = RemoteTraceback(stack_trace)
    return exc
