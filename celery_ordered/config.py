"""Settings read from the Celery app, and the Redis clients they lead to.

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
``ordered_window``                   default window cap (else 10 x CPUs)
``ordered_serializer``               outcome serializer (else
                                     ``result_serializer``)
``ordered_function_modules``         modules whose plain functions workers
                                     may run
``ordered_stream_ttl``               seconds an unused stream's keys live
                                     (1 day)
``ordered_lost_after``               seconds before an outcome counts as
                                     overdue (1 h)
``ordered_max_redispatches``         re-dispatches of an overdue task (3)
``ordered_redis_retry_for``          seconds to retry a failing Redis (20)
``ordered_wait_replicas``            replicas each write waits for (0)
``ordered_wait_timeout``             seconds a write waits for them (20)
===================================  ======================================

The streams' Redis is one server, a Redis Cluster or a primary managed by
Sentinel, told apart by the URL (see :func:`parse_redis_url`).
"""

from __future__ import annotations

import copy
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import redis
from celery import Celery
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import (
    AuthorizationError,
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from . import checks
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

#: Seconds a write waits for ``ordered_wait_replicas`` replicas to acknowledge it.
DEFAULT_WAIT_TIMEOUT = 20.0

#: Port of a cluster node, or of a Sentinel, when the URL names none.
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

_SINGLE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_SENTINEL_SCHEME = "sentinel://"
_REDIS_SCHEMES = (*_SINGLE_SCHEMES, *_CLUSTER_SCHEMES, _SENTINEL_SCHEME)

_URL_FORMS = (
    "redis://host:6379/0 (rediss:// for TLS, unix:///path.sock for a socket), "
    "redis+cluster://host:7000,host:7001 (rediss+cluster:// for TLS) for a Redis "
    "Cluster, or sentinel://host:26379;sentinel://host2:26379/0 for Sentinel"
)

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
    """``url`` if it names a Redis celery-ordered can use, else None."""
    if isinstance(url, (list, tuple)):
        if url and all(isinstance(u, str) and u.startswith(_SENTINEL_SCHEME) for u in url):
            url = ";".join(url)  # kombu's list of Sentinels
        else:
            url = url[0] if url else None
    if not isinstance(url, str):
        return None
    text = url.strip()
    if not text.startswith(_SENTINEL_SCHEME):
        # "redis://a;redis://b" is a broker's failover list: the first one.
        text = text.split(";")[0].strip()
    if not text.startswith(_REDIS_SCHEMES):
        return None
    if text.startswith("redis+socket://"):
        return "unix://" + text[len("redis+socket://") :]
    return text


@dataclass(frozen=True, repr=False)
class RedisTarget:
    """A Redis URL taken apart: which topology it names, and where to connect.

    ``kind`` is ``"single"``, ``"cluster"`` or ``"sentinel"``. ``nodes`` are
    the cluster's startup nodes or the Sentinels; ``node_url`` is the URL
    redis-py connects to for a single server, or to the first cluster node
    (with the credentials, TLS and options of the whole URL); ``options``
    holds what a Sentinel URL says about the primary (credentials, database).
    """

    kind: str
    url: str
    node_url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    master_name: str | None = None

    @property
    def where(self) -> str:
        """The nodes or Sentinels as ``host:port,...``, without credentials."""
        return ",".join(f"{host}:{port}" for host, port in self.nodes)

    def __repr__(self) -> str:
        options = {
            key: "***" if key == "password" else value for key, value in self.options.items()
        }
        return (
            f"RedisTarget(kind={self.kind!r}, url={mask_url(self.url)!r}, "
            f"node_url={mask_url(self.node_url)!r}, nodes={self.nodes!r}, "
            f"options={options!r}, master_name={self.master_name!r})"
        )


_HOST_PORT = re.compile(r"(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:\[\]/?@,]+))(?::(?P<port>\d+))?")


#: Query arguments whose value is a secret (``?password=``, ``?sentinel_password=``...).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&;?#]*(?:pass|secret|token|auth|credential)[^=&;?#]*=)[^&;#]*",
    re.IGNORECASE,
)
#: Where a URL (one part of a Sentinel list) begins: ``scheme://``.
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def mask_url(url: object) -> str:
    """``url`` as text fit for a message, a log line or a repr: no password in it.

    The password of the user part is replaced by ``***`` even when it holds an
    unencoded ``@``, ``/`` or ``:``, in every part of a ``;``-separated list
    (Sentinel, failover); so is the value of every query argument naming a
    secret (``?password=``, ``?sentinel_password=``, tokens). The user name,
    hosts, ports and database stay, to say which Redis is meant.
    """
    text = _SECRET_QUERY.sub(r"\g<key>***", str(url))
    starts = [match.start() for match in _URL_START.finditer(text)]
    if not starts:
        return text
    pieces = [text[: starts[0]]]
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        pieces.append(_mask_userinfo(text[begin:end]))
    return "".join(pieces)


