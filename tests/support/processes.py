"""Processes as ``/proc`` shows them, and the footprints of private clusters.

Linux only: processes are read from ``/proc``. A zombie counts as gone (it
runs nothing and holds nothing; reaping it is its parent's business). Also
here: :func:`die_with_parent`, which every subprocess the tests start runs
before its program, so that none outlives a test run that crashed.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from tests.support import ROOT

#: How long anything may take to disappear once its owner stopped or died.
GONE_TIMEOUT = 20.0

#: The prefix of the private Redis directories celery_ordered.embedded makes.
REDIS_DIR_GLOB = os.path.join(tempfile.gettempdir(), "celery-ordered-redis-*")

#: billiard's (multiprocessing's) temporary directories, which a worker killed
#: with its group never removes.
PYMP_DIR_GLOB = os.path.join(tempfile.gettempdir(), "pymp-*")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    return text[text.rindex(")") + 2 :].split()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of ``pid``, or None when there is no such process."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _cpu_ticks(fields: list[str]) -> int:
    """User and system CPU, in clock ticks, from a process's :func:`_stat_fields`."""
    return int(fields[11]) + int(fields[12])  # utime, stime


def group_cpu(pgid: int) -> float:
    """CPU seconds (user and system) used so far by the live processes of group ``pgid``."""
    ticks = 0
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid:
            ticks += _cpu_ticks(fields)
    return ticks / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user and system) used so far by process ``pid`` alone (0.0 if gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else _cpu_ticks(fields) / os.sysconf("SC_CLK_TCK")


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X", "x")


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (SIGSTOP): state T."""
    stat = _stat(pid)
    return stat is not None and stat[0] == "T"


def group_members(pgid: int) -> set[int]:
    """Running processes whose process group is ``pgid``."""
    members = set()
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X", "x"):
            members.add(pid)
    return members


def descendants(root: int) -> set[int]:
    """Running descendants of ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None and stat[0] not in ("Z", "X", "x"):
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ("" when gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def die_with_parent(sig: int = signal.SIGKILL) -> None:  # pragma: no cover - in the child
    """Have the kernel send ``sig`` to this process when its parent dies (Linux).

    Given as ``preexec_fn`` to a subprocess, it runs in the child before its
    program; the setting outlives ``exec``.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, sig)  # PR_SET_PDEATHSIG


def as_from_a_terminal() -> None:  # pragma: no cover - in the child
    """``preexec_fn`` for a program a test stops with Ctrl-C (SIGINT), as a shell would.

    A shell without job control starts its background commands with SIGINT
    ignored (so that Ctrl-C at the terminal spares them), and the setting is
    inherited: a test run in the background of a CI script would pass it on,
    and Python, seeing SIGINT ignored at start-up, never raises
    KeyboardInterrupt. A program started from a terminal has the default, so
    this restores it. It also runs :func:`die_with_parent`.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent()


def wait_gone(
    pids: Iterable[int] = (),
    *,
    groups: Iterable[int] = (),
    paths: Iterable[str] = (),
    timeout: float = GONE_TIMEOUT,
) -> None:
    """Wait until every pid, every member of every group and every path is gone.

    Fails the test, naming the survivors, if they are not all gone within
    ``timeout`` seconds. Processes that are not our children cannot be waited
    for with ``waitpid``, so this polls, briefly, under a deadline.
    """
    pids, groups, paths = set(pids), set(groups), set(paths)
    deadline = time.monotonic() + timeout
    while True:
        living = {pid for pid in pids if alive(pid)}
        for group in groups:
            living |= group_members(group)
        remaining = {path for path in paths if os.path.exists(path)}
        if not living and not remaining:
            return
        if time.monotonic() > deadline:
            described = {pid: cmdline(pid)[:120] for pid in sorted(living)}
            pytest.fail(
                f"still there {timeout}s after their owner stopped or died: "
                f"processes {described}, paths {sorted(remaining)}"
            )
        time.sleep(0.02)


@dataclass
class Footprint:
    """Everything a private cluster runs and owns."""

    worker_pid: int
    pool_pids: set[int]
    keeper_pid: int
    redis_pid: int
    directory: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pids(self) -> set[int]:
        return {self.worker_pid, self.keeper_pid, self.redis_pid, *self.pool_pids}

    def assert_running(self) -> None:
        for pid in self.pids:
            assert alive(pid), f"process {pid} ({cmdline(pid)[:80]}) is not running"
        assert os.path.isdir(self.directory)

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> None:
        wait_gone(self.pids, groups={self.worker_pid}, paths={self.directory}, timeout=timeout)

    def as_json(self) -> str:
        return json.dumps({**self.__dict__, "pool_pids": sorted(self.pool_pids)})

    @classmethod
    def from_json(cls, text: str) -> Footprint:
        data = json.loads(text)
        data["pool_pids"] = set(data["pool_pids"])
        return cls(**data)


def footprint(cluster: Any) -> Footprint:
    """The footprint of a running LocalCluster."""
    worker_pid = cluster.worker_pid
    assert worker_pid is not None, "the cluster is not running"
    client = redis.Redis.from_url(cluster.redis.url)
    try:
        redis_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return Footprint(
        worker_pid=worker_pid,
        pool_pids=group_members(worker_pid) - {worker_pid},
        keeper_pid=cluster.redis.keeper_pid,
        redis_pid=redis_pid,
        directory=cluster.redis.directory,
    )


#: Prelude of the owner scripts run by :func:`run_owner`: it prints a
#: footprint line, then blocks until killed.
OWNER_PRELUDE = """
import json, os, sys, threading
sys.path.insert(0, {root!r})
from tests.support.processes import footprint

def report(cluster, **extra):
    fp = footprint(cluster)
    fp.extra.update(extra)
    print("FOOTPRINT " + fp.as_json(), flush=True)

def block():
    threading.Event().wait()
"""


class Owner:
    """A fresh interpreter running ``body``: the owner of private clusters.

    ``body`` may call ``report(cluster, **extra)`` (prints a footprint line)
    and ``block()`` (waits until killed). Lines are read as they come, with a
    deadline, so a hung or crashed owner fails the test instead of hanging it.
    """

    def __init__(self, body: str) -> None:
        script = OWNER_PRELUDE.format(root=str(ROOT)) + body
        self._errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in kill()/wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=tempfile.gettempdir(),
            stdout=subprocess.PIPE,
            stderr=self._errors,
            text=True,
        )
        self._stderr = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # EOF: the owner and all that inherited its stdout ended
            for line in stream:
                self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        """What the owner wrote on stderr so far."""
        if not self._errors.closed:
            self._errors.seek(0)
            self._stderr = self._errors.read()
        return self._stderr

    def read_line(self, prefix: str, timeout: float = 60.0) -> str:
        """The rest of the next line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                pytest.fail(
                    f"the owner printed no {prefix!r} line within {timeout}s (exit status "
                    f"{self.proc.returncode}); stdout: {''.join(self.output)!r}; "
                    f"stderr: {self.stderr()[-3000:]}"
                )
            self.output.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def footprint(self, timeout: float = 60.0) -> Footprint:
        """The next footprint the owner reports."""
        return Footprint.from_json(self.read_line("FOOTPRINT ", timeout))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the owner (SIGKILL by default) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)
        self.wait()

    def wait(self, timeout: float = 60.0) -> int:
        """Reap the owner; its exit status."""
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr()
            self._errors.close()


def redis_dirs() -> set[str]:
    """The private Redis directories (of celery_ordered.embedded) there are now."""
    return set(glob.glob(REDIS_DIR_GLOB))


def dir_in_use(directory: str) -> bool:
    """Whether a live process (someone else's keeper) names ``directory``."""
    return any(directory in cmdline(pid) for pid in _all_pids() if alive(pid))
