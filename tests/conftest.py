"""Real parts for the tests: a Redis server and Celery worker processes.

Redis: ``CO_TEST_REDIS_URL`` if set; else the machine's Redis on
127.0.0.1:6379 (database 13, the tests' own; only keys the tests create are
removed); else, as on a laptop with no Redis, a private ``redis-server``
started through :mod:`celery_ordered.embedded`. ``CO_TEST_EMBEDDED=1`` forces
the private one.

A run leaves nothing behind: at its end, kombu's bindings and queues that it
created in the tests' Redis are deleted, and the run fails if that database
then holds a key without a TTL that was not there when it began, or if a
temporary file or directory of ours made during the run remains
(``co-worker-*``, ``pymp-*``, ``celery-ordered-*``; see :mod:`tests.leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_REDIS = "redis://127.0.0.1:6379/13"

#: This run's own mark, in the names of the temporary files it makes.
SESSION = os.environ.setdefault("CO_TEST_SESSION", uuid.uuid4().hex[:8])

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
        from tests.leftovers import Leftovers

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
    """The tests' Celery app (tests/celeryapp.py)."""
    from tests.celeryapp import app

    return app


class WorkerProcess:
    """A real ``celery worker`` subprocess serving the tests' queue."""

    def __init__(self, concurrency: int, queue: str, name: str) -> None:
        self.concurrency = concurrency
        self.queue = queue
        # The worker's log and temporary files (billiard's, which a killed
        # worker never removes) live in a directory removed by stop().
        self.directory = Path(tempfile.mkdtemp(prefix=f"co-worker-{SESSION}-"))
        self.log = self.directory / "worker.log"
        self._output: str | None = None
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "tests.celeryapp", "worker",
                "--pool=prefork", f"--concurrency={concurrency}", "-Q", queue,
                "--without-gossip", "--without-mingle", "--without-heartbeat",
                "--loglevel=WARNING", f"--hostname={name}@%h",
            ],
            cwd=ROOT,
            env={**os.environ, "C_FORCE_ROOT": "1", "TMPDIR": str(self.directory)},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        """pid of the worker's main process."""
        return self.proc.pid

    def wait_ready(self, app: Any, timeout: float = 60) -> None:
        """Return once the worker has run a task for a stream."""
        from celery_ordered import OrderedResultStream
        from tests.tasks import echo

        stream = OrderedResultStream(app, task_options={"queue": self.queue})
        try:
            stream.put(echo, "ready")
            if stream.get(timeout=timeout) != "ready":
                raise RuntimeError("the worker answered the readiness check wrongly")
        finally:
            stream.delete()

    def stop(self) -> None:
        """Stop the worker (warm), killing it if it lingers; remove its directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._output is None:
            self._output = self.output()
        shutil.rmtree(self.directory, ignore_errors=True)

    def output(self) -> str:
        """What the worker logged (kept once it is stopped)."""
        if self._output is not None:
            return self._output
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def example_worker(
    spec: str,
    app: Any,
    task: Any,
    *extra_args: str,
    cwd: Path = ROOT,
    env: dict[str, str],
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A spec worker`` on ``app``'s default queue, as an example's docs start it.

    Yields the process once it has run ``task(0, 0.0)`` (an example's
    ``process`` task) for a stream; its log is in the error if it never does.
    """
    log = Path(tempfile.mkstemp(prefix=f"co-example-worker-{SESSION}-", suffix=".log")[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", spec, "worker",
         "-Q", app.conf.task_default_queue, *extra_args,
         "--concurrency=3", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=cwd, env={**env, "C_FORCE_ROOT": "1"}, stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        from celery_ordered import OrderedResultStream

        stream = OrderedResultStream(app)
        try:
            stream.put(task, 0, 0.0)
            assert stream.get(timeout=60)["item"] == 0
        except Exception as exc:
            raise RuntimeError(f"the example's worker did not answer:\n{log.read_text()}") from exc
        finally:
            stream.delete()
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def worker(app: Any) -> Iterator[WorkerProcess]:
    """A session-wide worker with 4 processes on the tests' default queue."""
    proc = WorkerProcess(4, app.conf.task_default_queue, f"tests-{uuid.uuid4().hex[:6]}")
    try:
        proc.wait_ready(app)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def start_worker(app: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra workers on a queue of their own; stopped after the test."""
    started: list[WorkerProcess] = []

    def start(concurrency: int = 2, queue: str | None = None) -> WorkerProcess:
        queue = queue or f"{app.conf.task_default_queue}-{uuid.uuid4().hex[:6]}"
        proc = WorkerProcess(concurrency, queue, f"extra-{uuid.uuid4().hex[:6]}")
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
    """A Redis list a ``tests.tasks.gate`` task waits on; the test opens it with
    ``rpush``, and it is opened after the test anyway, so no worker is left waiting."""
    key = f"test-gate-{uuid.uuid4().hex}"
    yield key
    redis_client.rpush(key, 1)
    redis_client.expire(key, 60)


def require_tool(name: str, why: str) -> str:
    """The path of program ``name``; skips the test when it is missing.

    CI sets ``CO_REQUIRE_TOOLS=1`` (it installs every tool), so there a
    missing program fails the test instead of skipping it.
    """
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({why})"
        if os.environ.get("CO_REQUIRE_TOOLS") == "1":
            pytest.fail(message + "; CO_REQUIRE_TOOLS=1 requires it")
        pytest.skip(message)
    return path