def _mask_userinfo(part: str) -> str:
    scheme_end = part.index("://") + 3
    rest = part[scheme_end:]
    # The host follows the last "@": a password may hold "@", "/" or ":" unencoded.
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return part
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return part  # a user name alone: nothing secret in it
    return f"{part[:scheme_end]}{user}:***@{host}"


def _without_password(url: str) -> str:
    return mask_url(url)


def _split(rest: str) -> tuple[str, str, str]:
    """``netloc``, ``path`` and ``query`` of what follows ``scheme://``."""
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return netloc, slash + path, query


def _host_ports(text: str, default_port: int, url: str) -> list[tuple[str, int]]:
    found = []
    for part in text.split(","):
        match = _HOST_PORT.fullmatch(part.strip())
        port = int(match["port"]) if match and match["port"] else default_port
        if match is None or not 0 < port < 65536:
            raise ConfigurationError(
                f"Redis URL {_without_password(url)!r}: {part.strip()!r} is not host:port"
            )
        found.append((match["ip6"] or match["host"], port))
    return found


def _node_url(scheme: str, userinfo: str, host: str, port: int, query: str) -> str:
    host = f"[{host}]" if ":" in host else host
    credentials = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{credentials}{host}:{port}/0" + (f"?{query}" if query else "")


def _parse_cluster(url: str) -> RedisTarget:
    scheme = "rediss" if url.startswith("rediss+") else "redis"
    netloc, path, query = _split(url.split("://", 1)[1])
    userinfo, _, hosts = netloc.rpartition("@")
    if not hosts:
        raise ConfigurationError(
            f"Redis Cluster URL {_without_password(url)!r} names no node: use "
            "redis+cluster://host:7000,host:7001 (any reachable nodes; the rest are found)"
        )
    nodes = _host_ports(hosts, DEFAULT_REDIS_PORT, url)
    if path.strip("/") not in ("", "0"):
        raise ConfigurationError(
            f"Redis Cluster URL {_without_password(url)!r} names database "
            f"{path.strip('/')!r}: a Redis Cluster has only database 0, so drop the /N"
        )
    node_url = _node_url(scheme, userinfo, *nodes[0], query)
    try:
        options = parse_url(node_url)
    except ValueError as exc:
        raise ConfigurationError(f"Redis Cluster URL {_without_password(url)!r}: {exc}") from exc
    if options.get("db", 0) != 0:
        raise ConfigurationError(
            f"Redis Cluster URL {_without_password(url)!r} asks for db={options['db']}: a "
            "Redis Cluster has only database 0"
        )
    return RedisTarget("cluster", url, node_url=node_url, nodes=tuple(nodes))


def _parse_sentinel(url: str) -> RedisTarget:
    nodes: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    names: set[str] = set()
    chunks = [part.strip() for part in url.split(";") if part.strip()]
    for index, chunk in enumerate(chunks):
        if not chunk.startswith(_SENTINEL_SCHEME):
            raise ConfigurationError(
                f"Sentinel URL {_without_password(url)!r}: {_without_password(chunk)!r} does "
                "not start with sentinel://; list the Sentinels as "
                "sentinel://host:26379;sentinel://host2:26379/0"
            )
        netloc, path, query = _split(chunk[len(_SENTINEL_SCHEME) :])
        userinfo, _, host = netloc.rpartition("@")
        if not host or "," in host:
            raise ConfigurationError(
                f"Sentinel URL {_without_password(url)!r}: give one Sentinel per sentinel:// "
                "part, separated by ';', as Celery does: sentinel://host:26379;sentinel://host2:26379"
            )
        nodes += _host_ports(host, DEFAULT_SENTINEL_PORT, url)
        for key, values in parse_qs(query, keep_blank_values=True).items():
            if key != "master_name" or not values[-1]:
                raise ConfigurationError(
                    f"Sentinel URL {_without_password(url)!r}: unknown or empty option {key!r}; "
                    "the URL takes only ?master_name=NAME (other Sentinel options go in "
                    "app.conf.ordered_redis_transport_options)"
                )
            names.add(values[-1])
        if index == 0:
            # As Celery: the first part's credentials are the primary's.
            username, _, password = userinfo.partition(":")
            if username:
                options["username"] = unquote(username)
            if password:
                options["password"] = unquote(password)
        db = path.strip("/")
        if db:
            if not db.isdigit():
                raise ConfigurationError(
                    f"Sentinel URL {_without_password(url)!r}: the database {db!r} is not "
                    "a number; end a part with /0, /1..."
                )
            if options.setdefault("db", int(db)) != int(db):
                raise ConfigurationError(
                    f"Sentinel URL {_without_password(url)!r} names two databases: "
                    f"{options['db']} and {db}"
                )
    if len(names) > 1:
        raise ConfigurationError(
            f"Sentinel URL {_without_password(url)!r} names two masters: {sorted(names)}"
        )
    if not nodes:
        raise ConfigurationError(f"Sentinel URL {_without_password(url)!r} names no Sentinel")
    return RedisTarget(
        "sentinel", url, nodes=tuple(nodes), options=options, master_name=next(iter(names), None)
    )


