"""Fixtures and hooks only: the helpers are in tests/support/, the apps in tests/apps/.

Real parts for the tests: a Redis server and Celery worker processes.

Redis: ``CO_TEST_REDIS_URL`` if set; else the machine's Redis on
127.0.0.1:6379 (database 13, the tests' own; only keys the tests create are
removed); else, as on a laptop with no Redis, a private ``redis-server``
started through :mod:`celery_ordered.embedded`. ``CO_TEST_EMBEDDED=1`` forces
the private one.

A run leaves nothing behind: at its end, kombu's bindings and queues that it
created in the tests' Redis are deleted, and the run fails if that database
then holds a key without a TTL that was not there when it began, or if a
temporary file or directory of ours made during the run remains
(``co-worker-*``, ``pymp-*``, ``celery-ordered-*``; see :mod:`tests.support.leftovers`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis

from tests.support import SESSION
from tests.support.processes import (
    PYMP_DIR_GLOB,
    cmdline,
    descendants,
    dir_in_use,
    redis_dirs,
    wait_gone,
)
from tests.support.tools import require_tool
from tests.support.workers import Worker

if TYPE_CHECKING:
    from tests.support.topologies import LocalRedisCluster

SYSTEM_REDIS = "redis://127.0.0.1:6379/13"

_embedded: Any = None
_leftovers: Any = None


def _system_redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def pytest_configure(config: pytest.Config) -> None:
    global _embedded
    if "CO_TEST_REDIS_URL" not in os.environ:
        if os.environ.get("CO_TEST_EMBEDDED") != "1" and _system_redis_answers(SYSTEM_REDIS):
            os.environ["CO_TEST_REDIS_URL"] = SYSTEM_REDIS
        else:
            from celery_ordered.embedded import RedisServer

            _embedded = RedisServer().start()
            os.environ["CO_TEST_REDIS_URL"] = _embedded.url
            os.environ["CO_TEST_BROKER_URL"] = _embedded.broker_url
    os.environ.setdefault("CO_TEST_BROKER_URL", os.environ["CO_TEST_REDIS_URL"])
    os.environ.setdefault("CO_TEST_QUEUE", f"celery-ordered-tests-{uuid.uuid4().hex[:8]}")
    if not hasattr(config, "workerinput"):  # not a pytest-xdist worker
        from tests.support.leftovers import Leftovers

        global _leftovers
        _leftovers = Leftovers(os.environ["CO_TEST_REDIS_URL"], SESSION)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete the kombu keys the run made; fail it if anything of ours is left."""
    if _leftovers is None:
        return
    problems = _leftovers.clean_and_check()
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the run left things behind:\n  " + "\n  ".join(problems)
        if reporter is not None:
            reporter.write_sep("=", "leftovers", red=True)
            reporter.write_line(text)
        else:  # pragma: no cover
            print(text, file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: Skips a run under ``CO_REQUIRE_TOOLS=1`` (CI) accepts: substrings of their
#: reasons. Every other skip fails there: CI installs and starts everything a
#: test needs, so a skip means a test that did not run, unnoticed.
EXPECTED_SKIPS: tuple[str, ...] = ()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under ``CO_REQUIRE_TOOLS=1``, turn a skip not in :data:`EXPECTED_SKIPS` into a failure."""
    outcome: Any = yield
    report = outcome.get_result()
    if os.environ.get("CO_REQUIRE_TOOLS") != "1" or not report.skipped:
        return
    if hasattr(report, "wasxfail"):  # an expected failure, not a skip
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    if any(expected in reason for expected in EXPECTED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CO_REQUIRE_TOOLS=1, which allows no skip but those listed in "
        f"tests/conftest.py EXPECTED_SKIPS: {reason}"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()


def pytest_report_header(config: pytest.Config) -> str:
    kind = "embedded (private redis-server)" if _embedded is not None else "machine's"
    return f"celery-ordered: {kind} Redis at {os.environ.get('CO_TEST_REDIS_URL')}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """redis-py URL of the tests' Redis."""
    return os.environ["CO_TEST_REDIS_URL"]


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> redis.Redis:
    """A client of the tests' Redis."""
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def app() -> Any:
    """The tests' Celery app (tests/apps/celeryapp.py)."""
    from tests.apps.celeryapp import app

    return app


@pytest.fixture(scope="session")
def worker(app: Any) -> Iterator[Worker]:
    """A session-wide worker with 4 processes on the tests' default queue."""
    queue, name = app.conf.task_default_queue, f"tests-{uuid.uuid4().hex[:6]}@%h"
    with Worker(queue=queue, concurrency=4, hostname=name) as started:
        started.wait_ready(app)
        yield started


@pytest.fixture
def start_worker(app: Any) -> Iterator[Callable[..., Worker]]:
    """Start extra workers on a queue of their own; stopped after the test."""
    started: list[Worker] = []

    def start(concurrency: int = 2, queue: str | None = None, **options: Any) -> Worker:
        queue = queue or f"{app.conf.task_default_queue}-{uuid.uuid4().hex[:6]}"
        name = f"extra-{uuid.uuid4().hex[:6]}@%h"
        proc = Worker(queue=queue, concurrency=concurrency, hostname=name, **options)
        started.append(proc)
        proc.wait_ready(app)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def make_stream(app: Any, redis_client: redis.Redis) -> Iterator[Callable[..., Any]]:
    """Create streams with unique names; every one is deleted after the test."""
    from celery_ordered import OrderedResultStream

    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("name", f"test-{uuid.uuid4().hex}")
        stream = OrderedResultStream(kwargs.pop("app", app), **kwargs)
        made.append(stream)
        return stream

    yield make
    for stream in made:
        with contextlib.suppress(Exception):
            stream.delete()


@pytest.fixture
def gate_key(redis_client: redis.Redis) -> Iterator[str]:
    """A Redis list a ``tests.apps.tasks.gate`` task waits on; the test opens it with
    ``rpush``, and it is opened after the test anyway, so no worker is left waiting."""
    key = f"test-gate-{uuid.uuid4().hex}"
    yield key
    redis_client.rpush(key, 1)
    redis_client.expire(key, 60)


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A Redis Cluster of three primaries, no replicas, every slot served; one per module."""
    require_tool("redis-server", "it runs the nodes of the local Redis Cluster")
    require_tool("redis-cli", "its --cluster create joins the nodes into one cluster")
    from tests.support.topologies import LocalRedisCluster

    with LocalRedisCluster(3) as started:
        yield started


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves a process of ours, a private Redis directory or a
    worker's temporary directory (``pymp-*``) behind."""
    me = os.getpid()
    dirs_before = redis_dirs()
    pymp_before = set(glob.glob(PYMP_DIR_GLOB))
    procs_before = descendants(me)
    yield
    # The session's Celery worker (the worker fixture) may start during a test.
    new_procs = {
        pid for pid in descendants(me) - procs_before if "tests.apps.celeryapp" not in cmdline(pid)
    }
    wait_gone(new_procs)
    # Another test run on this machine may own new directories: theirs have a
    # living keeper naming them; ours must be gone.
    new_dirs = {d for d in redis_dirs() - dirs_before if not dir_in_use(d)}
    wait_gone(paths=new_dirs)
    # A temporary directory is removed by the exit of the process that made it,
    # which a loaded machine (or a test run beside this one) may delay: wait
    # for it as for processes, under the same deadline.
    wait_gone(paths=set(glob.glob(PYMP_DIR_GLOB)) - pymp_before)
