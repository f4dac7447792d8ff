"""Numeric ``ordered_*`` settings are checked where they are read (issue 11, item 14)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from celery import Celery

from celery_ordered import ConfigurationError, OrderedResultStream, config

#: Each numeric setting, with a value it must refuse that the old checks let
#: through or refused with another error (TypeError, or a message about another name).
BAD = [
    ("ordered_lost_after", value)
    for value in (-1, "3", True, math.inf, math.nan, 0)
] + [
    ("ordered_stream_ttl", value) for value in (-1, "60", False, math.inf, math.nan)
] + [
    ("ordered_redis_retry_for", value) for value in (-0.5, "20", True, math.inf, math.nan)
] + [
    ("ordered_max_redispatches", value) for value in (-1, "3", True, 2.0, math.inf)
] + [
    ("ordered_window", value) for value in (0, -1, "8", True, 8.0, math.inf, math.nan)
] + [
    ("ordered_wait_replicas", value) for value in (-1, "1", True, 1.0, math.nan)
]  # fmt: skip


@pytest.mark.parametrize(("setting", "value"), BAD, ids=lambda v: repr(v))
def test_a_bad_numeric_setting_is_refused_naming_it(
    redis_url: str, setting: str, value: Any
) -> None:
    app = Celery("bad-setting", set_as_current=False)
    app.conf.update({"ordered_redis_url": redis_url, setting: value})
    with pytest.raises(ConfigurationError, match=f"app.conf.{setting} must be") as raised:
        OrderedResultStream(app, create=False, name="never-created")
    assert repr(value) in str(raised.value)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("ordered_wait_timeout", math.inf),
        ("ordered_wait_timeout", 0),
        ("ordered_wait_timeout", "5"),
    ],
)
def test_the_wait_timeout_is_checked_when_replicas_are_asked_for(setting: str, value: Any) -> None:
    app = Celery("bad-wait", set_as_current=False)
    app.conf.update({"ordered_wait_replicas": 1, setting: value})
    with pytest.raises(ConfigurationError, match=f"app.conf.{setting} must be"):
        config.durability(app)


def test_good_settings_are_read_as_they_are() -> None:
    app = Celery("good", set_as_current=False)
    app.conf.update(
        ordered_lost_after=90,
        ordered_stream_ttl=0,
        ordered_redis_retry_for=2.5,
        ordered_max_redispatches=0,
        ordered_window=16,
        ordered_wait_replicas=0,
    )
    assert config.lost_after(app) == 90.0
    assert config.stream_ttl(app) == 0.0
    assert config.redis_retry_for(app) == 2.5
    assert config.max_redispatches(app) == 0
    assert config.default_window(app) == 16
    assert config.durability(app) is None
