"""Prometheus metrics (celery_ordered.metrics), scraped over real HTTP.

Every scrape here goes through a real ``prometheus_client`` HTTP server on
127.0.0.1, reading real streams in the tests' Redis that real worker
processes fill; the values are checked against ``stream.stats()``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from celery_ordered import ConfigurationError, ResultLost, StreamStats
from celery_ordered.embedded import RedisServer
from celery_ordered.metrics import OrderedStreamsCollector, start_metrics_server
from tests.apps.liveness_tasks import first_run_held, held_on
from tests.apps.tasks import echo, gate
from tests.support import ROOT
from tests.support.topologies import free_ports
from tests.support.waiting import wait_until
from tests.support.workers import example_worker as start_example_worker

#: Seconds any wait in these tests may take.
DEADLINE = 60.0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a metrics page over HTTP: ``{(sample name, labels): value}``."""
    with urllib.request.urlopen(url, timeout=DEADLINE) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def of_stream(
    page: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[str, float]:
    """The samples of one stream, by metric name without the ``celery_ordered_stream_`` prefix."""
    prefix = "celery_ordered_stream_"
    return {
        sample[len(prefix) :]: value
        for (sample, labels), value in page.items()
        if sample.startswith(prefix) and labels == (("stream", name),)
    }


def expected(stats: StreamStats) -> dict[str, float]:
    """What the metrics of a stream must say, from its ``stats()`` (but the blocker's age)."""
    return {
        "claimed_total": stats.claimed,
        "delivered_total": stats.delivered,
        "redispatched_total": stats.redispatched,
        "lost_total": stats.lost,
        "hedged_total": stats.hedged,
        "in_flight": stats.in_flight,
        "buffered": stats.buffered,
        "out_of_order": stats.out_of_order,
        "window": stats.window,
        "closed": float(stats.closed),
    }


@pytest.fixture
def serve(app: Any) -> Iterator[Callable[..., Any]]:
    """Start metrics servers on free ports of 127.0.0.1; closed after the test."""
    started: list[Any] = []

    def serve(**kwargs: Any) -> Any:
        kwargs.setdefault("app", app)
        kwargs.setdefault("registry", CollectorRegistry())
        server = start_metrics_server(0, **kwargs)
        started.append(server)
        return server

    yield serve
    for server in started:
        server.close()


@pytest.mark.usefixtures("worker")
def test_a_scrape_reports_what_stats_says_and_the_age_of_a_blocker(
    serve: Callable[..., Any], make_stream: Callable[..., Any], redis_url: str, gate_key: str
) -> None:
    # Given a stream whose number 1 is held by a gated task on a real worker,
    # while the tasks and the marker after it are done
    stream = make_stream(window=8)
    stream.put(echo, "zero")
    stream.put(gate, redis_url, gate_key, "one")
    stream.put(echo, "two")
    stream.put(echo, "three")
    stream.put("a marker")
    assert stream.get(timeout=DEADLINE) == "zero"
    wait_until(lambda: stream.stats().buffered == 3, "the outcomes behind the gate", DEADLINE)
    server = serve()  # every stream of the Redis, as `ordered ls` lists them

    # When Prometheus scrapes it over HTTP
    before = stream.stats()
    page = scrape(server.url)
    after = stream.stats()

    # Then each metric is what stats() says, and the blocker has waited
    assert page[("celery_ordered_up", ())] == 1
    assert before.blocker == 1
    assert dataclasses.replace(before, blocker_waited=None) == dataclasses.replace(
        after, blocker_waited=None
    )
    metrics = of_stream(page, stream.name)
    age = metrics.pop("blocker_age_seconds")
    assert metrics == expected(before)
    assert metrics["in_flight"] == 1  # number 1
    assert metrics["buffered"] == 3  # held back by number 1
    assert before.blocker_waited is not None
    assert after.blocker_waited is not None
    assert 0 < before.blocker_waited <= age <= after.blocker_waited
    assert page[("celery_ordered_streams", ())] >= 1

    # When the gate opens, the stream is drained and closed
    redis.Redis.from_url(redis_url).rpush(gate_key, 1)
    assert [stream.get(timeout=DEADLINE) for _ in range(4)] == [
        "one", "two", "three", "a marker",
    ]  # fmt: skip
    stream.close()
    stats = stream.stats()
    page = scrape(server.url)

    # Then the next scrape says so: nothing is missing, so nothing blocks
    metrics = of_stream(page, stream.name)
    assert metrics.pop("blocker_age_seconds") == 0
    assert metrics == expected(stats)
    assert metrics["closed"] == 1
    assert metrics["delivered_total"] == 5


def test_named_streams_only_and_a_scrape_only_reads(
    serve: Callable[..., Any], make_stream: Callable[..., Any], redis_client: redis.Redis
) -> None:
    # Given two streams, and a collector told about one of them and a missing one
    shown = make_stream(window=3)
    hidden = make_stream(window=3)
    shown.put("marker")
    hidden.put("marker")
    missing = f"test-missing-{uuid.uuid4().hex}"
    server = serve(names=[shown.name, missing])
    window_key = f"co:{{{shown.name}}}:window"
    redis_client.pexpire(window_key, 60_000)

    # When it is scraped
    page = scrape(server.url)

    # Then only the named stream that exists is reported
    assert of_stream(page, shown.name) == {**expected(shown.stats()), "blocker_age_seconds": 0}
    assert of_stream(page, hidden.name) == {}
    assert of_stream(page, missing) == {}
    assert page[("celery_ordered_streams", ())] == 1
    # And the scrape wrote nothing: no key made for the missing stream, and
    # the expiry of the stream's keys not renewed (a scraped stream that
    # nobody uses still expires)
    assert not list(redis_client.scan_iter(f"co:{{{missing}}}:*"))
    assert 0 < redis_client.pttl(window_key) <= 60_000


def test_a_redis_that_is_down_at_scrape_time_reports_up_0_and_logs(
    serve: Callable[..., Any], app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a collector of a real Redis (with a password), serving one stream
    from celery_ordered import OrderedResultStream

    (port,) = free_ports(1)
    server_of_redis = RedisServer(port=port, args=("--requirepass", "s3cret-pw"))
    server_of_redis.start()
    url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
    try:
        stream = OrderedResultStream(app, "metrics-down", redis_url=url, window=4)
        stream.put("marker")
        metrics = serve(redis_url=url)
        page = scrape(metrics.url)
        assert page[("celery_ordered_up", ())] == 1
        assert of_stream(page, "metrics-down")["claimed_total"] == 1
    finally:
        # When that Redis goes down
        server_of_redis.stop()

    # Then a scrape still answers: up is 0, no stream is reported, and the
    # failure is logged once, without the password
    with caplog.at_level(logging.DEBUG, logger="celery_ordered.metrics"):
        first = scrape(metrics.url)
        second = scrape(metrics.url)
    for page in (first, second):
        assert page[("celery_ordered_up", ())] == 0
        assert page[("celery_ordered_streams", ())] == 0
        assert of_stream(page, "metrics-down") == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "could not read the streams" in warnings[0].getMessage()
    assert "s3cret-pw" not in caplog.text
    assert "s3cret-pw" not in repr(metrics) + repr(metrics.collector)


def test_bad_arguments_are_refused_at_the_call(app: Any, redis_url: str) -> None:
    registry = CollectorRegistry()
    with pytest.raises(TypeError, match=r"names must be a list .* names=\['jobs-1'\]"):
        OrderedStreamsCollector(app, names="jobs-1", registry=registry)
    with pytest.raises(ValueError, match=r"names: stream name 'a b' contains ' '"):
        OrderedStreamsCollector(app, names=["ok", "a b"], registry=registry)
    with pytest.raises(ValueError, match=r"retry_for must be a finite number of seconds >= 0"):
        OrderedStreamsCollector(app, retry_for=-1, registry=registry)
    with pytest.raises(ConfigurationError, match=r"redis_url 'http://x' is not a Redis URL"):
        OrderedStreamsCollector(redis_url="http://x", registry=registry)
    with pytest.raises(ConfigurationError, match=r"both redis_url= and client="):
        OrderedStreamsCollector(
            redis_url=redis_url, client=redis.Redis.from_url(redis_url), registry=registry
        )
    with pytest.raises(TypeError, match=r"registry must be a prometheus_client.CollectorRegistry"):
        OrderedStreamsCollector(app, registry="default")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"port must be an int from 0 to 65535"):
        start_metrics_server(70000, app=app, registry=registry)
    with pytest.raises(ValueError, match=r"port must be an int >= 0"):
        start_metrics_server("9808", app=app, registry=registry)  # type: ignore[arg-type]
    # Nothing refused was registered: the registry still takes a collector
    assert list(registry.collect()) == []


def test_a_busy_port_or_a_second_server_on_one_registry_names_the_fix(
    serve: Callable[..., Any], app: Any
) -> None:
    registry = CollectorRegistry()
    first = serve(registry=registry)
    with pytest.raises(ValueError, match=r"already registered .* registry=CollectorRegistry\(\)"):
        start_metrics_server(0, app=app, registry=registry)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot serve metrics on 127.0.0.1:{port}: .*port=0"):
            start_metrics_server(port, app=app, registry=CollectorRegistry())
    # Closing the first frees its registry for another server, and its port
    first.close()
    first.close()  # idempotent
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(first.url, timeout=DEADLINE)
    second = serve(registry=registry)
    assert scrape(second.url)[("celery_ordered_up", ())] == 1


def test_without_prometheus_client_the_import_error_names_the_extra() -> None:
    # prometheus_client made unimportable, in a fresh interpreter
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import celery_ordered\n"
        "try:\n"
        "    import celery_ordered.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'celery-ordered[metrics]'" in done.stdout
    # And the package itself does not import it: it is optional
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys, celery_ordered; print('prometheus_client' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.usefixtures("worker")
def test_redispatches_and_lost_outcomes_are_counted(
    serve: Callable[..., Any], make_stream: Callable[..., Any]
) -> None:
    # Given a task sent where no worker listens, overdue at once, re-dispatched once
    stream = make_stream(lost_after=0.2, max_redispatches=1)
    stream.put(echo.s("lost").set(queue=f"nobody-{uuid.uuid4().hex[:8]}"))
    # When the consumer waits for it until it is given up
    with pytest.raises(ResultLost):
        stream.get(timeout=DEADLINE)
    # Then the scrape counts one re-dispatch and one lost outcome
    metrics = of_stream(scrape(serve(names=[stream.name]).url), stream.name)
    assert metrics["redispatched_total"] == 1
    assert metrics["lost_total"] == 1
    assert (stream.stats().redispatched, stream.stats().lost) == (1, 1)


@pytest.mark.usefixtures("worker")
def test_backup_copies_of_stragglers_are_counted(
    serve: Callable[..., Any],
    make_stream: Callable[..., Any],
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    # Given a hedging stream of quick tasks and a straggler whose first run hangs
    notes = f"co-metrics-{uuid.uuid4().hex}"
    stream = make_stream(hedge=True, window=40)
    try:
        for i in range(16):
            stream.put(held_on, "nobody-", redis_url, notes, i)
        stream.put(first_run_held, redis_url, notes, "straggler")
        # When the consumer reads them all: a backup copy of the straggler came
        assert [stream.get(timeout=DEADLINE)[0] for _ in range(17)] == [*range(16), "straggler"]
        # Then the scrape counts the one backup copy sent
        metrics = of_stream(scrape(serve(names=[stream.name]).url), stream.name)
        assert metrics["hedged_total"] == 1 == stream.stats().hedged
    finally:
        redis_client.rpush(f"{notes}:gate", "go")  # the first run ends
        redis_client.expire(f"{notes}:gate", 30)
        wait_until(
            lambda: len(redis_client.lrange(f"{notes}:events", 0, -1)) == 2 * 18,
            "the straggler's first run ending",
            DEADLINE,
        )
        redis_client.delete(f"{notes}:runs", f"{notes}:events")


@pytest.fixture
def metrics_example(redis_url: str) -> Iterator[Any]:
    """examples/metrics_worker.py, its app pointed at the tests' Redis and a queue of its own."""
    from celery import current_app

    previous_app = current_app._get_current_object()
    from examples import metrics_worker as example

    conf = example.app.conf
    saved = {key: conf.get(key) for key in ("broker_url", "ordered_redis_url")}
    saved["task_default_queue"] = conf.task_default_queue
    conf.update(
        broker_url=os.environ["CO_TEST_BROKER_URL"],
        ordered_redis_url=redis_url,
        task_default_queue=f"metrics-example-{uuid.uuid4().hex[:8]}",
    )
    yield example
    conf.update(saved)
    previous_app.set_current()


def test_the_example_worker_serves_the_metrics_of_its_streams(
    metrics_example: Any, make_stream: Callable[..., Any], redis_url: str
) -> None:
    # Given the example's worker, started as its docstring says, with a metrics port
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "BROKER_URL": os.environ["CO_TEST_BROKER_URL"],
        "CO_METRICS_PORT": str(port),
    }
    with start_example_worker(
        "examples.metrics_worker", metrics_example.app, metrics_example.process, env=env
    ):
        # When a stream of the example's tasks runs on it, and is scraped
        stream = make_stream(app=metrics_example.app, window=4)
        outcomes = list(stream.map(metrics_example.process, range(6)))
        assert [outcome["item"] for outcome in outcomes] == list(range(6))
        stats = stream.stats()  # acknowledges what the consumer took, as a consumer does
        url = f"http://127.0.0.1:{port}/metrics"
        page = wait_until(lambda: scrape(url), "the worker's metrics server", DEADLINE)
        # and terminal 2's job, the module run as its docstring says, runs on it too
        job = subprocess.run(
            [sys.executable, "-m", "examples.metrics_worker", "20"],
            cwd=ROOT, env={**env, "QUEUE": metrics_example.app.conf.task_default_queue},
            capture_output=True, text=True, timeout=DEADLINE,
        )  # fmt: skip
        assert job.returncode == 0, job.stderr
        assert job.stdout.startswith("20 items done, the last by process"), job.stdout

    # Then the worker's page reports that stream as its stats() does, beside
    # the process's own metrics (prometheus_client's default registry)
    assert page[("celery_ordered_up", ())] == 1
    assert of_stream(page, stream.name) == {**expected(stats), "blocker_age_seconds": 0}
    assert stats.delivered == 6
    assert any(name.startswith("process_") for name, _ in page)


def test_every_public_name_of_the_module_has_a_docstring() -> None:
    import inspect

    from celery_ordered import metrics

    undocumented = []
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        if not (obj.__doc__ or "").strip():
            undocumented.append(name)
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                    continue
                if not (value.__doc__ or "").strip():
                    undocumented.append(f"{name}.{attr}")
    assert undocumented == []
