"""Settings read from the Celery app's configuration, checked when read.

Settings live in the Celery app's configuration under an ``ordered_`` prefix,
the way Celery's own Redis backend reads ``redis_socket_timeout``:

===================================  ======================================
``ordered_redis_url``                Redis holding the streams (else the
                                     result backend or broker URL, when it
                                     is Redis)
``ordered_redis_transport_options``  Sentinel options, as Celery spells
                                     them: ``master_name``,
                                     ``sentinel_kwargs``,
                                     ``min_other_sentinels``
``ordered_window``                   a fixed window cap (else adaptive, from 10 x CPUs)
``ordered_serializer``               outcome serializer (else
                                     ``result_serializer``)
``ordered_function_modules``         modules whose plain functions workers
                                     may run
``ordered_stream_ttl``               seconds an unused stream's keys live
                                     (1 day)
``ordered_lost_after``               seconds a task no worker holds may
                                     wait while its queue shows no
                                     progress (1 h)
``ordered_max_redispatches``         re-dispatches of an overdue task (3)
``ordered_worker_lease``             seconds a worker's hold on a task
                                     lasts without a heartbeat (15)
``ordered_overtaken_after``          seconds a task no worker received may
                                     stay behind a later one of its queue
                                     that a worker received (10)
``ordered_stall_warning``            seconds a consumer waits on one
                                     number before it logs why (30)
``ordered_consumer_linger``          seconds a consumer lets outcomes
                                     gather between small reads (0.02)
``ordered_hedge``                    send a backup of a straggling task
                                     (False; True or a factor)
``ordered_redis_retry_for``          seconds to retry a failing Redis (20)
``ordered_wait_replicas``            replicas each write waits for (0)
``ordered_wait_timeout``             seconds a write waits for them (20)
===================================  ======================================

The streams' Redis is one server, a Redis Cluster or a primary managed by
Sentinel, told apart by the URL (see :func:`parse_redis_url`).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from celery import Celery

from . import checks
from .errors import ConfigurationError
from .redis.clients import DEFAULT_REDIS_RETRY_FOR, Client, client_for
from .redis.protocol import DEFAULT_WAIT_TIMEOUT, Durability
from .redis.urls import (
    URL_FORMS,
    as_redis_url,
    mask_url,
    parse_redis_url,
)

#: Default window cap per CPU, as the original parallel_queue sized its buffer.
DEFAULT_WINDOW_PER_CPU = 10

#: Largest window accepted: beyond it "bounded memory" means nothing.
MAX_WINDOW = 1_000_000

#: The most a default window grows to (it adapts: see :func:`window_adapts`).
#: A window set by the user is fixed, whatever its size.
ADAPTIVE_WINDOW_CEILING = 1024

#: Seconds an unused stream's keys live before Redis drops them.
DEFAULT_STREAM_TTL = 24 * 3600.0

#: Seconds after its dispatch when a task's missing outcome counts as overdue.
#: It matches the Redis transport's default visibility timeout, after which
#: kombu itself redelivers the message of a worker that vanished.
DEFAULT_LOST_AFTER = 3600.0

#: Times an overdue task is dispatched again before its place is filled with
#: a :class:`~celery_ordered.ResultLost` error.
DEFAULT_MAX_REDISPATCHES = 3

#: Seconds a worker's hold on a task (its lease) lasts after its last
#: heartbeat: a worker that died, froze or lost its network lets its tasks go
#: this long after its last beat. It beats every third of it.
DEFAULT_WORKER_LEASE = 15.0

#: Seconds a task no worker has received may stay behind a task sent after it
#: to the same queue that a worker did receive, before it counts as lost.
DEFAULT_OVERTAKEN_AFTER = 10.0

#: Seconds a consumer waits on the same number before it logs a warning that
#: says why (at most 30 s: the issue's bar).
DEFAULT_STALL_WARNING = 30.0

#: Seconds a consumer lets outcomes gather before its next read from Redis,
#: after a read that found only a few while many numbers are in flight (see
#: :class:`celery_ordered.consumer.ConsumerCore`). Like Kafka's
#: ``fetch.max.wait.ms`` and ``linger.ms``: a little latency, in steady
#: state only, for reads that each carry a batch.
DEFAULT_CONSUMER_LINGER = 0.02

#: How many times the typical run time the head-of-line task runs before a
#: hedging stream sends a backup copy (``hedge=True``).
DEFAULT_HEDGE_FACTOR = 4.0


#: The keys of ``ordered_redis_transport_options``: Celery's names for the
#: same options of its own Sentinel broker and result backend.
TRANSPORT_OPTIONS = frozenset({"master_name", "sentinel_kwargs", "min_other_sentinels"})

#: Where each setting that may name the streams' Redis keeps its transport options.
_OPTIONS_SETTING = {
    "ordered_redis_url": "ordered_redis_transport_options",
    "result_backend": "result_backend_transport_options",
    "broker_url": "broker_transport_options",
}


#: Settings of ours that Celery must hide wherever it shows the configuration
#: (``celery report``, ``celery inspect conf``, ``app.conf.humanize()``): a
#: Redis URL holds its password.
HIDDEN_SETTINGS = ("ordered_redis_url",)


def hide_settings_from_celery() -> None:
    """Make Celery mask :data:`HIDDEN_SETTINGS` as it masks its own secrets.

    Celery hides a setting whose name matches ``celery.app.utils.HIDDEN_SETTINGS``
    (``PASS``, ``SECRET``, ``KEY``...) and sanitizes only its own URL settings;
    it offers no hook to register another, so the names of ours are added to
    that pattern, once, when celery-ordered is imported (the ``celery`` command
    imports it through its ``celery.commands`` entry point, workers through
    their tasks). Every other setting is masked exactly as before.
    """
    from celery.app import utils

    pattern = getattr(utils, "HIDDEN_SETTINGS", None)
    if not isinstance(pattern, re.Pattern):
        return  # a Celery without the pattern masks by other means
    missing = [name for name in HIDDEN_SETTINGS if not pattern.search(name)]
    if missing:
        names = "|".join(f"^{re.escape(name)}$" for name in missing)
        utils.HIDDEN_SETTINGS = re.compile(f"{pattern.pattern}|{names}", pattern.flags)


hide_settings_from_celery()


def default_window(app: Celery) -> int:
    """The window a new stream gets when none is given."""
    configured = app.conf.get("ordered_window")
    if configured is not None:
        try:
            return validate_window(configured)
        except (TypeError, ValueError) as exc:
            # validate_window's message begins with "window": name the setting.
            raise ConfigurationError(f"app.conf.ordered_{exc}") from None
    return DEFAULT_WINDOW_PER_CPU * (os.cpu_count() or 1)


def window_adapts(app: Celery) -> bool:
    """True if a stream opened without ``window=`` gets an adaptive window.

    It does unless the app sets ``ordered_window``: the default (10 x the
    CPU count) is then a floor, and the consumer's round trips grow it, up
    to :data:`ADAPTIVE_WINDOW_CEILING`, while the window is what holds work
    back, and shrink it back while outcomes wait for the consumer.
    """
    return app.conf.get("ordered_window") is None


def validate_window(window: object) -> int:
    """Return ``window`` if it is a usable window cap.

    Not an int: :class:`TypeError`; below 1 or over :data:`MAX_WINDOW`:
    :class:`ValueError`.
    """
    return checks.count(
        "window",
        window,
        maximum=MAX_WINDOW,
        type_error=True,
        hint="it is how many tasks may run ahead of the consumer, such as window=64; "
        f"more than {MAX_WINDOW} no longer bounds memory",
    )


def _seconds(app: Celery, setting: str, default: float, *, allow_zero: bool = True) -> float:
    """The setting as a finite number of seconds (``default`` when unset).

    Anything else (a string, a bool, a negative number, infinity, NaN) is a
    :class:`~celery_ordered.ConfigurationError` naming the setting, raised
    where the setting is read rather than deep inside a Redis call.
    """
    value = app.conf.get(setting)
    if value is None:
        return default
    try:
        seconds: float = checks.seconds(setting, value, none=False, zero=allow_zero)
    except ValueError as exc:
        raise ConfigurationError(
            f"app.conf.{exc}; unset it for the default of {default:g}"
        ) from None
    return seconds


def _count(app: Celery, setting: str, default: int, *, minimum: int = 0) -> int:
    """The setting as an int >= ``minimum`` (``default`` when unset), else ConfigurationError."""
    value = app.conf.get(setting)
    if value is None:
        return default
    try:
        number: int = checks.count(setting, value, minimum=minimum)
    except ValueError as exc:
        raise ConfigurationError(f"app.conf.{exc}; unset it for the default of {default}") from None
    return number


def stream_ttl(app: Celery) -> float:
    """Seconds an unused stream's keys live (0: forever)."""
    return _seconds(app, "ordered_stream_ttl", DEFAULT_STREAM_TTL)


