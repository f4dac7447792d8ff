"""redis-py clients for the streams' Redis: one per URL per process, with retries.

:func:`client_for` builds a ``redis.Redis`` for one server or a Sentinel-managed
primary, or a :class:`redis.cluster.RedisCluster`, whose commands are retried
with exponential backoff for about ``retry_for`` seconds (a wrong password
never), and patched where redis-py gives up too early.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AuthorizationError,
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from ..errors import ConfigurationError
from .urls import RedisTarget, mask_url, parse_redis_url

#: Seconds a failing Redis is retried before the error is raised.
DEFAULT_REDIS_RETRY_FOR = 20.0


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
            f"Sentinel URL {mask_url(target.url)!r} needs the name of the primary "
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


class ClusterUnavailable(redis.ConnectionError):
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
        raise ClusterUnavailable(f"Redis Cluster at {where}: {exc}") from exc
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
            raise ClusterUnavailable(f"Redis Cluster at {where} cannot be reached: {exc}") from exc
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
