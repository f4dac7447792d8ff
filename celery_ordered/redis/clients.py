"""redis-py clients for the streams' Redis: one per URL per process, with retries.

:func:`client_for` builds a ``redis.Redis`` for one server or a Sentinel-managed
primary, or a :class:`redis.cluster.RedisCluster`, whose commands are retried
with exponential backoff for about ``retry_for`` seconds (a wrong password
never), and patched where redis-py gives up too early.
:func:`async_client_for` builds their ``redis.asyncio`` twins, from the same
URLs with the same retry policy, one per URL and settings per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
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


#: How many retried calls the current thread (or asyncio task) is inside: redis-py
#: retries a command, and inside it the connect, and inside that the health
#: check, each with the client's policy. Only the outermost call retries.
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("celery_ordered_retries", default=0)


class _Tries:
    """The tries of one call: when it began and how many failed."""

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.failures = 0


@contextlib.contextmanager
def _unrefused() -> Iterator[None]:
    """Raise the error a :class:`_Refused` carries, as it was."""
    try:
        yield
    except _Refused as refused:
        raise refused.args[0] from None


class _Policy:
    """redis-py's Retry, but a wrong password or ACL fails at once.

    Authentication errors are connection errors to redis-py, so they would be
    retried for the whole ``retry_for`` although they stay wrong. With
    ``first_contact_for`` set, a Redis that has never answered this client
    (refused the connection, no such host or socket) is retried for only that
    long: retrying rides out a Redis that went away, not one that was never
    there. Once it has answered, failures are retried for ``retry_for``.

    A mixin of redis-py's blocking Retry (:class:`_Retry`) and its asyncio
    one (:class:`_AsyncRetry`): it judges each try, they wait between them.
    """

    #: About how long the retries last, in seconds (see :func:`retry_policy`).
    retry_for: float | None = None
    #: Seconds to retry a Redis that never answered (None: as long as ``retry_for``).
    first_contact_for: float | None = None
    _backoff: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.contact = _Contact()

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # redis-py deep-copies the policy into each connection: the copies
        # share what they learn about the server (whether it ever answered).
        clone = copy.copy(self)
        clone._backoff = copy.deepcopy(self._backoff, memo)
        return clone

    @staticmethod
    def _failed_once(exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether redis-py's Retry would call its failure handler for ``exc``."""
        is_retryable = kwargs.get("is_retryable", args[0] if args else None)
        return not (is_retryable and not is_retryable(exc))

    @staticmethod
    def _fail_args(
        exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...]:
        """The failure handler's arguments for a first failure, as redis-py's Retry gives them."""
        counted = kwargs.get("with_failure_count", args[1] if len(args) > 1 else False)
        return (exc, 1) if counted else (exc,)

    @contextlib.contextmanager
    def _judged(self, tries: _Tries) -> Iterator[None]:
        """Around one try: what retrying cannot mend becomes a :class:`_Refused`.

        The server counts as having answered once a whole outermost call
        succeeded: a connect or a write inside it may succeed against a port
        that is not a Redis (a broker's, say), which then hangs up.
        """
        token = _depth.set(_depth.get() + 1)
        try:
            yield
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise _Refused(exc) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            tries.failures += 1
            budget = self.first_contact_for
            if budget is not None and not self.contact.answered:
                # Give up rather than pause past the budget.
                pause = self._backoff.compute(tries.failures)
                if time.monotonic() - tries.began + pause > budget:
                    raise _Refused(exc) from exc
            raise
        finally:
            _depth.reset(token)
        if _depth.get() == 0:
            self.contact.answered = True


