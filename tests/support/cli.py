"""The ``celery ordered`` command of the tests' app, run in this process."""

from __future__ import annotations

from typing import Any

from celery.bin.celery import celery as celery_command
from click.testing import CliRunner


def run_ordered(*args: str, input: str | None = None) -> Any:
    """``celery -A tests.apps.celeryapp ordered ARGS...`` through click's runner; its result."""
    return CliRunner().invoke(
        celery_command, ["-A", "tests.apps.celeryapp", "ordered", *args], input=input
    )
