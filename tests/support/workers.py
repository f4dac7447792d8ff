"""The one launcher of the ``celery worker`` subprocesses the tests start.

Every worker of the tests is a :class:`Worker`: of the tests' own app
(``tests.apps.celeryapp``) by default, or of any app spec (an example's, a
topology's, the demo's), on a queue, with the pool, concurrency, working
directory, environment and node name the test needs; in a network namespace
given a ``prefix`` command (``ip netns exec NAME``). Each gets a temporary
directory of its own, ``co-worker-<session>-*``, holding its log and its
temporary files (``TMPDIR``: billiard's, which a killed worker never removes),
removed by :meth:`Worker.stop`. Each dies with the process that started it
(Linux), so a crashed test run leaves no worker behind.

Readiness: :meth:`Worker.wait_ready` (the worker ran a task for a stream) or
:func:`wait_answering` (workers answer a ping through the broker). The
benchmarks may use this module too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from celery.utils.nodenames import host_format

from tests.support import ROOT, SESSION
from tests.support.processes import die_with_parent

#: The tests' own app, which every test worker runs unless told otherwise.
TESTS_APP = "tests.apps.celeryapp"

#: Seconds a worker may take to answer its readiness check.
READY_TIMEOUT = 60.0

#: Seconds a worker may take to stop on SIGTERM (a warm shutdown) before it is killed.
STOP_TIMEOUT = 30.0


class WorkerNotReady(RuntimeError):
    """A worker did not answer its readiness check; the message holds its log."""


class Worker:
    """A real ``celery -A app_spec worker`` subprocess, started at once.

    ``queue``: the queue it serves (``-Q``; None: the app's default).
    ``hostname``: its node name (``--hostname``, ``%h`` allowed).
    ``env``: its whole environment (default: this process's);
    ``extra_env`` is added to it. ``args``: more command-line arguments.
    ``prefix``: a command the worker runs under (``ip netns exec NAME``).
    ``new_session``: a process group of its own, killed whole by
    :meth:`stop` (pool processes included). Usable as a context manager
    that stops it.
    """

    def __init__(
        self,
        app_spec: str = TESTS_APP,
        *,
        queue: str | None = None,
        concurrency: int = 2,
        pool: str = "prefork",
        hostname: str | None = None,
        cwd: Path | str = ROOT,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        loglevel: str = "WARNING",
        new_session: bool = False,
    ) -> None:
        self.app_spec = app_spec
        self.queue = queue
        self.hostname = hostname
        self.new_session = new_session
        self.directory = Path(tempfile.mkdtemp(prefix=f"co-worker-{SESSION}-"))
        self.log = self.directory / "worker.log"
        self._output: str | None = None
        argv = [
            *prefix, sys.executable, "-m", "celery", "-A", app_spec, "worker",
            f"--pool={pool}", f"--concurrency={concurrency}",
            *(["-Q", queue] if queue else []),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            f"--loglevel={loglevel}",
            *([f"--hostname={hostname}"] if hostname else []),
            *args,
        ]  # fmt: skip
        environment = {
            **(os.environ if env is None else env),
            **(extra_env or {}),
            "C_FORCE_ROOT": "1",
            "TMPDIR": str(self.directory),
        }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=environment,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=new_session, preexec_fn=die_with_parent,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        """pid of the worker's main process."""
        return self.proc.pid

    @property
    def node(self) -> str:
        """The worker's node name (``name@host``), as a ping reply names it."""
        if self.hostname is None:
            raise ValueError("a worker started without hostname= has Celery's default node name")
        return str(host_format(self.hostname))

    def wait_ready(
        self,
        app: Any,
        *,
        redis_url: str | None = None,
        task: Any = None,
        args: Sequence[Any] = ("ready",),
        expect: Callable[[Any], bool] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> None:
        """Return once the worker has run a task for a stream of ``app``.

        The task is ``task(*args)`` (default: ``tests.apps.tasks.echo("ready")``)
        on the worker's queue, in a stream on ``redis_url`` (default: the
        app's); its outcome must satisfy ``expect`` (default: equal
        ``args[0]``). Raises :class:`WorkerNotReady`, with the worker's log,
        when it does not answer rightly within ``timeout`` seconds.
        """
        from celery_ordered import OrderedResultStream

        if task is None:
            from tests.apps.tasks import echo as task
        options = {"task_options": {"queue": self.queue}} if self.queue else {}
        stream = OrderedResultStream(app, redis_url=redis_url, **options)
        try:
            stream.put(task, *args)
            answer = stream.get(timeout=timeout)
        except Exception as exc:
            raise WorkerNotReady(
                f"the worker ({self.app_spec}) did not answer within {timeout:g}s: {exc!r}\n"
                f"{self.output()[-3000:]}"
            ) from exc
        finally:
            stream.delete()
        if not (expect(answer) if expect is not None else answer == args[0]):
            raise WorkerNotReady(f"the worker answered the readiness check wrongly: {answer!r}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the worker (warm), killing it if it lingers; remove its directory.

        Idempotent; its log stays readable through :meth:`output`.
        """
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a stopped worker cannot act on SIGTERM
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout)
            if self.new_session:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            elif self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        finally:
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

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_answering(app: Any, workers: Iterable[Worker], timeout: float = READY_TIMEOUT) -> None:
    """Return once every worker (started with ``hostname=``) answers a ping through ``app``.

    Raises :class:`WorkerNotReady`, with the workers' logs, if one exits or
    they do not all answer within ``timeout`` seconds.
    """
    waiting = {worker.node: worker for worker in workers}
    everyone = dict(waiting)

    def logs() -> str:
        return "\n".join(f"--- {node}:\n{w.output()[-3000:]}" for node, w in everyone.items())

    deadline = time.monotonic() + timeout
    while waiting:
        for node, worker in waiting.items():
            if worker.proc.poll() is not None:
                raise WorkerNotReady(f"the worker {node} exited:\n{logs()}")
        if time.monotonic() > deadline:
            raise WorkerNotReady(f"no answer from {sorted(waiting)} in {timeout:g}s:\n{logs()}")
        for reply in app.control.ping(destination=sorted(waiting), timeout=0.5):
            for node in reply:
                waiting.pop(node, None)


@contextlib.contextmanager
def example_worker(
    spec: str,
    app: Any,
    task: Any,
    *extra_args: str,
    cwd: Path = ROOT,
    env: Mapping[str, str],
) -> Iterator[Worker]:
    """``celery -A spec worker`` on ``app``'s default queue, as an example's docs start it.

    Yields the worker once it has run ``task(0, 0.0)`` (an example's
    ``process`` task) for a stream; stops it at the end.
    """
    with Worker(
        spec,
        queue=app.conf.task_default_queue,
        concurrency=3,
        cwd=cwd,
        env=env,
        args=extra_args,
    ) as worker:
        worker.wait_ready(app, task=task, args=(0, 0.0), expect=lambda answer: answer["item"] == 0)
        yield worker
