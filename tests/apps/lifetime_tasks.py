"""Callables for the tests of private clusters' lifetimes (importable by name)."""

from __future__ import annotations

import gc
from typing import Any


class PermutationTask:
    """Waits on ``events[data]``, then returns ``data``: holds an item until released."""

    def __init__(self, events: list[Any], order: tuple[int, ...]) -> None:
        self.events = events
        self.order = order

    def __call__(self, data: int) -> int:
        self.events[data].wait()
        return data


def task_1() -> int:
    """A top-level function returning 1."""
    return 1


def collect_garbage() -> int:
    """Run a full garbage collection in the worker process; returns what it found."""
    return gc.collect()