def parse_redis_url(url: str) -> RedisTarget:
    """Take a Redis URL apart, or raise :class:`~celery_ordered.ConfigurationError`.

    The forms, by topology:

    - one server: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
      for TLS, ``unix:///path/redis.sock?db=N`` (or Celery's ``redis+socket://``);
    - Redis Cluster: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``,
      ``rediss+cluster://`` for TLS: any reachable nodes (the others are
      discovered), database 0 only, redis-py's URL options after ``?``;
    - Sentinel: ``sentinel://[[user]:password@]host[:port][/db];sentinel://host[:port]...``
      as Celery and kombu spell it: one part per Sentinel, the first part's
      credentials and database are the primary's; the primary's name comes
      from ``?master_name=NAME`` or from the transport option ``master_name``.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis URL must be a str, got {type(url).__name__}")
    url = url.strip()
    if url.startswith(_CLUSTER_SCHEMES):
        return _parse_cluster(url)
    if url.startswith(_SENTINEL_SCHEME):
        return _parse_sentinel(url)
    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://") :]
    if url.startswith(_SINGLE_SCHEMES):
        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"Redis URL {_without_password(url)!r}: {exc}") from exc
        return RedisTarget("single", url, node_url=url)
    raise ConfigurationError(
        f"{_without_password(url)!r} is not a Redis URL celery-ordered knows: use {_URL_FORMS}"
    )


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
        found = _as_redis_url(redis_url)
        if found is None:
            raise ConfigurationError(
                f"redis_url {_without_password(str(redis_url))!r} is not a Redis URL: use "
                f"{_URL_FORMS}"
            )
        parse_redis_url(found)
        return found, _own_transport_options(app)
    for setting, options_setting in _OPTIONS_SETTING.items():
        found = _as_redis_url(app.conf.get(setting))
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


def resolve_redis_url(app: Celery, redis_url: str | None = None) -> str:
    """Where the streams live: the argument, else settings, else Celery's Redis."""
    return resolve_redis(app, redis_url)[0]


class _Refused(Exception):
    """Carries an error that retrying cannot mend through redis-py's Retry."""


class _Contact:
    """Whether a client's Redis has ever answered: shared by the client's connections."""

    def __init__(self) -> None:
        self.answered = False


class _Retry(Retry):
    """redis-py's Retry, but a wrong password or ACL fails at once.

    Authentication errors are connection errors to redis-py, so they would be
    retried for the whole ``retry_for`` although they stay wrong. With
    ``first_contact_for`` set, a Redis that has never answered this client
    (refused the connection, no such host or socket) is retried for only that
    long: retrying rides out a Redis that went away, not one that was never
    there. Once it has answered, failures are retried for ``retry_for``.
    """

    #: About how long the retries last, in seconds (see :func:`retry_policy`).
    retry_for: float | None = None
    #: Seconds to retry a Redis that never answered (None: as long as ``retry_for``).
    first_contact_for: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contact = _Contact()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Retry:
        # redis-py deep-copies the policy into each connection: the copies
        # share what they learn about the server (whether it ever answered).
        clone = copy.copy(self)
        clone._backoff = copy.deepcopy(self._backoff, memo)
        return clone

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``do`` with retries, as redis-py's Retry does (see the class)."""
        began = time.monotonic()
        failures = 0

        def guarded() -> Any:
            nonlocal failures
            try:
                result = do()
            except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
                raise _Refused(exc) from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                failures += 1
                budget = self.first_contact_for
                if budget is not None and not self.contact.answered:
                    # Give up rather than pause past the budget.
                    pause = self._backoff.compute(failures)
                    if time.monotonic() - began + pause > budget:
                        raise _Refused(exc) from exc
                raise
            self.contact.answered = True
            return result

        try:
            return super().call_with_retry(guarded, fail, *args, **kwargs)
        except _Refused as refused:
            raise refused.args[0] from None


