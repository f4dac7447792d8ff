"""Settings read from the Celery app, and the Redis clients they lead to.

Settings live in the Celery app's configuration under an ``ordered_`` prefix,
the way Celery's own Redis backend reads ``redis_socket_timeout``:

=============================  ============================================
``ordered_redis_url``          Redis holding the streams (else the result
                               backend or broker URL, when it is Redis)
``ordered_window``             default window cap (else 10 x CPU count)
``ordered_serializer``         outcome serializer (else ``result_serializer``)
``ordered_function_modules``   modules whose plain functions workers may run
``ordered_stream_ttl``         seconds an unused stream's keys live (1 day)
``ordered_lost_after``         seconds before an outcome counts as overdue (1 h)
``ordered_max_redispatches``   re-dispatches of an overdue task (3)
``ordered_redis_retry_for``    seconds to retry a failing Redis (20)
=============================  ============================================
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import ConfigurationError

#: Default window cap per CPU, as the original parallel_queue sized its buffer.
DEFAULT_WINDOW_PER_CPU = 10

#: Largest window accepted: beyond it "bounded memory" means nothing.
MAX_WINDOW = 1_000_000

#: Seconds an unused stream's keys live before Redis drops them.
DEFAULT_STREAM_TTL = 24 * 3600.0

#: Seconds after its dispatch when a task's missing outcome counts as overdue.
#: It matches the Redis transport's default visibility timeout, after which
#: kombu itself redelivers the message of a worker that vanished.
DEFAULT_LOST_AFTER = 3600.0

#: Times an overdue task is dispatched again before its place is filled with
#: a :class:`~celery_ordered.ResultLost` error.
DEFAULT_MAX_REDISPATCHES = 3

#: Seconds to keep retrying a Redis that fails to answer before giving up.
DEFAULT_REDIS_RETRY_FOR = 20.0

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")


def default_window(app: Celery) -> int:
    """The window a new stream gets when none is given."""
    configured = app.conf.get("ordered_window")
    if configured is not None:
        return validate_window(configured)
    return DEFAULT_WINDOW_PER_CPU * (os.cpu_count() or 1)


def validate_window(window: object) -> int:
    """Return ``window`` if it is a usable window cap, else raise ValueError."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(
            f"window must be an int, got {type(window).__name__} {window!r}: "
            "pass how many tasks may run ahead of the consumer, such as window=64"
        )
    if window < 1:
        raise ValueError(
            f"window must be at least 1, got {window}: it is how many tasks may run "
            "ahead of the consumer"
        )
    if window > MAX_WINDOW:
        raise ValueError(
            f"window {window} is over the limit of {MAX_WINDOW}: a window that large "
            "no longer bounds memory; pick the most results you can hold at once"
        )
    return window


def _seconds(app: Celery, setting: str, default: float, *, allow_zero: bool = True) -> float:
    value = app.conf.get(setting)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigurationError(f"{setting} must be a number of seconds >= 0, got {value!r}")
    if not allow_zero and value == 0:
        raise ConfigurationError(f"{setting} must be more than 0 seconds")
    return float(value)


def stream_ttl(app: Celery) -> float:
    """Seconds an unused stream's keys live (0: forever)."""
    return _seconds(app, "ordered_stream_ttl", DEFAULT_STREAM_TTL)


def lost_after(app: Celery) -> float:
    """Seconds before a task's missing outcome counts as overdue."""
    return _seconds(app, "ordered_lost_after", DEFAULT_LOST_AFTER, allow_zero=False)


def max_redispatches(app: Celery) -> int:
    """Times an overdue task is dispatched again before it counts as lost."""
    value = app.conf.get("ordered_max_redispatches")
    if value is None:
        return DEFAULT_MAX_REDISPATCHES
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"ordered_max_redispatches must be an int >= 0, got {value!r}")
    return value


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


def _as_redis_url(url: Any) -> str | None:
    if isinstance(url, (list, tuple)):
        url = url[0] if url else None
    if not isinstance(url, str):
        return None
    text: str = url.split(";")[0].strip()
    if not text.startswith(_REDIS_SCHEMES):
        return None
    if text.startswith("redis+socket://"):
        return "unix://" + text[len("redis+socket://") :]
    return text


def resolve_redis_url(app: Celery, redis_url: str | None = None) -> str:
    """Where the streams live: the argument, else settings, else Celery's Redis."""
    if redis_url is not None:
        found = _as_redis_url(redis_url)
        if found is None:
            raise ConfigurationError(
                f"redis_url {redis_url!r} is not a Redis URL: use redis://, rediss:// or unix://"
            )
        return found
    for setting in ("ordered_redis_url", "result_backend", "broker_url"):
        found = _as_redis_url(app.conf.get(setting))
        if found is not None:
            return found
    raise ConfigurationError(
        "celery-ordered does not know which Redis holds its streams: set "
        "app.conf.ordered_redis_url = 'redis://host:6379/0' (or use Redis as the "
        "result backend or broker), or pass redis_url= to OrderedResultStream"
    )


class _Refused(Exception):
    """Carries an error that retrying cannot mend through redis-py's Retry."""


class _Retry(Retry):
    """redis-py's Retry, but a wrong password or ACL fails at once.

    Authentication errors are connection errors to redis-py, so they would be
    retried for the whole ``retry_for`` although they stay wrong.
    """

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def guarded() -> Any:
            try:
                return do()
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
                raise _Refused(exc) from exc

        try:
            return super().call_with_retry(guarded, fail, *args, **kwargs)
        except _Refused as refused:
            raise refused.args[0] from None


_clients: dict[tuple[int, str, float], redis.Redis] = {}
_clients_lock = threading.Lock()

#: Longest pause between two retries of a failing Redis, in seconds.
RETRY_BACKOFF_CAP = 1.0


def client_for(url: str, retry_for: float = DEFAULT_REDIS_RETRY_FOR) -> redis.Redis:
    """One shared client (and so one connection pool) per URL per process.

    Connection errors and timeouts are retried with exponential backoff (up
    to :data:`RETRY_BACKOFF_CAP` s between tries) for about ``retry_for``
    seconds before they are raised. Every script is atomic, so a retried call
    never half-applies; a retried claim returns the numbers of the first try.
    """
    key = (os.getpid(), url, retry_for)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                # Pauses double from 50 ms to the cap (about 1.5 s in all),
                # then stay at the cap: this many tries last about retry_for.
                retries = int(retry_for / RETRY_BACKOFF_CAP) + 4 if retry_for > 0 else 0
                client = redis.Redis.from_url(
                    url,
                    health_check_interval=30,
                    socket_connect_timeout=5,
                    retry=_Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), retries),
                    retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                )
                _clients[key] = client
    return client


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
