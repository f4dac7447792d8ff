"""Argument checks shared by every public entry point.

Each check names the argument it refused and what it takes, and raises at
the call that passed it, before anything reaches Redis or a broker::

    timeout = checks.seconds("timeout", timeout)             # None or >= 0
    lost_after = checks.seconds("lost_after", value, none=False, zero=False)
    prefetch = checks.count("prefetch", prefetch)            # an int >= 1
"""

from __future__ import annotations

import math
from typing import Any, overload


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
def count(name: str, value: None, *, minimum: int = ..., none: bool = ...) -> None: ...
@overload
def count(name: str, value: int, *, minimum: int = ..., none: bool = ...) -> int: ...
@overload
def count(name: str, value: Any, *, minimum: int = ..., none: bool = ...) -> int | None: ...


def count(name: str, value: Any, *, minimum: int = 1, none: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (or None where ``none`` allows it)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}"
        if none:
            allowed = f"None or {allowed}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value