def lost_after(app: Celery) -> float:
    """Seconds before a task's missing outcome counts as overdue."""
    return _seconds(app, "ordered_lost_after", DEFAULT_LOST_AFTER, allow_zero=False)


def max_redispatches(app: Celery) -> int:
    """Times an overdue task is dispatched again before it counts as lost."""
    return _count(app, "ordered_max_redispatches", DEFAULT_MAX_REDISPATCHES)


def worker_lease(app: Celery) -> float:
    """Seconds a worker's lease on a task it holds lasts without a heartbeat."""
    return _seconds(app, "ordered_worker_lease", DEFAULT_WORKER_LEASE, allow_zero=False)


def overtaken_after(app: Celery) -> float:
    """Seconds a task no worker received may stay behind a later one that was."""
    return _seconds(app, "ordered_overtaken_after", DEFAULT_OVERTAKEN_AFTER, allow_zero=False)


def stall_warning(app: Celery) -> float:
    """Seconds a consumer waits on one number before it logs why."""
    return _seconds(app, "ordered_stall_warning", DEFAULT_STALL_WARNING, allow_zero=False)


def consumer_linger(app: Celery) -> float:
    """Seconds a consumer lets outcomes gather between small reads (0: never)."""
    return _seconds(app, "ordered_consumer_linger", DEFAULT_CONSUMER_LINGER)