class _Retry(_Policy, Retry):
    """The retry policy of a blocking client (see :class:`_Policy`)."""

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``do`` with retries, as redis-py's Retry does (see :class:`_Policy`).

        Inside another retried call (a connect inside a command) it tries once:
        the outer call retries the whole, so the retries do not multiply.
        """
        if _depth.get():
            try:
                return do()
            except self._supported_errors as exc:
                if self._failed_once(exc, args, kwargs):
                    fail(*self._fail_args(exc, args, kwargs))
                raise
        tries = _Tries()

        def guarded() -> Any:
            with self._judged(tries):
                return do()

        with _unrefused():
            return super().call_with_retry(guarded, fail, *args, **kwargs)


def _writer_closed_under_it(exc: BaseException) -> bool:
    """Whether ``exc`` is redis.asyncio's write on a connection closed under it.

    A connection that another task disconnects while a command is on its way
    through it (redis-py's asyncio cluster client disconnects a node's free
    connections after a connection error, and another task may just have
    taken one of them) has no writer left: the write fails with an
    ``AttributeError`` or ``TypeError`` about ``None`` instead of a
    ``ConnectionError`` (redis/redis-py#3546 and #4287), which no retry
    policy knows. The frames tell it apart from any other such error.
    """
    if not isinstance(exc, (AttributeError, TypeError)) or "NoneType" not in str(exc):
        return False
    frame = exc.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        if code.co_name in ("send_packed_command", "_send_packed_command") and (
            frame.tb_frame.f_globals.get("__name__") == "redis.asyncio.connection"
        ):
            return True
        frame = frame.tb_next
    return False


async def _as_connection_error(do: Any) -> Any:
    """Await ``do``; a write on a connection closed under it becomes a ConnectionError."""
    try:
        return await do()
    except (AttributeError, TypeError) as exc:
        if _writer_closed_under_it(exc):
            raise redis.ConnectionError(f"the connection was closed under a write: {exc}") from exc
        raise


class _AsyncRetry(_Policy, redis.asyncio.retry.Retry):
    """The retry policy of an asyncio client (see :class:`_Policy`).

    A write on a connection another task closed under it is retried as the
    connection error it is (see :func:`_writer_closed_under_it`).
    """

    async def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        """Await ``do`` with retries, as redis-py's Retry does (see :class:`_Policy`).

        Inside another retried call it tries once, as the blocking one does.
        """
        if _depth.get():
            try:
                return await _as_connection_error(do)
            except self._supported_errors as exc:
                if self._failed_once(exc, args, kwargs):
                    await fail(*self._fail_args(exc, args, kwargs))
                raise
        tries = _Tries()

        async def guarded() -> Any:
            with self._judged(tries):
                return await _as_connection_error(do)

        with _unrefused():
            return await super().call_with_retry(guarded, fail, *args, **kwargs)


#: A client of the streams' Redis: one server (also Sentinel's primary) or a cluster.
Client = redis.Redis | RedisCluster

_clients: dict[tuple[int, str, float, str, bool], Client] = {}
_clients_lock = threading.Lock()

#: Longest pause between two retries of a failing Redis, in seconds.
RETRY_BACKOFF_CAP = 1.0

#: Seconds to wait for a TCP connection (to a server, a cluster node or a Sentinel).
CONNECT_TIMEOUT = 5.0

#: Connections a client may open (per node of a cluster). Every blocked waiter
#: (a consumer's ``BLPOP`` on ``ready``, a producer's on ``space``, a joiner's
#: on ``done``) holds one while it waits, so the cap is far above redis-py's
#: default of 100 (since redis-py 6): one process, or one event loop, may
#: follow hundreds of streams. It is Redis's own default ``maxclients``.
MAX_CONNECTIONS = 10_000

#: Seconds a ``fail_fast`` client retries a Redis that never answered it.
FIRST_CONTACT_RETRY_FOR = 1.0


def retry_policy(retry_for: float, *, first_contact_for: float | None = None) -> Retry:
    """Exponential backoff that keeps trying for about ``retry_for`` seconds.

    Pauses double from 50 ms to :data:`RETRY_BACKOFF_CAP` (about 1.5 s in all),
    then stay at the cap; a wrong password or ACL is never retried. With
    ``first_contact_for``, a Redis that never answered is retried for only
    about that long.
    """
    return _policy(_Retry, retry_for, first_contact_for)


def async_retry_policy(
    retry_for: float, *, first_contact_for: float | None = None
) -> redis.asyncio.retry.Retry:
    """:func:`retry_policy` for a ``redis.asyncio`` client: it waits without blocking."""
    return _policy(_AsyncRetry, retry_for, first_contact_for)


_P = TypeVar("_P", _Retry, _AsyncRetry)


def _policy(kind: type[_P], retry_for: float, first_contact_for: float | None) -> _P:
    retries = int(retry_for / RETRY_BACKOFF_CAP) + 4 if retry_for > 0 else 0
    policy = kind(ExponentialBackoff(cap=RETRY_BACKOFF_CAP, base=0.05), retries)
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
    return redis.Redis.from_url(target.node_url, **_server_settings(retry))


def _server_settings(retry: Any) -> dict[str, Any]:
    """The settings of a client of one server (or of Sentinel's primary), blocking or asyncio."""
    return {
        "health_check_interval": 30,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": retry,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "max_connections": MAX_CONNECTIONS,
    }


def _sentinel_client(target: RedisTarget, retry: Retry, options: dict[str, Any]) -> redis.Redis:
    master_name, settings = _sentinel_settings(target, retry, options)
    sentinel = Sentinel(list(target.nodes), **settings)
    client: redis.Redis = sentinel.master_for(master_name, connection_class=_SentinelConnection)
    return client


def _sentinel_settings(
    target: RedisTarget, retry: Any, options: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The primary's name and the Sentinel settings of ``target``, checked."""
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
        # Their values are not quoted: sentinel_kwargs may hold a password.
        raise ConfigurationError(
            "Sentinel transport options: sentinel_kwargs must be a dict (such as "
            "{'password': ...} for the Sentinels themselves) and min_other_sentinels an "
            f"int >= 0; got a {type(sentinel_kwargs).__name__} and a "
            f"{type(min_other).__name__}"
            + (f" ({min_other})" if isinstance(min_other, int) else "")
        )
    return master_name, {
        "min_other_sentinels": min_other,
        # Without timeouts a Sentinel host that vanished would hang discovery.
        "sentinel_kwargs": {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": CONNECT_TIMEOUT,
            **sentinel_kwargs,
        },
        **_server_settings(retry),
        **target.options,
    }


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


@contextlib.contextmanager
def _cluster_errors(where: str) -> Iterator[None]:
    """Around a cluster command: a cluster down or unreachable becomes a ConnectionError.

    Those are what a retry can mend (a failover, a node restarting); anything
    else about the cluster is raised as it is.
    """
    try:
        yield
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

        def once() -> Any:
            with _cluster_errors(self.co_where):
                # redis-py pops options (target_nodes, keys) off kwargs: a copy per try.
                return run(*args, **dict(kwargs))

        return self.co_retry.call_with_retry(once, lambda _error: None)


def _cluster_client(target: RedisTarget, retry: Retry) -> _Cluster:
    others = [ClusterNode(host, port) for host, port in target.nodes[1:]]

    def connect() -> _Cluster:
        with _cluster_errors(target.where):
            return _Cluster(
                co_retry=retry,
                co_where=target.where,
                url=target.node_url,
                startup_nodes=list(others),
                # One immediate retry with a fresh view of the cluster; the
                # backoff is the retry around each command.
                retry=Retry(NoBackoff(), 1),
                socket_connect_timeout=CONNECT_TIMEOUT,
                max_connections=MAX_CONNECTIONS,
            )

    # Connecting reads the cluster's layout, so it rides out failures too.
    cluster: _Cluster = retry.call_with_retry(connect, lambda _error: None)
    return cluster


# -- asyncio ---------------------------------------------------------------------

#: A ``redis.asyncio`` client of the streams' Redis: one server (also
#: Sentinel's primary) or a cluster.
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

# Per event loop: its clients by URL and settings. A loop's entry goes when
# the loop shuts down (see _close_at_shutdown), or is found closed.
_async_clients: dict[asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncClient]] = {}
_async_keepers: dict[asyncio.AbstractEventLoop, AsyncGenerator[None, None]] = {}


def async_client_for(
    url: str,
    retry_for: float = DEFAULT_REDIS_RETRY_FOR,
    *,
    transport_options: Mapping[str, Any] | None = None,
    fail_fast: bool = False,
) -> AsyncClient:
    """One shared ``redis.asyncio`` client per URL and settings per event loop.

    :func:`client_for`'s twin for asyncio: the same URL forms, transport
    options and retry policy, giving a ``redis.asyncio.Redis`` (one server, or
    Sentinel's primary through ``redis.asyncio.sentinel``) or a
    ``redis.asyncio.cluster.RedisCluster``. Call it in a coroutine: the client
    belongs to the running loop (its connections cannot serve another one),
    and is closed when that loop shuts down (``asyncio.run`` ending, or
    ``loop.shutdown_asyncgens()``).
    """
    loop = asyncio.get_running_loop()
    options = dict(transport_options or {})
    key = (os.getpid(), url, retry_for, repr(sorted(options.items())), fail_fast)
    clients = _clients_of(loop)
    client = clients.get(key)
    if client is None:
        first = FIRST_CONTACT_RETRY_FOR if fail_fast else None
        retry = async_retry_policy(retry_for, first_contact_for=first)
        client = clients[key] = _new_async_client(parse_redis_url(url), retry, options)
    return client


def _clients_of(loop: asyncio.AbstractEventLoop) -> dict[tuple[Any, ...], AsyncClient]:
    for closed in [other for other in _async_clients if other.is_closed()]:
        # Shut down without shutdown_asyncgens(): its clients can never run again.
        del _async_clients[closed]
        _async_keepers.pop(closed, None)
    clients = _async_clients.get(loop)
    if clients is None:
        clients = _async_clients[loop] = {}
        keeper = _close_at_shutdown(loop, clients)
        # Its first step makes the loop track it (as every async generator it
        # iterates), so that the loop's shutdown_asyncgens() closes it.
        with contextlib.suppress(StopIteration):
            keeper.asend(None).send(None)
        _async_keepers[loop] = keeper
    return clients


async def _close_at_shutdown(
    loop: asyncio.AbstractEventLoop, clients: dict[tuple[Any, ...], AsyncClient]
) -> AsyncGenerator[None, None]:
    """Wait, as an open async generator, for the loop to shut down; then close its clients."""
    try:
        yield
    finally:
        _async_clients.pop(loop, None)
        _async_keepers.pop(loop, None)
        for client in list(clients.values()):
            with contextlib.suppress(Exception):
                await client.aclose()


def _new_async_client(target: RedisTarget, retry: Any, options: dict[str, Any]) -> AsyncClient:
    if target.kind == "cluster":
        return _AsyncCluster.from_url(
            target.node_url,
            co_retry=retry,
            co_where=target.where,
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.nodes[1:]
            ],
            # One immediate retry with a fresh view of the cluster; the
            # backoff is the retry around each command.
            retry=redis.asyncio.retry.Retry(NoBackoff(), 1),
            socket_connect_timeout=CONNECT_TIMEOUT,
            max_connections=MAX_CONNECTIONS,
        )
    if target.kind == "sentinel":
        master_name, settings = _sentinel_settings(target, retry, options)
        sentinel = redis.asyncio.sentinel.Sentinel(list(target.nodes), **settings)
        primary: redis.asyncio.Redis = sentinel.master_for(
            master_name, connection_class=_AsyncSentinelConnection
        )
        return primary
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
        target.node_url, **_server_settings(retry)
    )
    return client


class _AsyncSentinelConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """:class:`_SentinelConnection` for asyncio: asks where the primary is on every connect.

    redis.asyncio's own asks in ``connect()`` (a connection taken from the
    pool), but a command retried after a connection error reconnects in
    ``send_packed_command`` (``connect_check_health``, then ``_connect``),
    which dials the dead primary's address again: a command in flight when
    the primary died (a consumer's ``BLPOP``) would outlast the failover
    and fail after ``retry_for``. Same cause as redis/redis-py#3874.
    """

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """:class:`_Cluster` for asyncio: commands ride out a failover with backoff."""

    def __init__(self, *, co_retry: Any, co_where: str, **kwargs: Any) -> None:
        self.co_retry = co_retry
        self.co_where = co_where
        super().__init__(**kwargs)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command, retried with backoff while the cluster cannot serve it."""
        run = super().execute_command

        async def once() -> Any:
            with _cluster_errors(self.co_where):
                # redis-py pops options (target_nodes, keys) off kwargs: a copy per try.
                return await run(*args, **dict(kwargs))

        return await self.co_retry.call_with_retry(once, _no_cleanup)


async def _no_cleanup(error: Exception) -> None:
    """What an asyncio cluster command does between two tries: nothing (redis-py has)."""
