"""Prometheus metrics of celery-ordered streams (``pip install 'celery-ordered[metrics]'``).

:class:`OrderedStreamsCollector` is a ``prometheus_client`` collector: at each
scrape it reads, from Redis, the counters of every stream of a Redis (found as
``celery ordered ls`` finds them) or of the streams it is given by name, and
reports them with a ``stream`` label. :func:`start_metrics_server` serves it
over HTTP in one call, as a worker or a web process would::

    from celery_ordered.metrics import start_metrics_server

    server = start_metrics_server(9808, app=app)   # http://127.0.0.1:9808/metrics

Reading is all a scrape does: it never creates, extends or changes a stream.
A Redis that does not answer makes ``celery_ordered_up`` 0 for that scrape
(and logs a warning), never a failed scrape. This module is not imported by
``import celery_ordered``: it needs the optional ``prometheus_client``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is installed for the tests
    raise ImportError(
        "celery_ordered.metrics needs the prometheus_client library, which is not "
        "installed: pip install 'celery-ordered[metrics]'"
    ) from exc

import redis
from celery import Celery, current_app

from . import checks
from .config import default_window, resolve_redis
from .errors import ConfigurationError, OrderedStreamError
from .redis.clients import Client, client_for
from .redis.keys import KEY_PREFIX, name_from_key, validate_name
from .redis.protocol import Protocol
from .stream import StreamStats, stats_from_raw

__all__ = ["MetricsServer", "OrderedStreamsCollector", "start_metrics_server"]

logger = logging.getLogger(__name__)

#: The prefix of every metric name.
NAMESPACE = "celery_ordered"

#: Per-stream counters: the :class:`~celery_ordered.StreamStats` field, the
#: metric's name (``_total`` is added) and its help text.
_COUNTERS = (
    ("claimed", "stream_claimed", "Sequence numbers claimed: tasks and markers put."),
    ("delivered", "stream_delivered", "Outcomes the consumer has taken, in order."),
    ("redispatched", "stream_redispatched", "Overdue tasks dispatched again."),
    ("lost", "stream_lost", "Places filled with ResultLost after the last re-dispatch."),
    ("hedged", "stream_hedged", "Backup copies of straggling tasks sent (hedging)."),
)

#: Per-stream gauges: the field, the metric's name and its help text.
_GAUGES = (
    ("in_flight", "stream_in_flight", "Claimed numbers whose outcome has not arrived yet."),
    ("buffered", "stream_buffered", "Outcomes stored in Redis, waiting for the consumer."),
    (
        "out_of_order",
        "stream_out_of_order",
        "Stored outcomes that wait for an earlier, missing one.",
    ),
    ("window", "stream_window", "The window cap: how far claims may run ahead of deliveries."),
    ("closed", "stream_closed", "1 once the stream is closed to further puts, else 0."),
)

_BLOCKER_AGE = (
    "stream_blocker_age_seconds",
    "Seconds since the head-of-line blocker (the first missing outcome, which "
    "everything behind it waits for) was dispatched; 0 when nothing is missing.",
)


def _name(suffix: str) -> str:
    return f"{NAMESPACE}_{suffix}"


def _stream_names(client: Client) -> list[str]:
    """Every stream in ``client``'s Redis, as ``celery ordered ls`` lists them.

    A stream's ``window`` key exists as long as the stream does. A cluster
    client scans every primary.
    """
    found = {
        name_from_key(key)
        for key in client.scan_iter(match=f"{KEY_PREFIX}:{{*}}:window", count=1000)
    }
    return sorted(name for name in found if name)


def _read_stats(client: Client, name: str, default: int) -> StreamStats | None:
    """One stream's :class:`~celery_ordered.StreamStats`, or None if it does not exist.

    One read-only script call (the one behind ``OrderedResultStream.stats()``).
    No stream handle is opened: opening one writes, and would keep alive, at
    every scrape, a stream nobody uses any more.
    """
    raw = Protocol(client, name).stats()
    if raw.claimed == 0 and raw.window == 0:
        return None  # neither a claim nor a window: no such stream
    return stats_from_raw(raw, default)


def _check_names(names: Iterable[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise TypeError(
            f"names must be a list of stream names (or None for every stream), got the "
            f"single {type(names).__name__} {names!r}: pass names=[{names!r}]"
        )
    try:
        given = list(names)
    except TypeError:
        raise TypeError(
            f"names must be a list of stream names (or None for every stream), got "
            f"{type(names).__name__}"
        ) from None
    checked: dict[str, None] = {}
    for name in given:
        try:
            checked[validate_name(name)] = None
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"names: {exc}") from None
    return tuple(checked)


class OrderedStreamsCollector(Collector):
    """A Prometheus collector of the streams in one Redis, read at scrape time.

    Each scrape reports, per stream (label ``stream``):

    - ``celery_ordered_stream_claimed_total``, ``..._delivered_total``
      (counters): numbers claimed (tasks and markers put), outcomes consumed;
    - ``celery_ordered_stream_in_flight``, ``..._buffered``,
      ``..._out_of_order``, ``..._window``, ``..._closed`` (gauges), as in
      :class:`~celery_ordered.StreamStats`;
    - ``celery_ordered_stream_blocker_age_seconds``: how long the first
      missing outcome has been awaited (0 when nothing is missing);

    and for the scrape: ``celery_ordered_up`` (1 if Redis answered, else 0,
    and then no stream is reported), ``celery_ordered_streams`` (streams
    reported) and ``celery_ordered_scrape_duration_seconds``.

    Args:
        app: the Celery app whose settings name the streams' Redis
            (``ordered_redis_url``, else its Redis result backend or broker).
            Default: a private app when ``redis_url`` or ``client`` is given,
            else the current app.
        redis_url: the streams' Redis, instead of the app's.
        client: a ``redis.Redis`` (or ``RedisCluster``) to read with, instead of
            ``redis_url``; it keeps its own timeouts and retries.
        names: the streams to report; None (default) reports every stream of
            the Redis, found with ``SCAN`` at each scrape (on a cluster, on
            every primary). A named stream that does not exist is left out.
        registry: where to register the collector (default: prometheus_client's
            global ``REGISTRY``); None registers it nowhere.
        retry_for: seconds to retry a Redis that fails to answer during a
            scrape. Default 0: one try; a scrape that fails reports
            ``celery_ordered_up 0`` and the next scrape tries again.

    A scrape costs one ``SCAN`` pass (without ``names``) and one round trip
    per stream; it only reads, so it never keeps a stream alive.
    """

    def __init__(
        self,
        app: Celery | None = None,
        *,
        redis_url: str | None = None,
        client: Client | None = None,
        names: Iterable[str] | None = None,
        registry: CollectorRegistry | None = REGISTRY,
        retry_for: float = 0.0,
    ) -> None:
        if client is not None and redis_url is not None:
            raise ConfigurationError(
                "OrderedStreamsCollector got both redis_url= and client=, which is "
                "over-determined: pass one of them"
            )
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry must be a prometheus_client.CollectorRegistry or None, got "
                f"{type(registry).__name__}"
            )
        self.retry_for = checks.seconds("retry_for", retry_for, none=False)
        self.names = _check_names(names)
        if app is None:
            if redis_url is None and client is None:
                app = current_app._get_current_object()
            else:
                app = Celery("celery_ordered.metrics", set_as_current=False)
        self.app: Celery = app
        self._default_window = default_window(app)
        self._client = client
        self._url: str | None = None
        self._options: dict[str, Any] = {}
        if client is None:
            # Checked here, so a wrong URL or missing setting fails at the call.
            self._url, self._options = resolve_redis(app, redis_url)
        self._lock = threading.Lock()
        self._was_up = True
        if registry is not None:
            registry.register(self)

    def __repr__(self) -> str:
        which = "every stream" if self.names is None else f"{len(self.names)} stream(s)"
        return f"<OrderedStreamsCollector of {which}>"

    def _redis(self) -> Client:
        if self._client is not None:
            return self._client
        assert self._url is not None
        return client_for(self._url, self.retry_for, transport_options=self._options)

    def read(self) -> dict[str, StreamStats]:
        """The stats of the reported streams, by name, read from Redis now.

        Raises what the Redis client raises (a ``redis.RedisError``) when Redis
        does not answer; :meth:`collect` turns that into ``celery_ordered_up 0``.
        """
        client = self._redis()
        names = self.names if self.names is not None else _stream_names(client)
        found: dict[str, StreamStats] = {}
        for name in names:
            stats = _read_stats(client, name, self._default_window)
            if stats is not None:  # else never created, deleted or expired: not there
                found[name] = stats
        return found

    def describe(self) -> list[Metric]:
        """The metric families :meth:`collect` yields, without samples.

        Registering the collector calls this, so registering reads nothing from Redis.
        """
        return list(self._families({}, up=True, seconds=0.0, samples=False))

    def collect(self) -> Iterator[Metric]:
        """Read every reported stream from Redis and yield its metrics (one scrape)."""
        began = time.perf_counter()
        try:
            stats = self.read()
        except (OrderedStreamError, redis.RedisError, OSError) as exc:
            self._report(exc, unexpected=False)
            stats, up = {}, False
        except Exception as exc:  # a bug must not fail the whole registry's scrape
            self._report(exc, unexpected=True)
            stats, up = {}, False
        else:
            up = True
            with self._lock:
                if not self._was_up:
                    logger.info("celery-ordered metrics: the streams' Redis answers again")
                self._was_up = True
        yield from self._families(stats, up=up, seconds=time.perf_counter() - began)

    def _report(self, exc: BaseException, *, unexpected: bool) -> None:
        """Log a failed scrape: a warning when Redis stops answering, then quietly."""
        with self._lock:
            first, self._was_up = self._was_up, False
        message = "celery-ordered metrics: could not read the streams (celery_ordered_up 0): %s"
        if unexpected:
            logger.error(message, exc, exc_info=exc)
        elif first:
            logger.warning(message, exc)
        else:
            logger.debug(message, exc)

    def _families(
        self, stats: dict[str, StreamStats], *, up: bool, seconds: float, samples: bool = True
    ) -> Iterator[Metric]:
        up_family = GaugeMetricFamily(
            _name("up"), "1 if the streams' Redis answered this scrape, else 0."
        )
        count = GaugeMetricFamily(_name("streams"), "Streams reported by this scrape.")
        duration = GaugeMetricFamily(
            _name("scrape_duration_seconds"), "Seconds this scrape took to read the streams."
        )
        if samples:
            up_family.add_metric([], 1.0 if up else 0.0)
            count.add_metric([], float(len(stats)))
            duration.add_metric([], seconds)
        yield from (up_family, count, duration)
        labels = ["stream"]
        for field, suffix, text in _COUNTERS:
            counter = CounterMetricFamily(_name(suffix), text, labels=labels)
            for name, row in stats.items():
                counter.add_metric([name], float(getattr(row, field)))
            yield counter
        for field, suffix, text in _GAUGES:
            gauge = GaugeMetricFamily(_name(suffix), text, labels=labels)
            for name, row in stats.items():
                gauge.add_metric([name], float(getattr(row, field)))
            yield gauge
        age = GaugeMetricFamily(_name(_BLOCKER_AGE[0]), _BLOCKER_AGE[1], labels=labels)
        for name, row in stats.items():
            if row.blocker is None:
                age.add_metric([name], 0.0)
            elif row.blocker_waited is not None:
                age.add_metric([name], max(0.0, row.blocker_waited))
            # A blocker whose dispatch time is unknown gets no sample: not a false 0.
        yield age


class MetricsServer:
    """The HTTP server :func:`start_metrics_server` started; ``close()`` stops it."""

    def __init__(
        self,
        server: Any,
        thread: threading.Thread,
        collector: OrderedStreamsCollector,
        registry: CollectorRegistry,
    ) -> None:
        self._server = server
        self._thread = thread
        #: The collector the server reports.
        self.collector = collector
        #: The registry the server serves (the collector is registered in it).
        self.registry = registry
        #: The address the server listens on.
        self.addr: str = server.server_address[0]
        #: The port the server listens on (the free one picked for port 0).
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        """The metrics page, as a Prometheus scrape config would name it."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"

    def close(self) -> None:
        """Stop serving, free the port and unregister the collector. Idempotent."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        self._thread.join()
        self.registry.unregister(self.collector)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_metrics_server(
    port: int,
    addr: str = "127.0.0.1",
    *,
    app: Celery | None = None,
    redis_url: str | None = None,
    client: Client | None = None,
    names: Iterable[str] | None = None,
    registry: CollectorRegistry | None = None,
    retry_for: float = 0.0,
) -> MetricsServer:
    """Serve the streams' metrics at ``http://addr:port/metrics``, from a daemon thread.

    An :class:`OrderedStreamsCollector` (``app``, ``redis_url``, ``client``,
    ``names`` and ``retry_for`` as there) is registered in ``registry``
    (default: prometheus_client's global ``REGISTRY``, so the page also shows
    the process's own metrics and any the application registered), and the
    registry is served with ``prometheus_client.start_http_server``. ``port``
    0 picks a free port (:attr:`MetricsServer.port`). ``addr`` defaults to the
    loopback interface; pass ``"0.0.0.0"`` to be scraped from other machines.
    Returns the running :class:`MetricsServer`; its ``close()`` stops it.
    """
    port = checks.count("port", port, minimum=0)
    if port > 65535:
        raise ValueError(f"port must be an int from 0 to 65535 (0: a free one), got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise TypeError(
            f"addr must be an address to listen on, such as '127.0.0.1' or '0.0.0.0', got {addr!r}"
        )
    if registry is None:
        registry = REGISTRY
    collector = OrderedStreamsCollector(
        app, redis_url=redis_url, client=client, names=names, registry=None, retry_for=retry_for
    )
    try:
        registry.register(collector)
    except ValueError as exc:
        raise ValueError(
            f"{exc}: a celery-ordered collector is already registered in this registry; "
            "close() the first metrics server, or pass registry=CollectorRegistry()"
        ) from None
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        registry.unregister(collector)
        raise OSError(
            exc.errno,
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; choose another "
            "port or address (port=0 picks a free port)",
        ) from exc
    return MetricsServer(server, thread, collector, registry)
