"""The consumer's linger: after a small read of outcomes that trickle in fast,
the next read waits for a batch to gather, within the caller's timeout.

Each case puts a real stream's consumer in the state a read leaves behind
(how many outcomes it found, how fast they came lately, how many numbers are
in flight beyond it) and asks how long its next read would wait: the policy
that docs/how-it-works.md describes under "Round trips", decided without
timing anything.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from celery_ordered.config import DEFAULT_CONSUMER_LINGER
from celery_ordered.consumer import LINGER_BATCH


def _after_a_read(
    stream: Any,
    *,
    found: int,
    rate: float,
    in_flight: int,
    window: int = 64,
    closed: bool = False,
) -> Any:
    """The stream's consumer as a read of ``found`` outcomes, just now, leaves it.

    It has acknowledged everything before the read (Redis's cursor is where
    the read began), the window is ``window``, and ``closed`` tells whether
    the read found the stream closed after the numbers in flight.
    """
    consumer = stream.consumer
    consumer._acked = 100 - found
    consumer._read = 100
    consumer._claimed_seen = 100 + in_flight
    consumer.window_seen = window
    consumer._closed_at = 100 + in_flight if closed else None
    consumer._rate = rate
    consumer._last_read_at = time.monotonic()
    consumer._last_found = found
    return consumer


def test_a_small_read_of_fast_outcomes_waits_for_a_batch_to_gather(make_stream: Any) -> None:
    # Given outcomes coming at 1,600 a second: a batch gathers in 10 ms
    consumer = _after_a_read(make_stream(), found=2, rate=1600.0, in_flight=50)
    # Then the next read waits about that long
    assert 0.005 < consumer._lingering(None) <= LINGER_BATCH / 1600.0


def test_the_wait_is_never_longer_than_the_linger(make_stream: Any) -> None:
    # Given outcomes coming at 400 a second: a batch would take 40 ms
    consumer = _after_a_read(make_stream(), found=3, rate=400.0, in_flight=50)
    # Then the next read waits the linger at most (20 ms by default)
    assert consumer.linger == DEFAULT_CONSUMER_LINGER
    assert DEFAULT_CONSUMER_LINGER / 2 < consumer._lingering(None) <= DEFAULT_CONSUMER_LINGER


def test_a_wait_never_outlasts_the_callers_timeout(make_stream: Any) -> None:
    consumer = _after_a_read(make_stream(), found=1, rate=400.0, in_flight=50)
    deadline = time.monotonic() + 0.002
    assert consumer._lingering(deadline) <= 0.002
    assert consumer._lingering(time.monotonic()) == 0.0  # get(timeout=0)


@pytest.mark.parametrize(
    ("found", "rate", "in_flight", "why"),
    [
        (LINGER_BATCH, 5000.0, 500, "the last read found a batch already"),
        (1, 5000.0, 0, "no number is in flight beyond what was read"),
        (
            1,
            5000.0,
            LINGER_BATCH - 1,
            "fewer numbers are in flight than a batch and the window has no room for one: "
            "the outcomes to come are read as they come",
        ),
        (1, 50.0, 50, "outcomes come slower than two per linger (a put, then a get)"),
        (1, 0.0, 50, "no rate is known yet (the first reads)"),
    ],
)
def test_the_next_read_is_at_once_when(
    make_stream: Any, found: int, rate: float, in_flight: int, why: str
) -> None:
    consumer = _after_a_read(
        make_stream(), found=found, rate=rate, in_flight=in_flight, window=LINGER_BATCH
    )
    assert consumer._lingering(None) == 0.0, why


def test_few_numbers_in_flight_still_linger_while_the_window_has_room_for_a_batch(
    make_stream: Any,
) -> None:
    # Given a producer thread putting as fast as the workers run: only two
    # numbers in flight beyond the read, outcomes coming at 1,600 a second,
    # and room in the window for more than a batch of claims meanwhile
    consumer = _after_a_read(make_stream(), found=1, rate=1600.0, in_flight=2, window=64)
    # Then the next read waits for a batch to gather, as with many in flight
    assert 0.005 < consumer._lingering(None) <= LINGER_BATCH / 1600.0


def test_the_last_numbers_of_a_closed_stream_are_read_as_they_come(make_stream: Any) -> None:
    # Given the same reads, but the stream was closed after the two in flight
    consumer = _after_a_read(
        make_stream(), found=1, rate=1600.0, in_flight=2, window=64, closed=True
    )
    # Then no batch can follow them: the next read is at once
    assert consumer._lingering(None) == 0.0


def test_the_app_setting_sets_the_linger_and_zero_turns_it_off(app: Any, make_stream: Any) -> None:
    saved = app.conf.get("ordered_consumer_linger")
    try:
        app.conf.ordered_consumer_linger = 0.05
        assert make_stream().consumer.linger == 0.05
        app.conf.ordered_consumer_linger = 0
        consumer = _after_a_read(make_stream(), found=1, rate=5000.0, in_flight=50)
        assert consumer.linger == 0
        assert consumer._lingering(None) == 0.0
    finally:
        app.conf.ordered_consumer_linger = saved