#: A client of the streams' Redis: one server (also Sentinel's primary) or a cluster.
Client = redis.Redis | RedisCluster

_clients: dict[tuple[int, str, float, str, bool], Client] = {}
_clients_lock = threading.Lock()

#: Longest pause between two retries of a failing Redis, in seconds.
RETRY_BACKOFF_CAP = 1.0

#: Seconds to wait for a TCP connection (to a server, a cluster node or a Sentinel).
CONNECT_TIMEOUT = 5.0

#: Seconds a ``fail_fast`` client retries a Redis that never answered it.
FIRST_CONTACT_RETRY_FOR = 1.0


def retry_policy(retry_for: float, *, first_contact_for: float | None = None) -> Retry:
    """Exponential backoff that keeps trying for about ``retry_for`` seconds.

    Pauses double from 50 ms to :data:`RETRY_BACKOFF_CAP` (about 1.5 s in all),
    then stay at the cap; a wrong password or ACL is never retried. With
    ``first_contact_for``, a Redis that never answered is retried for only
    about that long.
    """
    retries = int(retry_for / RETRY_BACKOFF_CAP) + 4 if retry_for > 0 else 0
    policy = _Retry(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), retries)
    policy.retry_for = retry_for
    policy.first_contact_for = first_contact_for
    return policy


def client_for(
    url: str,
    retry_for: float = DEFAULT_REDIS_RETRY_FOR,
    *,
    transport_options: Mapping[str, Any] | None = None,
    fail_fast: bool = False,
) -> Client:
    """One shared client (and so one set of connections) per URL per process.

    ``url`` takes any form of :func:`parse_redis_url`: a ``redis.Redis`` for
    one server, a :class:`redis.cluster.RedisCluster` for a cluster, and for
    Sentinel a ``redis.Redis`` on the current primary, which asks the
    Sentinels again after a failover. ``transport_options`` are Celery's
    Sentinel options (``master_name``, ``sentinel_kwargs``,
    ``min_other_sentinels``).

    Connection errors and timeouts (a failover in progress, a cluster without
    a majority) are retried with exponential backoff for about ``retry_for``
    seconds before they are raised; a wrong password fails at once. Every
    script is atomic, so a retried call never half-applies; a retried claim
    returns the numbers of the first try.

    ``fail_fast=True`` (the CLI's choice) gives up after about
    :data:`FIRST_CONTACT_RETRY_FOR` seconds on a Redis that has never answered
    this client, such as one that refuses the connection; once it has
    answered, it is retried for ``retry_for`` like any other.
    """
    options = dict(transport_options or {})
    key = (os.getpid(), url, retry_for, repr(sorted(options.items())), fail_fast)
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                first = FIRST_CONTACT_RETRY_FOR if fail_fast else None
                client = _new_client(parse_redis_url(url), retry_for, options, first)
                _clients[key] = client
    return client


def redis_client(app: Celery, redis_url: str | None = None, *, fail_fast: bool = False) -> Client:
    """The shared client of the Redis holding ``app``'s streams (or ``redis_url``).

    ``fail_fast``: see :func:`client_for`.
    """
    url, options = resolve_redis(app, redis_url)
    return client_for(url, redis_retry_for(app), transport_options=options, fail_fast=fail_fast)


