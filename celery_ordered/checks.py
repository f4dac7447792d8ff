"""Argument checks shared by every public entry point.

Each check names the argument it refused and what it takes, and raises at
the call that passed it, before anything reaches Redis or a broker::

    timeout = checks.seconds("timeout", timeout)             # None or >= 0
    lost_after = checks.seconds("lost_after", value, none=False, zero=False)
    prefetch = checks.count("prefetch", prefetch)            # an int >= 1
    total = checks.count("total", total, minimum=0, none=True, type_error=True)
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload


@overload
def seconds(name: str, value: None, *, none: bool = ..., zero: bool = ...) -> None: ...
@overload
def seconds(name: str, value: float, *, none: bool = ..., zero: bool = ...) -> float: ...
@overload
def seconds(name: str, value: Any, *, none: bool = ..., zero: bool = ...) -> float | None: ...


def seconds(name: str, value: Any, *, none: bool = True, zero: bool = True) -> float | None:
    """``value`` as a finite number of seconds, or None where ``none`` allows it.

    ``zero=False`` refuses 0 too. Booleans, strings, NaN and infinity are
    refused: a wait without limit is spelled None.
    """
    if value is None and none:
        return None
    lowest = ">= 0" if zero else "> 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        allowed = f"a finite number of seconds {lowest}"
        if none:
            allowed = f"None (no limit) or {allowed}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@overload
def count(
    name: str,
    value: Any,
    *,
    minimum: int = ...,
    maximum: int | None = ...,
    none: Literal[False] = ...,
    type_error: bool = ...,
    hint: str = ...,
) -> int: ...
@overload
def count(
    name: str,
    value: Any,
    *,
    minimum: int = ...,
    maximum: int | None = ...,
    none: bool,
    type_error: bool = ...,
    hint: str = ...,
) -> int | None: ...


def count(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    none: bool = False,
    type_error: bool = False,
    hint: str = "",
) -> int | None:
    """``value`` as an int from ``minimum`` to ``maximum`` (or None where ``none`` allows it).

    A value that is not an int raises :class:`TypeError` with ``type_error``
    (as the standard library does for ``Executor.map(buffersize=)``), else
    :class:`ValueError`; one out of range raises :class:`ValueError`.
    ``hint``, what the argument means, ends every message.
    """
    if value is None and none:
        return None
    allowed = f"an int >= {minimum}"
    if none:
        allowed = f"None or {allowed}"
    tail = f": {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, int):
        if type_error:
            raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}{tail}")
        raise ValueError(f"{name} must be {allowed}, got {value!r}{tail}")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}{tail}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} {value} is over the limit of {maximum}{tail}")
    return value
