"""Settings read from the Celery app, and the Redis clients they lead to.

Settings live in the Celery app's configuration under an ``ordered_`` prefix,
the way Celery's own Redis backend reads ``redis_socket_timeout``:

=============================  ============================================
``ordered_redis_url``          Redis holding the streams (else the result
                               backend or broker URL, when it is Redis)
``ordered_window``             default window cap (else 10 x CPU count)
``ordered_serializer``         outcome serializer (else ``result_serializer``)
``ordered_function_modules``   modules whose plain functions workers may run
=============================  ============================================
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import redis
from celery import Celery

from .errors import ConfigurationError

#: Default window cap per CPU, as the original parallel_queue sized its buffer.
DEFAULT_WINDOW_PER_CPU = 10

#: Largest window accepted: beyond it "bounded memory" means nothing.
MAX_WINDOW = 1_000_000

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


_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def client_for(url: str) -> redis.Redis:
    """One shared client (and so one connection pool) per URL per process."""
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = redis.Redis.from_url(url, health_check_interval=30)
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