def _new_client(
    target: RedisTarget, retry_for: float, options: dict[str, Any], first_contact_for: float | None
) -> Client:
    retry = retry_policy(retry_for, first_contact_for=first_contact_for)
    if target.kind == "cluster":
        return _cluster_client(target, retry)
    if target.kind == "sentinel":
        return _sentinel_client(target, retry, options)
    return redis.Redis.from_url(
        target.node_url,
        health_check_interval=30,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _sentinel_client(target: RedisTarget, retry: Retry, options: dict[str, Any]) -> redis.Redis:
    master_name = options.get("master_name")
    if target.master_name and master_name and target.master_name != master_name:
        raise ConfigurationError(
            f"the Sentinel URL says ?master_name={target.master_name} but the transport "
            f"option master_name is {master_name!r}: keep one of them"
        )
    master_name = target.master_name or master_name
    if not master_name or not isinstance(master_name, str):
        raise ConfigurationError(
            f"Sentinel URL {_without_password(target.url)!r} needs the name of the primary "
            "the Sentinels watch: set app.conf.ordered_redis_transport_options = "
            "{'master_name': 'mymaster'} (Celery's broker_transport_options spelling), or "
            "end the URL with ?master_name=mymaster"
        )
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    min_other = options.get("min_other_sentinels", 0)
    if (
        not isinstance(sentinel_kwargs, Mapping)
        or isinstance(min_other, bool)
        or not (isinstance(min_other, int) and min_other >= 0)
    ):
        raise ConfigurationError(
            "Sentinel transport options: sentinel_kwargs must be a dict (such as "
            "{'password': ...} for the Sentinels themselves) and min_other_sentinels an "
            f"int >= 0; got {sentinel_kwargs!r} and {min_other!r}"
        )
    sentinel = Sentinel(
        list(target.nodes),
        min_other_sentinels=min_other,
        # Without timeouts a Sentinel host that vanished would hang discovery.
        sentinel_kwargs={
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": CONNECT_TIMEOUT,
            **sentinel_kwargs,
        },
        health_check_interval=30,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=retry,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **target.options,
    )
    client: redis.Redis = sentinel.master_for(master_name, connection_class=_SentinelConnection)
    return client


class _SentinelConnection(SentinelManagedConnection):
    """A connection to Sentinel's primary that asks where it is on every connect.

    redis-py's own asks when a connection is first made, but a command retried
    after the primary died dials the dead primary's address again
    (redis/redis-py#3874), so a failover would outlast the retries. A primary
    demoted to a replica (``READONLY``) is dropped, as redis-py does.
    """

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


class _ClusterUnavailable(redis.ConnectionError):
    """A Redis Cluster, or the part of it that holds a key, cannot serve it now."""


_T = TypeVar("_T")


def _cluster_errors(do: Callable[[], _T], where: str) -> _T:
    """Run ``do``; a cluster that is down or unreachable becomes a ConnectionError.

    Those are what a retry can mend (a failover, a node restarting); anything
    else about the cluster is raised as it is.
    """
    try:
        return do()
    except (ClusterDownError, SlotNotCoveredError, TryAgainError) as exc:
        raise _ClusterUnavailable(f"Redis Cluster at {where}: {exc}") from exc
    except RedisClusterException as exc:
        cause = exc.__cause__
        if isinstance(cause, (redis.AuthenticationError, AuthorizationError)):
            raise cause from exc
        if isinstance(cause, RedisClusterException) and "not enabled" in str(cause):
            raise ConfigurationError(
                f"{where} is not a Redis Cluster (cluster mode is off there): use "
                f"redis://{where.split(',')[0]}/0 for a single Redis"
            ) from exc
        text = str(exc)
        if isinstance(cause, (redis.ConnectionError, redis.TimeoutError)) or (
            "cannot be connected" in text or "not covered" in text
        ):
            raise _ClusterUnavailable(f"Redis Cluster at {where} cannot be reached: {exc}") from exc
        raise


class _Cluster(RedisCluster):
    """A RedisCluster whose commands ride out a failover like the single-server client.

    redis-py retries a failed cluster command at once, with a fresh view of
    the cluster; a failover takes seconds (the cluster's node timeout), so
    every command here is also retried with exponential backoff for about
    ``retry_for`` seconds. MOVED and ASK redirections are redis-py's.
    """

    def __init__(self, *, co_retry: Retry, co_where: str, **kwargs: Any) -> None:
        self.co_retry = co_retry
        self.co_where = co_where
        super().__init__(**kwargs)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command, retried with backoff while the cluster cannot serve it."""
        run = super().execute_command
        # redis-py pops options (target_nodes, keys) off kwargs: a copy per try.
        return self.co_retry.call_with_retry(
            lambda: _cluster_errors(lambda: run(*args, **dict(kwargs)), self.co_where),
            lambda _error: None,
        )


def _cluster_client(target: RedisTarget, retry: Retry) -> _Cluster:
    others = [ClusterNode(host, port) for host, port in target.nodes[1:]]

    def connect() -> _Cluster:
        return _cluster_errors(
            lambda: _Cluster(
                co_retry=retry,
                co_where=target.where,
                url=target.node_url,
                startup_nodes=list(others),
                # One immediate retry with a fresh view of the cluster; the
                # backoff is the retry around each command.
                retry=Retry(NoBackoff(), 1),
                socket_connect_timeout=CONNECT_TIMEOUT,
            ),
            target.where,
        )

    # Connecting reads the cluster's layout, so it rides out failures too.
    cluster: _Cluster = retry.call_with_retry(connect, lambda _error: None)
    return cluster


@dataclass(frozen=True)
class Durability:
    """How many replicas each write waits for (``WAIT``), and for how long."""

    #: Replicas that must acknowledge a write before it counts as done.
    replicas: int
    #: Seconds to wait for them before the write fails.
    timeout: float = DEFAULT_WAIT_TIMEOUT


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