def hedge_factor(app: Celery, hedge: object = None) -> float | None:
    """The hedging factor of ``hedge`` (the stream argument), else of ``ordered_hedge``.

    False (the default): no hedging; True: :data:`DEFAULT_HEDGE_FACTOR`; a
    number above 1: that factor. Returns None for no hedging.
    """
    if hedge is None:
        hedge = app.conf.get("ordered_hedge")
        name = "app.conf.ordered_hedge"
    else:
        name = "hedge"
    if hedge is None or hedge is False:
        return None
    if hedge is True:
        return DEFAULT_HEDGE_FACTOR
    if isinstance(hedge, (int, float)) and math.isfinite(hedge) and hedge > 1:
        return float(hedge)
    error = ConfigurationError if name.startswith("app.") else ValueError
    raise error(
        f"{name} must be False, True (a backup once the head-of-line task has run "
        f"{DEFAULT_HEDGE_FACTOR:g} times the stream's typical run time) or a number "
        f"above 1 (that many times), got {hedge!r}"
    )


def redis_retry_for(app: Celery) -> float:
    """Seconds to keep retrying a Redis that fails to answer."""
    return _seconds(app, "ordered_redis_retry_for", DEFAULT_REDIS_RETRY_FOR)


def serializer_for(app: Celery) -> str:
    """The serializer outcomes are encoded with by default."""
    return str(app.conf.get("ordered_serializer") or app.conf.result_serializer or "json")


def accepted_content(app: Celery, serializer: str) -> set[str]:
    """Content types a consumer decodes: the app's accepted result content."""
    accept = app.conf.result_accept_content or app.conf.accept_content or [serializer]
    return set(accept) | {serializer}


def _own_transport_options(app: Celery) -> dict[str, Any]:
    options = app.conf.get("ordered_redis_transport_options")
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"ordered_redis_transport_options must be a dict, got {type(options).__name__}"
        )
    unknown = sorted(set(options) - TRANSPORT_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"ordered_redis_transport_options has unknown option(s) {unknown}: it takes "
            f"{sorted(TRANSPORT_OPTIONS)}"
        )
    return dict(options)


def resolve_redis(app: Celery, redis_url: str | None = None) -> tuple[str, dict[str, Any]]:
    """The streams' Redis URL and the transport options that go with it.

    The URL is ``redis_url``, else ``ordered_redis_url``, else the result
    backend's or the broker's when it is Redis; the options are
    ``ordered_redis_transport_options`` for the first two, else the matching
    Celery setting (``result_backend_transport_options``,
    ``broker_transport_options``), so a Celery app already on Sentinel needs
    nothing more. The URL is checked here, so a bad one fails at the call.
    """
    if redis_url is not None:
        found = as_redis_url(redis_url)
        if found is None:
            raise ConfigurationError(
                f"redis_url {mask_url(str(redis_url))!r} is not a Redis URL: use {URL_FORMS}"
            )
        parse_redis_url(found)
        return found, _own_transport_options(app)
    for setting, options_setting in _OPTIONS_SETTING.items():
        found = as_redis_url(app.conf.get(setting))
        if found is not None:
            parse_redis_url(found)
            if setting == "ordered_redis_url":
                return found, _own_transport_options(app)
            return found, dict(app.conf.get(options_setting) or {})
    raise ConfigurationError(
        "celery-ordered does not know which Redis holds its streams: set "
        "app.conf.ordered_redis_url = 'redis://host:6379/0' (or use Redis as the "
        "result backend or broker), or pass redis_url= to OrderedResultStream"
    )


def redis_client(app: Celery, redis_url: str | None = None, *, fail_fast: bool = False) -> Client:
    """The shared client of the Redis holding ``app``'s streams (or ``redis_url``).

    ``fail_fast``: see :func:`client_for`.
    """
    url, options = resolve_redis(app, redis_url)
    return client_for(url, redis_retry_for(app), transport_options=options, fail_fast=fail_fast)


def durability(app: Celery) -> Durability | None:
    """What ``ordered_wait_replicas`` and ``ordered_wait_timeout`` ask for (None: no waiting)."""
    replicas = _count(app, "ordered_wait_replicas", 0)
    if replicas == 0:
        return None
    timeout = _seconds(app, "ordered_wait_timeout", DEFAULT_WAIT_TIMEOUT, allow_zero=False)
    return Durability(replicas, timeout)


def function_allowed(app: Celery, module: str) -> bool:
    """Whether workers of ``app`` may run plain functions from ``module``.

    ``ordered_function_modules`` lists module names (a name also admits its
    submodules); ``"*"`` admits every module. Unset, any module outside the
    standard library is admitted: a broker message can then never make a
    worker run ``os.system`` or ``subprocess.run``.
    """
    allowed = app.conf.get("ordered_function_modules")
    top = module.split(".")[0]
    if allowed is None:
        return top not in sys.stdlib_module_names and top != "builtins"
    if isinstance(allowed, str):
        allowed = [allowed]
    return any(a == "*" or module == a or module.startswith(a + ".") for a in allowed)
